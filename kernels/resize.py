"""Crop + antialiased bilinear resize + optional horizontal flip, straight into a batch slot.

The filter is Pillow's BILINEAR resize with a `box` (a triangle widened by the downscale factor,
so downscaling is antialiased, as torchvision's `antialias=True` is). Three implementations:

- `kernels._resize` (C, `kernels/_resize.c`): the same arithmetic with explicit SIMD, AVX-512
  or AVX2 + FMA chosen at run time (one build serves both kinds of machine), and a portable C
  path. On one core (AMD EPYC, `benchmarks.resize`): 5.3x the numba kernel with AVX-512 and
  4.1x with AVX2 on 256 px images, 2.8x and 2.3x on full-size ones (their larger downscales
  take the slower by-pixel horizontal pass).
- the numba kernel below: the reference the C paths are tested against, and what runs where
  the extension is not built or the CPU has neither AVX2 nor AVX-512 (numba compiles for the
  machine it runs on, and is as fast as the portable C path).
- `resize_crop_reference`: Pillow, what both are compared with, and what runs with
  RESNET_SHARDS_COMPILE=0.

`RESNET_SHARDS_RESIZE` (or `resize_crop_into(..., path=)`) picks one: `auto` (default: the
best SIMD path, else numba), `numba`, `avx512`, `avx2` or `portable` (to test a path, or to
measure an AVX2-only machine on an AVX-512 one).

How the C paths' output may differ from the numba kernel's: both compute the weights in double
and store them as float32, sum the vertical pass in float32 in the same tap order, add 0.5 and
truncate. The SIMD paths fuse each multiply-add (as numba's fastmath does on a CPU with FMA);
the portable path rounds the product and the sum separately. A value therefore differs only
where a float32 sum lands within a rounding error of an integer: by one level, on a handful of
values per image at most. Measured: the SIMD paths differ on none of the 800,000 values of
tests/test_resize_simd.py's cases and on 2 of 1.5 million values of random crops of noise; the
portable path on 20 and 6. Against Pillow (fixed-point arithmetic, 8-bit rounding between the
passes) every path is within one level.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import compiled_enabled

try:
    from . import _resize
except ImportError:  # not built (setup.py's optional extension): the numba kernel runs
    _resize = None

PATH_ENV = "RESNET_SHARDS_RESIZE"
MAX_SIDE = 65535  # JPEG's limit; kernels._resize's too
PATHS = ("auto", "numba", "avx512", "avx2", "portable")
# The C extension's SIMD paths this CPU runs, best first; "auto" takes the first, else numba.
SIMD_PATHS = tuple(p for p in (_resize.isas() if _resize is not None else ()) if p != "portable")

_kernel = None


def _build_kernel():
    import numba

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def coeffs(in0, in_len, in_size, out_size):
        scale = in_len / out_size
        filterscale = max(scale, 1.0)
        support = filterscale
        ksize = int(math.ceil(support)) * 2 + 1
        first = np.zeros(out_size, np.int32)
        count = np.zeros(out_size, np.int32)
        weights = np.zeros((out_size, ksize), np.float32)
        for xx in range(out_size):
            center = in0 + (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size) - xmin
            total = 0.0
            for x in range(xmax):
                w = 1.0 - abs((x + xmin - center + 0.5) / filterscale)
                if w < 0.0:
                    w = 0.0
                weights[xx, x] = w
                total += w
            if total > 0:
                for x in range(xmax):
                    weights[xx, x] /= total
            first[xx] = xmin
            count[xx] = max(xmax, 0)
        return first, count, weights

    @numba.njit(nogil=True, cache=True, fastmath=True)
    def resize_crop(src, x0, y0, w, h, out, flip):
        in_h, in_w = src.shape[0], src.shape[1]
        out_h, out_w = out.shape[0], out.shape[1]
        fx, cx, kx = coeffs(x0, w, in_w, out_w)
        fy, cy, ky = coeffs(y0, h, in_h, out_h)
        col_lo = fx[0]
        col_hi = fx[out_w - 1] + cx[out_w - 1]
        n = (col_hi - col_lo) * 3
        # Rows as flat (W * 3) vectors: scalar indexing, no per-pixel views.
        s2 = src.reshape(in_h, in_w * 3)
        o2 = out.reshape(out_h, out_w * 3)
        # Vertical pass first, over whole (contiguous, vectorizable) spans of the crop's columns:
        # it carries most of the arithmetic; the horizontal pass then runs on out_h rows only.
        tmp = np.empty((out_h, n), np.float32)
        for oy in range(out_h):
            trow = tmp[oy]
            trow[:] = 0.0
            for k in range(cy[oy]):
                wt = ky[oy, k]
                srow = s2[fy[oy] + k, col_lo * 3:col_hi * 3]
                for i in range(n):
                    trow[i] += wt * srow[i]
        for oy in range(out_h):
            trow = tmp[oy]
            orow = o2[oy]
            for ox in range(out_w):
                a0 = np.float32(0.5)
                a1 = np.float32(0.5)
                a2 = np.float32(0.5)
                j = (fx[ox] - col_lo) * 3
                for k in range(cx[ox]):
                    wt = kx[ox, k]
                    a0 += wt * trow[j]
                    a1 += wt * trow[j + 1]
                    a2 += wt * trow[j + 2]
                    j += 3
                d = 3 * (out_w - 1 - ox) if flip else 3 * ox
                orow[d] = np.uint8(min(max(a0, 0.0), 255.0))
                orow[d + 1] = np.uint8(min(max(a1, 0.0), 255.0))
                orow[d + 2] = np.uint8(min(max(a2, 0.0), 255.0))

    return resize_crop


def resize_crop_reference(src: np.ndarray, box: tuple[float, float, float, float], out: np.ndarray,
                          flip: bool) -> None:
    """Pillow: crop `box` = (x0, y0, w, h) of src (H, W, 3) uint8, resize to out's shape, flip."""
    from PIL import Image

    x0, y0, w, h = box
    im = Image.fromarray(np.ascontiguousarray(src), "RGB")
    im = im.resize((out.shape[1], out.shape[0]), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out[...] = np.asarray(im)


def resize_path(path: str | None = None) -> str:
    """The kernel `resize_crop_into` runs: `path`, else $RESNET_SHARDS_RESIZE, else "auto"
    (the best SIMD path of kernels._resize, else "numba"). ValueError for an unknown name or a
    C path that is not built or that this CPU lacks."""
    requested = path or os.environ.get(PATH_ENV) or "auto"
    if requested == "auto":
        return SIMD_PATHS[0] if SIMD_PATHS else "numba"
    if requested == "numba" or (requested in SIMD_PATHS) or (requested == "portable" and _resize is not None):
        return requested
    where = "path" if path else PATH_ENV
    if requested not in PATHS:
        raise ValueError(f"{where}={requested!r}: expected one of {', '.join(PATHS)}")
    if _resize is None:
        raise ValueError(f"{where}={requested!r}: kernels._resize is not built (see setup.py); use auto or numba")
    raise ValueError(f"{where}={requested!r}: this CPU runs only {', '.join(SIMD_PATHS + ('portable', 'numba'))}")


def check_args(src: np.ndarray, box, out: np.ndarray) -> None:
    """The arguments kernels._resize accepts, checked for the numba kernel (which would read or
    write out of bounds on them): C-contiguous (H, W, 3) and writable (OH, OW, 3) uint8 arrays,
    none of them empty or over 65535 pixels on a side, and a finite box of positive size inside
    the image, give or take one pixel (a region decoded at a DCT scale may round the box's far
    edge up by that much)."""
    for name, a in (("src", src), ("out", out)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.size == 0:
            raise ValueError(f"resize_crop: {name} must be a non-empty (rows, columns, 3) uint8 array, "
                             f"not {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        if max(a.shape[:2]) > MAX_SIDE:
            raise ValueError(f"resize_crop: {name} must be at most {MAX_SIDE} pixels on a side, not {a.shape}")
    if not (src.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("resize_crop: src and out must be C-contiguous, and out writable")
    x0, y0, w, h = (float(v) for v in box)
    in_h, in_w = src.shape[:2]
    if not (all(map(math.isfinite, (x0, y0, w, h))) and w > 0 and h > 0 and x0 >= -1 and y0 >= -1
            and x0 + w <= in_w + 1 and y0 + h <= in_h + 1):
        raise ValueError(f"resize_crop: box {(x0, y0, w, h)} must have a positive size and lie inside the "
                         f"{in_w} x {in_h} image (up to one pixel past an edge)")


def resize_crop_into(src: np.ndarray, box: tuple[float, float, float, float], out: np.ndarray,
                     flip: bool, path: str | None = None) -> None:
    """Write the resized (and flipped) crop `box` = (x0, y0, w, h) of src (H, W, 3) uint8 into out
    (OH, OW, 3) uint8, with the compiled kernel `resize_path(path)` names (Pillow if compilation
    is off). ValueError for arrays of the wrong kind or a box outside the image."""
    global _kernel
    if not compiled_enabled():
        return resize_crop_reference(src, box, out, flip)
    which = resize_path(path)
    x0, y0, w, h = box
    if which != "numba":
        _resize.resize_crop(src, x0, y0, w, h, out, flip, which)
        return
    check_args(src, box, out)
    if _kernel is None:
        _kernel = _build_kernel()
    _kernel(src, float(x0), float(y0), float(w), float(h), out, bool(flip))


def warmup() -> None:
    """Compile the numba kernel (or load it from numba's cache) before worker processes fork,
    where it is the one that runs, so each worker does not pay the compile on its first batch."""
    if compiled_enabled():
        src = np.zeros((4, 4, 3), np.uint8)
        resize_crop_into(src, (0.0, 0.0, 4.0, 4.0), np.zeros((2, 2, 3), np.uint8), False)
