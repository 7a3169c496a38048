"""kernels._resize (the SIMD crop-resize-flip) against the numba kernel it replaces.

Every path this machine can run (avx512, avx2, portable; the others are skipped, which is not a
pass) is compared with the numba reference on coordinate images (conftest's: a crop, scale or
flip that is off shows as a colour error) and on noise, over flips, crops at every border,
upscales, strong downscales, odd output widths (the vector tails) and 1-pixel images.

Tolerance: at most one level, on at most 1 value in 10,000 (kernels/resize.py says why they can
differ: where a float32 sum lands within a rounding error of an integer). Measured on these
cases, 800,000 values per path: 0 differ for avx512 and avx2, 20 for portable (no FMA).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import coordinate_image
from kernels import resize
from kernels.resize import PATH_ENV, resize_crop_into, resize_path

_resize = resize._resize
C_PATHS = ("avx512", "avx2", "portable")
MAX_LEVELS = 1
MAX_FRACTION = 1e-4

needs_ext = pytest.mark.skipif(_resize is None, reason="kernels._resize not built")


def runnable(path: str):
    """A pytest param for a C path, skipped where the extension or the CPU cannot run it."""
    ok = _resize is not None and path in _resize.isas()
    return pytest.param(path, marks=pytest.mark.skipif(not ok, reason=f"this CPU or build cannot run {path}"))


def numba_ref(src, box, shape, flip):
    out = np.empty(shape, np.uint8)
    resize_crop_into(src, box, out, flip, path="numba")
    return out


def cases():
    """(name, src, box, out shape, flip): the geometry the loader produces, and its extremes."""
    rng = np.random.default_rng(19)
    coord = coordinate_image(333, 251, 0, 1)
    coord_odd = coordinate_image(97, 480, 1, 2)  # red falls left to right: a flip shows
    w, h = 333, 251
    yield "whole image, downscale 1.5", coord, (0.0, 0.0, w, h), (167, 222, 3)
    yield "left edge", coord, (0.0, 40.3, 120.0, 100.0), (64, 77, 3)
    yield "top edge", coord, (50.5, 0.0, 100.0, 60.0), (61, 90, 3)
    yield "right edge", coord, (w - 150.25, 30.0, 150.25, 90.0), (45, 75, 3)
    yield "bottom-right corner", coord, (w - 70.0, h - 55.5, 70.0, 55.5), (33, 41, 3)
    yield "top-left corner, upscale 3.2", coord, (0.0, 0.0, 20.0, 15.0), (48, 64, 3)
    yield "upscale 7x, fractional box", coord, (101.7, 33.2, 9.4, 11.9), (83, 66, 3)
    yield "strong downscale 20x", coord, (0.0, 0.0, w, h), (12, 16, 3)
    yield "downscale 333 -> 1", coord, (0.0, 0.0, w, h), (1, 1, 3)
    yield "downscale 2.4 (by-pixel AVX-512 path)", coord_odd, (3.0, 10.0, 94.0, 460.0), (200, 39, 3)
    yield "tall narrow", coord_odd, (0.0, 0.0, 97.0, 480.0), (224, 5, 3)
    yield "1x1 source", coord[:1, :1], (0.0, 0.0, 1.0, 1.0), (7, 9, 3)
    yield "one-pixel-wide box", coord, (200.0, 10.0, 1.0, 200.0), (50, 3, 3)
    yield "a pixel past the far edges", coord, (w - 99.5, h - 80.0, 100.0, 80.9), (40, 50, 3)
    for i in range(24):  # random crops of noise: every rounding is exposed
        sh, sw = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        noise = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        bw, bh = rng.uniform(0.5, sw), rng.uniform(0.5, sh)
        box = (rng.uniform(0, sw - bw), rng.uniform(0, sh - bh), bw, bh)
        yield f"noise {i}", noise, box, (int(rng.integers(1, 120)), int(rng.integers(1, 120)), 3)


CASES = list(cases())


@pytest.mark.parametrize("path", [runnable(p) for p in C_PATHS])
def test_paths_match_numba(path):
    values = differing = 0
    for name, src, box, shape in CASES:
        for flip in (False, True):
            ref = numba_ref(src, box, shape, flip)
            out = np.full(shape, 77, np.uint8)
            assert _resize.resize_crop(src, *box, out, flip, path) == path
            d = np.abs(out.astype(int) - ref)
            assert d.max() <= MAX_LEVELS, (name, flip, int(d.max()))
            values += d.size
            differing += int((d > 0).sum())
            # Through the Python entry point too: the same path, the same pixels.
            again = np.empty(shape, np.uint8)
            resize_crop_into(src, box, again, flip, path=path)
            assert np.array_equal(again, out), (name, flip)
    assert differing <= MAX_FRACTION * values, (differing, values)


@pytest.mark.parametrize("path", [runnable(p) for p in C_PATHS])
def test_flip_mirrors_and_tails_are_written(path):
    """Output widths around the vector widths (4, 8 and 16 pixels; 64 values): every pixel is
    written, none past the row, and the flip is the mirror image."""
    src = coordinate_image(120, 90, 0, 0)
    for ow in (1, 2, 3, 4, 5, 7, 8, 9, 11, 15, 16, 17, 21, 22, 23, 43, 64, 65):
        row = np.full((1, ow, 3), 201, np.uint8)
        _resize.resize_crop(src, 10.0, 20.0, 100.0, 1.0, row, False, path)
        mirrored = np.full((1, ow, 3), 201, np.uint8)
        _resize.resize_crop(src, 10.0, 20.0, 100.0, 1.0, mirrored, True, path)
        assert np.array_equal(mirrored, row[:, ::-1]), ow
        assert np.abs(row.astype(int) - numba_ref(src, (10.0, 20.0, 100.0, 1.0), (1, ow, 3), False)).max() <= 1
        # A whole output buffer with guard bytes after it: nothing is written past its end.
        flat = np.full(ow * 3 * 2 + 64, 201, np.uint8)
        two = flat[:ow * 3 * 2].reshape(2, ow, 3)
        _resize.resize_crop(src, 0.0, 0.0, 120.0, 90.0, two, ow % 2 == 1, path)
        assert (flat[ow * 3 * 2:] == 201).all(), ow


def test_auto_is_the_best_simd_path_else_numba(monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)
    simd = tuple(p for p in (_resize.isas() if _resize else ()) if p != "portable")
    assert resize_path() == (simd[0] if simd else "numba")
    monkeypatch.setenv(PATH_ENV, "numba")
    assert resize_path() == "numba"
    monkeypatch.setenv(PATH_ENV, "avx3")
    with pytest.raises(ValueError, match=f"{PATH_ENV}='avx3'"):
        resize_path()
    with pytest.raises(ValueError, match="path='sse'"):
        resize_path("sse")
    # A path the CPU lacks is refused by name, not silently replaced.
    monkeypatch.setattr(resize, "SIMD_PATHS", ("avx2",))
    with pytest.raises(ValueError, match="avx512.*runs only avx2"):
        resize_path("avx512")


def test_numba_runs_when_the_extension_is_not_built():
    """Import kernels.resize with kernels._resize unimportable: auto is numba, the output is the
    numba kernel's, and asking for a C path says the extension is not built."""
    code = """
import sys
sys.modules["kernels._resize"] = None  # import fails as if it had never been built
import numpy as np
from kernels import resize
assert resize._resize is None and resize.resize_path() == "numba", resize.resize_path()
src = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)
a, b = np.empty((9, 11, 3), np.uint8), np.empty((9, 11, 3), np.uint8)
resize.resize_crop_into(src, (1.5, 2.0, 30.0, 20.0), a, True)
resize.resize_crop_into(src, (1.5, 2.0, 30.0, 20.0), b, True, path="numba")
assert np.array_equal(a, b)
try:
    resize.resize_path("avx2")
except ValueError as e:
    assert "not built" in str(e), e
else:
    raise AssertionError("avx2 accepted without the extension")
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop(PATH_ENV, None)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def hostile(path: str):
    """(what, call) pairs that must raise ValueError on `path` and leave the process alive."""
    src = coordinate_image(40, 30, 0, 0)
    out = np.empty((8, 8, 3), np.uint8)

    def run(s=src, box=(0.0, 0.0, 40.0, 30.0), o=out):
        if path == "numba":
            resize_crop_into(s, box, o, False, path="numba")
        else:
            _resize.resize_crop(s, *box, o, False, path)

    nan, inf = float("nan"), float("inf")
    return [
        ("zero-size out", lambda: run(o=np.empty((0, 8, 3), np.uint8))),
        ("zero-width out", lambda: run(o=np.empty((8, 0, 3), np.uint8))),
        ("zero-size src", lambda: run(s=np.empty((0, 40, 3), np.uint8))),
        ("zero-width box", lambda: run(box=(3.0, 3.0, 0.0, 10.0))),
        ("negative box", lambda: run(box=(3.0, 3.0, 10.0, -4.0))),
        ("NaN box", lambda: run(box=(nan, 0.0, 10.0, 10.0))),
        ("infinite box", lambda: run(box=(0.0, 0.0, inf, 10.0))),
        ("huge box", lambda: run(box=(0.0, 0.0, 1e30, 1e30))),
        ("box right of the image", lambda: run(box=(45.0, 0.0, 10.0, 10.0))),
        ("box left of the image", lambda: run(box=(-5.0, 0.0, 10.0, 10.0))),
        ("box past the bottom", lambda: run(box=(0.0, 25.0, 10.0, 10.0))),
        ("float32 src", lambda: run(s=src.astype(np.float32))),
        ("4 channels", lambda: run(s=np.zeros((30, 40, 4), np.uint8))),
        ("2-D src", lambda: run(s=np.zeros((30, 120), np.uint8))),
        ("int16 out", lambda: run(o=np.empty((8, 8, 3), np.int16))),
        ("read-only out", lambda: run(o=np.frombuffer(bytes(8 * 8 * 3), np.uint8).reshape(8, 8, 3))),
        ("strided out", lambda: run(o=np.empty((8, 16, 3), np.uint8)[:, ::2])),
        ("strided src", lambda: run(s=src[:, ::2])),
        ("src wider than JPEG allows", lambda: run(s=np.zeros((1, 70000, 3), np.uint8), box=(0.0, 0.0, 10.0, 1.0))),
    ]


@pytest.mark.parametrize("path", [runnable(p) for p in C_PATHS] + ["numba"])
def test_hostile_arguments_raise_value_error(path):
    for what, call in hostile(path):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{what}: accepted")


@needs_ext
def test_bad_isa_name_and_non_buffers():
    src, out = coordinate_image(40, 30, 0, 0), np.empty((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="isa must be"):
        _resize.resize_crop(src, 0.0, 0.0, 40.0, 30.0, out, False, "neon")
    with pytest.raises(TypeError):  # not an array at all: Python's own TypeError
        _resize.resize_crop([[1, 2, 3]], 0.0, 0.0, 1.0, 1.0, out, False)
    assert _resize.isas()[-1] == "portable" and set(_resize.isas()) <= set(C_PATHS)
