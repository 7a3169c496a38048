"""Crop + antialiased bilinear resize + optional horizontal flip, straight into a batch slot.

The compiled version is a numba kernel with the same filter as Pillow's BILINEAR resize with a
`box` (a triangle filter widened by the downscale factor, so downscaling is antialiased, as
torchvision's `antialias=True` is). It releases the GIL and writes into the caller's buffer, so
there is no intermediate image and no copy. `resize_crop_reference` is the Pillow version the
tests compare it with.
"""
from __future__ import annotations

import math

import numpy as np

from . import compiled_enabled

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


def resize_crop_into(src: np.ndarray, box: tuple[float, float, float, float], out: np.ndarray,
                     flip: bool) -> None:
    """Write the resized (and flipped) crop of src into out, using the compiled kernel if enabled."""
    global _kernel
    if not compiled_enabled():
        return resize_crop_reference(src, box, out, flip)
    if _kernel is None:
        _kernel = _build_kernel()
    x0, y0, w, h = box
    _kernel(src, float(x0), float(y0), float(w), float(h), out, bool(flip))


def warmup() -> None:
    """Compile (or load from numba's cache) before worker processes fork, so each worker does
    not pay the compile on its first batch."""
    if compiled_enabled():
        src = np.zeros((4, 4, 3), np.uint8)
        resize_crop_into(src, (0.0, 0.0, 4.0, 4.0), np.zeros((2, 2, 3), np.uint8), False)
