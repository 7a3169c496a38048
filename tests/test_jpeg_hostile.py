"""kernels._jpeg against damaged and hostile JPEGs: every reproducer of the hostile-input issue,
made by a generator (tests/jpeg_fixtures.py), and the contract the loader relies on:
CorruptJPEG for bad data, UnsupportedJPEG for what another decoder may read, a plain ValueError
for the caller's mistakes, bounded memory and scans, and pixels that are the image's."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jpeg_fixtures as fx

try:
    from kernels import _jpeg
except ImportError:
    _jpeg = None

pytestmark = pytest.mark.skipif(_jpeg is None, reason="kernels._jpeg not built (libjpeg-turbo headers missing)")

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return fx.photo(320, 240, seed=1)


@pytest.fixture(scope="module")
def baseline(rgb) -> bytes:
    return fx.pil_jpeg(rgb)


@pytest.fixture(scope="module")
def progressive(rgb) -> bytes:
    return fx.pil_jpeg(rgb, progressive=True)


@pytest.fixture
def restore_limits():
    old = _jpeg.get_limits()
    yield
    _jpeg.set_limits(**old)


@pytest.fixture
def restore_features():
    yield
    _jpeg._override()


def decode_full(data: bytes, denom: int = 1, fast: bool = False) -> np.ndarray:
    w, h, _, _ = _jpeg.header(data)
    buf = np.empty(((w + denom - 1) // denom) * ((h + denom - 1) // denom) * 3, np.uint8)
    left, top, width, rows = _jpeg.decode_region(data, 0, 0, w, h, denom, buf, fast)
    return buf[: width * rows * 3].reshape(rows, width, 3)


def decode_scaled(data: bytes, num: int) -> np.ndarray:
    w, h, _, _ = _jpeg.header(data)
    ow, oh = -(-w * num // 8), -(-h * num // 8)
    buf = np.empty(ow * oh * 3, np.uint8)
    assert _jpeg.decode_scaled(data, num, buf) == (ow, oh)
    return buf.reshape(oh, ow, 3)


def cmyk_jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# -- the API ----------------------------------------------------------------------------------

def test_exceptions_limits_and_features_are_exposed():
    assert issubclass(_jpeg.CorruptJPEG, ValueError) and issubclass(_jpeg.UnsupportedJPEG, ValueError)
    assert not issubclass(_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG)
    assert not issubclass(_jpeg.UnsupportedJPEG, _jpeg.CorruptJPEG)
    f = _jpeg.features()
    assert f["build_version"] == _jpeg.LIBJPEG_TURBO_VERSION
    assert f["build_version_number"] == _jpeg.LIBJPEG_TURBO_VERSION_NUMBER >= 1005000
    assert f["library"]  # the file actually loaded, for whoever debugs a carried module
    # What is used follows from what the probes found in the loaded library.
    assert f["merged_upsampling"] == (f["merged_crop_fixed"] and f["merged_crop_safe_at_build"])
    assert f["workaround_669"] == (not f["crop_669_fixed"])
    if f["has_12bit_api"]:  # the jpeg12_* API came with 3.0, long after the 2.1.3 fix
        assert f["merged_crop_fixed"]
    assert set(_jpeg.get_limits()) == {"max_memory", "max_scans", "max_multiscan_pixels"}


def test_limits_can_be_set_checked_and_restored(restore_limits):
    defaults = _jpeg.default_limits()
    # Never below what the largest ImageNet photo (about 10,000 x 7,000) needs.
    assert defaults["max_multiscan_pixels"] >= 10_000 * 7_000
    assert defaults["max_memory"] >= 10_000 * 7_000 * 6  # 2-byte coefficients, 4:4:4
    assert 10 <= defaults["max_scans"] <= 1000  # libjpeg's progressive script writes 10
    before = _jpeg.get_limits()
    old = _jpeg.set_limits(max_scans=7)
    assert old == before and _jpeg.get_limits() == {**before, "max_scans": 7}
    _jpeg.set_limits(max_memory=None)  # None keeps a limit
    assert _jpeg.get_limits()["max_scans"] == 7
    for bad in ({"max_scans": 0}, {"max_memory": -1}, {"max_multiscan_pixels": 0}, {"max_scans": 2 ** 40}):
        with pytest.raises(ValueError):
            _jpeg.set_limits(**bad)
    with pytest.raises(TypeError):
        _jpeg.set_limits(max_scans="10")
    with pytest.raises(TypeError):
        _jpeg.set_limits(10)  # keyword-only
    assert _jpeg.get_limits()["max_scans"] == 7  # a refused call changes nothing
    _jpeg.set_limits(**old)
    assert _jpeg.get_limits() == before


def test_header_reports_multi_scan_not_progressive(rgb):
    """Sequential files with one scan per component buffer the whole image just like progressive
    ones: the flag that matters (and that the fourth field reports) is 'multi-scan'."""
    fx.require_encoder()
    data = fx.encode(rgb, scans="per_component")
    assert not Image.open(io.BytesIO(data)).info.get("progressive")
    assert _jpeg.header(data) == (320, 240, 3, 1)
    assert _jpeg.validate(data) == (320, 240, 3, 1)
    assert _jpeg.header(fx.encode(rgb)) == (320, 240, 3, 0)
    assert "multi_scan" in _jpeg.header.__doc__ and "progressive" not in _jpeg.header.__doc__.split("\n")[0]


# -- caller mistakes: plain ValueError, never "corrupt" -----------------------------------------

def test_caller_mistakes_raise_plain_value_error(baseline):
    buf = np.empty(320 * 240 * 3, np.uint8)
    ro = np.empty(320 * 240 * 3, np.uint8)
    ro.flags.writeable = False
    cases = {
        "denom": lambda: _jpeg.decode_region(baseline, 0, 0, 10, 10, 3, buf),
        "empty box": lambda: _jpeg.decode_region(baseline, 0, 0, 0, 10, 1, buf),
        "negative": lambda: _jpeg.decode_region(baseline, -1, 0, 10, 10, 1, buf),
        "x outside": lambda: _jpeg.decode_region(baseline, 320, 0, 10, 10, 1, buf),
        "y outside": lambda: _jpeg.decode_region(baseline, 0, 240, 10, 10, 8, buf),
        "x + w overflows int": lambda: _jpeg.decode_region(baseline, 2 ** 31 - 1, 0, 2 ** 31 - 1, 10, 8, buf),
        "too small": lambda: _jpeg.decode_region(baseline, 0, 0, 320, 240, 1, np.empty(100, np.uint8)),
        "read-only bytes": lambda: _jpeg.decode_region(baseline, 0, 0, 10, 10, 1, bytes(10000)),
        "read-only array": lambda: _jpeg.decode_region(baseline, 0, 0, 10, 10, 1, ro),
        "not contiguous": lambda: _jpeg.decode_region(baseline, 0, 0, 10, 10, 1,
                                                      np.empty((100, 200, 3), np.uint8)[:, ::2]),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError) as e:
            call()
        assert type(e.value) is ValueError, (name, e.value)  # not CorruptJPEG: the loader must raise it
    with pytest.raises(ValueError, match="read-only"):
        cases["read-only array"]()
    with pytest.raises(ValueError, match="contiguous"):
        cases["not contiguous"]()
    with pytest.raises(TypeError):  # not a buffer at all
        _jpeg.decode_region(baseline, 0, 0, 10, 10, 1, None)


def test_box_past_the_edges_is_clipped_without_overflow(baseline):
    buf = np.empty(320 * 240 * 3, np.uint8)
    # x + w and y + h beyond int: clipped to the image, not wrapped around.
    left, top, width, rows = _jpeg.decode_region(baseline, 300, 200, 2 ** 31 - 1, 2 ** 31 - 1, 1, buf, False)
    assert left <= 300 and left + width == 320 and (top, rows) == (200, 40)
    ref = decode_full(baseline)
    got = buf[: width * rows * 3].reshape(rows, width, 3)
    assert np.array_equal(got[:, 1:-1], ref[200:, left + 1:-1])


# -- damaged data is corrupt, in decode_region and validate ------------------------------------

def _damaged(baseline: bytes, progressive: bytes) -> dict[str, bytes]:
    return {
        "truncated": baseline[: len(baseline) // 2],
        "missing EOI": fx.strip_eoi(baseline),
        "scan cut short, then EOI": fx.cut_scan(baseline),
        "progressive scan cut short, then EOI": fx.cut_scan(progressive, scan=2),
        "progressive Huffman damage": fx.damage_entropy(progressive, scan=3),
        "scan sent twice": fx.duplicate_scan(progressive, scan=0),
        "progressive SOS in a baseline file": fx.set_scan_params(baseline, 0, 1, 63),
        "zero width": fx.with_dimensions(baseline, 0, 240),
        "not a JPEG": b"hello, this is not a JPEG at all",
        "empty": b"",
    }


def test_damaged_files_are_corrupt_everywhere(baseline, progressive):
    buf = np.empty(320 * 240 * 3, np.uint8)
    for name, data in _damaged(baseline, progressive).items():
        with pytest.raises(_jpeg.CorruptJPEG):
            _jpeg.decode_region(data, 0, 0, 320, 240, 1, buf)
        for call in (lambda: _jpeg.validate(data), lambda: _jpeg.decode_scaled(data, 4, buf)):
            with pytest.raises(_jpeg.CorruptJPEG) as e:
                call()
            msg = str(e.value)
            assert msg.startswith(("truncated JPEG", "corrupt JPEG data", "bad JPEG header")), (name, msg)


def test_the_transcode_checks_as_validate_does(baseline, progressive):
    """add_restarts reads the coefficients through validate's checks, so the converter reads an
    indexed file's entropy-coded data once: every damaged file is corrupt, or (progressive, so
    multi-scan, so not transcoded) unsupported before its data is read; the converter then
    validates it."""
    files = {**_damaged(baseline, progressive),
             **{f"Huffman damage at {at}": fx.damage_entropy(baseline, at=at) for at in (0.05, 0.5, 0.99)}}
    for name, data in files.items():
        with pytest.raises((_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG)) as e:
            _jpeg.add_restarts(data, 4)
        msg = str(e.value)
        if isinstance(e.value, _jpeg.UnsupportedJPEG):
            assert _jpeg.header(data)[3], (name, msg)  # multi-scan
            continue
        assert msg.startswith(("truncated JPEG", "corrupt JPEG data", "bad JPEG header")), (name, msg)
        if name.startswith("Huffman"):
            assert "Huffman" in msg, (name, msg)
        with pytest.raises(_jpeg.CorruptJPEG):
            _jpeg.validate(data)


def test_validate_finds_damage_anywhere_in_a_baseline_scan(baseline):
    """libjpeg-turbo's fast Huffman decoder reads an invalid code as 0 without a warning;
    validate must still see 64 one-bits (never a valid code) wherever they are."""
    buf = np.empty(320 * 240 * 3, np.uint8)
    for at in (0.05, 0.5, 0.99):
        with pytest.raises(_jpeg.CorruptJPEG, match="Huffman"):
            _jpeg.validate(fx.damage_entropy(baseline, at=at))
        with pytest.raises(_jpeg.CorruptJPEG, match="Huffman"):  # the converter's validating decode
            _jpeg.decode_scaled(fx.damage_entropy(baseline, at=at), 8, buf)
    assert _jpeg.validate(baseline) == (320, 240, 3, 0)


def test_restart_marker_damage_is_corrupt(rgb):
    fx.require_encoder()
    data = fx.encode(rgb, restart_interval=4)
    rst = [i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    assert len(rst) > 10
    i = rst[len(rst) // 2]
    renumbered = data[:i + 1] + bytes([0xD0 + (data[i + 1] - 0xD0 + 4) % 8]) + data[i + 2:]
    dropped = data[:i] + data[i + 2:]
    buf = np.empty(320 * 240 * 3, np.uint8)
    assert np.array_equal(decode_full(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    for bad in (renumbered, dropped):
        with pytest.raises(_jpeg.CorruptJPEG, match="RST|marker"):
            _jpeg.decode_region(bad, 0, 0, 320, 240, 1, buf)
        with pytest.raises(_jpeg.CorruptJPEG, match="RST|marker"):
            _jpeg.validate(bad)
        with pytest.raises(_jpeg.CorruptJPEG, match="RST|marker"):
            _jpeg.decode_scaled(bad, 8, buf)
        with pytest.raises(_jpeg.CorruptJPEG, match="RST|marker"):
            _jpeg.add_restarts(bad, 2)


def test_harmless_quirks_still_decode(baseline):
    """Bytes between segments (common in real ImageNet files) and an all-zero SOS spectral
    selection (old baseline encoders) leave the pixels intact: accepted."""
    ref = decode_full(baseline)
    for quirk in (fx.insert_before_eoi(baseline, b"\x00" * 240), fx.set_scan_params(baseline, 0, 0, 0)):
        assert np.array_equal(decode_full(quirk), ref)
        assert _jpeg.validate(quirk) == (320, 240, 3, 0)
        assert np.array_equal(decode_scaled(quirk, 8), ref)
        assert np.array_equal(decode_full(_jpeg.add_restarts(quirk, 4)[0]), ref)


@pytest.mark.parametrize("num", [8, 4, 2, 1])
def test_decode_scaled_is_pillows_decode(rgb, num):
    """The converter's validating decode gives Pillow's pixels (accurate IDCT, fancy upsampling),
    at full size and at the DCT scales Pillow's draft also uses, for every sampling and for grey."""
    for data in (fx.pil_jpeg(rgb, subsampling=0), fx.pil_jpeg(rgb, subsampling=1), fx.pil_jpeg(rgb, subsampling=2),
                 fx.pil_jpeg(rgb[..., 0])):
        im = Image.open(io.BytesIO(data))
        im.draft(im.mode, (320 * num // 8, 240 * num // 8))
        assert np.array_equal(decode_scaled(data, num), np.asarray(im.convert("RGB"))), num


def test_decode_scaled_caller_mistakes(baseline):
    with pytest.raises(ValueError, match="too small"):
        _jpeg.decode_scaled(baseline, 8, np.empty(320 * 240 * 3 - 1, np.uint8))
    with pytest.raises(ValueError, match="scale_num"):
        _jpeg.decode_scaled(baseline, 9, np.empty(320 * 240 * 3 * 2, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        _jpeg.decode_scaled(baseline, 8, bytes(320 * 240 * 3))
    assert decode_scaled(baseline, 3).shape == (90, 120, 3)  # any eighth, not only Pillow's halvings


def test_pillow_accepts_what_validate_refuses(baseline):
    """Why the converter needs validate: Pillow decodes these to grey or garbage, silently."""
    for data in (fx.cut_scan(baseline), fx.damage_entropy(baseline)):
        Image.open(io.BytesIO(data)).load()
        with pytest.raises(_jpeg.CorruptJPEG):
            _jpeg.validate(data)


# -- unsupported: the caller falls back -------------------------------------------------------

def test_cmyk_and_ycck_are_unsupported_not_corrupt(rgb):
    cmyk = cmyk_jpeg(rgb)
    adobe = cmyk.index(b"Adobe")
    ycck = cmyk[:adobe + 11] + b"\x02" + cmyk[adobe + 12:]  # APP14 transform 2: YCCK
    buf = np.empty(320 * 240 * 3, np.uint8)
    for data in (cmyk, ycck):
        with pytest.raises(_jpeg.UnsupportedJPEG):
            _jpeg.decode_region(data, 0, 0, 320, 240, 1, buf)
        with pytest.raises(_jpeg.UnsupportedJPEG):
            _jpeg.decode_scaled(data, 8, buf)
        assert _jpeg.header(data)[2] == 4
        assert _jpeg.validate(data) == (320, 240, 4, 0)  # the converter repairs these


# -- decompression bombs, memory and scans --------------------------------------------------------

_BOMB_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))  # a regression fails, not the machine
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import numpy as np
    import jpeg_fixtures as fx
    from kernels import _jpeg
    kind, size = sys.argv[3], int(sys.argv[4])
    if kind == "progressive":
        data = fx.pil_jpeg(fx.photo(64, 48), quality=50, progressive=True)
    elif kind == "per_component":
        data = fx.encode(fx.photo(64, 48), scans="per_component")
    else:
        data = fx.pil_jpeg(fx.photo(64, 48), quality=50)
    data = fx.with_dimensions(data, size, size)
    if len(sys.argv) > 5:
        _jpeg.set_limits(**json.loads(sys.argv[5]))
    out = {"bytes": len(data)}
    buf = np.empty(1 << 20, np.uint8)
    for name, call in (("decode_region", lambda: _jpeg.decode_region(data, 0, 0, 400, 300, 8, buf)),
                       ("validate", lambda: _jpeg.validate(data)),
                       # a buffer for the claimed size at 1/8, as the converter allocates (untouched pages)
                       ("decode_scaled", lambda: _jpeg.decode_scaled(data, 1, np.empty(((size + 7) // 8) ** 2 * 3,
                                                                                       np.uint8)))):
        try:
            out[name] = ["ok", repr(call())]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    # VmHWM: ru_maxrss would report the parent's peak, which Linux carries across fork and exec.
    status = open("/proc/self/status").read()
    out["peak_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(out))
""")


def _bomb(kind: str, size: int, limits: dict | None = None) -> dict:
    if not sys.platform.startswith("linux"):
        pytest.skip("measures peak memory through /proc/self/status (Linux)")
    args = [sys.executable, "-c", _BOMB_SCRIPT, str(ROOT), str(HERE), kind, str(size)]
    if limits:
        args.append(json.dumps(limits))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("size", [16000, 32000, 65500])
def test_multi_scan_bombs_are_refused_before_allocating(size):
    """A ~1 KB progressive file claiming size^2 pixels: 750 MB to 12.5 GB of coefficient buffer
    if decoded. Refused from the header; the process never grows."""
    r = _bomb("progressive", size)
    assert r["bytes"] < 2000
    for call in ("decode_region", "validate", "decode_scaled"):
        assert r[call][0] == "CorruptJPEG" and "decompression bomb" in r[call][1], r
    assert r["peak_mb"] < 300, r


def test_sequential_multi_scan_bombs_are_refused_too():
    fx.require_encoder()
    r = _bomb("per_component", 16000)
    for call in ("decode_region", "validate", "decode_scaled"):
        assert r[call][0] == "CorruptJPEG" and "decompression bomb" in r[call][1], r
    assert r["peak_mb"] < 300, r


def test_memory_cap_backs_up_the_pixel_cap():
    r = _bomb("progressive", 16000, {"max_multiscan_pixels": 2 ** 40, "max_memory": 64 << 20})
    for call in ("decode_region", "validate", "decode_scaled"):
        assert r[call][0] == "CorruptJPEG" and "memory limit" in r[call][1], r
    assert r["peak_mb"] < 300, r


def test_single_scan_bomb_costs_neither_memory_nor_time():
    """A baseline file needs no whole-image buffer; its claimed size is just rows of nothing,
    and the first row past the data is a truncation."""
    r = _bomb("baseline", 65500)
    for call in ("decode_region", "validate", "decode_scaled"):
        assert r[call][0] == "CorruptJPEG", r
    assert r["peak_mb"] < 300, r


def test_scan_cap(progressive, restore_limits):
    n_scans = len(fx.scans(progressive))
    assert n_scans >= 6
    buf = np.empty(320 * 240 * 3, np.uint8)
    _jpeg.set_limits(max_scans=n_scans - 1)
    with pytest.raises(_jpeg.CorruptJPEG, match="scans"):
        _jpeg.decode_region(progressive, 0, 0, 320, 240, 1, buf)
    with pytest.raises(_jpeg.CorruptJPEG, match="scans"):
        _jpeg.validate(progressive)
    with pytest.raises(_jpeg.CorruptJPEG, match="scans"):
        _jpeg.decode_scaled(progressive, 8, buf)
    _jpeg.set_limits(max_scans=n_scans)
    _jpeg.decode_region(progressive, 0, 0, 320, 240, 1, buf)
    assert _jpeg.validate(progressive)[3] == 1


# -- pixels: the #669 workaround and the merged-upsampling guard ----------------------------------

SAMPLINGS = {"2x4": ((2, 4), (1, 1), (1, 1)), "4x2": ((4, 2), (1, 1), (1, 1)),
             "4:2:0": ((2, 2), (1, 1), (1, 1)), "4:2:2": ((2, 1), (1, 1), (1, 1))}


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("denom", [1, 2, 4, 8])
def test_cropped_decode_is_the_full_decode(rgb, sampling, denom):
    """libjpeg-turbo < 3.0 (#669) leaves part of each cropped row un-upsampled for 2x4 and 4x2
    sampling at scale 1/2 and 1/4 with exact upsampling: the pixels come from uninitialised
    memory. The crop must be the full decode's pixels, whatever the scratch held before."""
    fx.require_encoder()
    data = fx.encode(rgb, sampling=SAMPLINGS[sampling])
    ref = decode_full(data, denom).astype(int)
    for x, y, w, h in ((100, 40, 120, 100), (0, 0, 64, 64), (250, 100, 70, 140), (33, 17, 5, 3)):
        regions = []
        for fill in (0x00, 0xFF, 0x5A):
            buf = np.full(320 * 240 * 3, fill, np.uint8)
            left, top, width, rows = _jpeg.decode_region(data, x, y, w, h, denom, buf, False)
            assert left <= x // denom and left + width >= -(-(x + w) // denom) and top == y // denom
            regions.append(buf[: width * rows * 3].reshape(rows, width, 3).astype(int))
        assert all(np.array_equal(regions[0], r) for r in regions[1:]), (sampling, denom, (x, y, w, h))
        got, want = regions[0], ref[top:top + rows, left:left + width]
        # Fancy upsampling sees no neighbour beyond a cropped edge, so only the region's outer
        # columns may differ a little; everything inside is the full decode's pixels exactly.
        assert np.array_equal(got[:, 1:-1], want[:, 1:-1]), (sampling, denom, (x, y, w, h))
        assert np.abs(got - want).max() <= 32


def test_forced_669_workaround_decodes_full_rows(rgb, restore_features):
    """The workaround path (full-width rows, the box copied out) on any library."""
    fx.require_encoder()
    data = fx.encode(rgb, sampling=SAMPLINGS["2x4"])
    _jpeg._override(workaround_669=True)
    assert _jpeg.features()["workaround_669"]
    ref = decode_full(data, 2)
    buf = np.full(320 * 240 * 3, 0xEE, np.uint8)
    left, top, width, rows = _jpeg.decode_region(data, 101, 41, 120, 100, 2, buf, False)
    assert (left, top, width, rows) == (50, 20, 61, 51)  # exactly the box: no iMCU widening
    assert np.array_equal(buf[: width * rows * 3].reshape(rows, width, 3), ref[20:71, 50:111])
    assert (buf[width * rows * 3:] == 0xEE).all()
    if not _jpeg.features()["crop_669_fixed"]:
        with pytest.raises(ValueError, match="needs the #669 workaround"):
            _jpeg._override(workaround_669=False)


@pytest.mark.parametrize("merged", [True, False])
def test_fast_crops_write_only_their_region(rgb, merged, restore_features):
    """libjpeg-turbo < 2.1.3 (#574): plain 4:2:0 upsampling with a crop copied whole uncropped
    rows into the caller's buffer. Every fast crop, into an exactly sized buffer, leaves the
    bytes after it alone; with plain upsampling off (the fallback) the pixels are the exact
    upsampling's."""
    if merged and not _jpeg.features()["merged_crop_fixed"]:
        pytest.skip("the loaded libjpeg lacks the 2.1.3 fix: merged upsampling stays off")
    _jpeg._override(merged_upsampling=merged)
    assert _jpeg.features()["merged_upsampling"] == merged
    data = fx.pil_jpeg(rgb, subsampling="4:2:0")
    rng = np.random.default_rng(4)
    for _ in range(40):
        x, y = int(rng.integers(0, 300)), int(rng.integers(0, 220))
        w, h, d = int(rng.integers(1, 320 - x)), int(rng.integers(1, 240 - y)), int(rng.choice([1, 2, 4, 8]))
        probe = np.empty(320 * 240 * 3, np.uint8)
        left, top, width, rows = _jpeg.decode_region(data, x, y, w, h, d, probe, True)
        n = width * rows * 3
        buf = np.full(n + 4096, 0xC3, np.uint8)
        assert _jpeg.decode_region(data, x, y, w, h, d, buf[:n], True) == (left, top, width, rows)
        assert (buf[n:] == 0xC3).all(), (x, y, w, h, d)
        assert np.array_equal(buf[:n], probe[:n])
        if not merged:
            exact = np.empty_like(probe)
            _jpeg.decode_region(data, x, y, w, h, d, exact, False)
            assert np.abs(probe[:n].astype(int) - exact[:n]).max() <= 8  # only the IDCT differs


def test_override_never_enables_an_unsafe_path(restore_features):
    f = _jpeg.features()
    if not f["merged_crop_fixed"]:
        with pytest.raises(ValueError, match="unsafe"):
            _jpeg._override(merged_upsampling=True)
    _jpeg._override(merged_upsampling=False, workaround_669=True)
    _jpeg._override()
    assert _jpeg.features() == f


# -- fuzzing ------------------------------------------------------------------------------------

def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_jpeg", HERE / "fuzz" / "fuzz_jpeg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_target_short_run(tmp_path):
    """A few thousand mutants of the generated seeds through the fuzz target's invariants."""
    fuzz = _fuzz_module()
    limits = _jpeg.get_limits()
    corpus = list(fuzz.seed_inputs().values())
    assert len(corpus) >= 30
    stats = fuzz.run_mutations(corpus, 4000, seed=7, crash_dir=tmp_path)
    assert _jpeg.get_limits() == limits  # restored
    # The mutants reach every outcome, or the run tests little.
    assert {"corrupt", "decoded+valid", "caller-error", "unsupported+valid"} <= set(stats), stats


def test_fuzz_target_under_atheris(tmp_path):
    pytest.importorskip("atheris")
    fuzz = _fuzz_module()
    fuzz.make_corpus(tmp_path / "corpus")
    r = subprocess.run([sys.executable, str(HERE / "fuzz" / "fuzz_jpeg.py"), "-runs=3000", "-seed=1",
                        f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # libFuzzer counts the corpus inputs it replays at start among its runs, so the total can pass
    # -runs (it printed "Done 3061 runs" with this corpus of 65 files).
    done = re.search(r"Done (\d+) runs", r.stderr)
    assert done and int(done.group(1)) >= 3000, r.stderr[-1000:]
