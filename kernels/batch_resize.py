"""One launch for a whole batch: crop + antialiased bilinear resize + flip + normalize, from
variable-size decoded images to the normalized NHWC (channels_last) batch the model reads.

The decoded images of a batch (planar CHW uint8, as nvJPEG returns them) are packed into one
flat buffer; a table gives each image's offset and size, its flip and its filter taps per axis,
and a second its crop box (left, top, w, h, in source pixels). Each program computes a block
of output pixels of one image with the same filter as Pillow's BILINEAR resize with a box (a
triangle widened by the downscale factor, weights normalised per axis), so it matches the CPU
backend, and writes
(x / 255 - mean) / std straight in the output dtype. torchvision's v2 transforms draw one
random parameter set per batch, so they cannot do this per sample.

`batch_crop_resize_reference` is the plain version (Pillow per image) the tests compare with;
the Triton kernel runs on CUDA, and under TRITON_INTERPRET=1 on the CPU for tests.
"""
from __future__ import annotations

import numpy as np
import torch

from . import compiled_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


if triton is not None:
    @triton.jit
    def _crop_resize_kernel(src_ptr, table_ptr, boxes_ptr, out_ptr, scale_ptr, shift_ptr,
                            OH: tl.constexpr, OW: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = idx < OH * OW
        oy = idx // OW
        ox = idx % OW
        base = tl.load(table_ptr + b * 6 + 0)
        height = tl.load(table_ptr + b * 6 + 1)
        width = tl.load(table_ptr + b * 6 + 2)
        flip = tl.load(table_ptr + b * 6 + 3)
        KX = tl.load(table_ptr + b * 6 + 4)  # this image's taps: one large image does not slow the rest
        KY = tl.load(table_ptr + b * 6 + 5)
        x0 = tl.load(boxes_ptr + b * 4 + 0)
        y0 = tl.load(boxes_ptr + b * 4 + 1)
        bw = tl.load(boxes_ptr + b * 4 + 2)
        bh = tl.load(boxes_ptr + b * 4 + 3)
        sx = bw / OW
        sy = bh / OH
        fx = tl.maximum(sx, 1.0)
        fy = tl.maximum(sy, 1.0)
        cx = x0 + (ox.to(tl.float32) + 0.5) * sx
        cy = y0 + (oy.to(tl.float32) + 0.5) * sy
        # Pillow's bounds: int() truncation, clamped to the image.
        xmin = tl.maximum((cx - fx + 0.5).to(tl.int32), 0)
        xmax = tl.minimum((cx + fx + 0.5).to(tl.int32), width)
        ymin = tl.maximum((cy - fy + 0.5).to(tl.int32), 0)
        ymax = tl.minimum((cy + fy + 0.5).to(tl.int32), height)
        swx = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, KX):
            x = xmin + k
            w = tl.maximum(1.0 - tl.abs((x.to(tl.float32) - cx + 0.5) / fx), 0.0)
            swx += tl.where(x < xmax, w, 0.0)
        swy = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, KY):
            y = ymin + k
            w = tl.maximum(1.0 - tl.abs((y.to(tl.float32) - cy + 0.5) / fy), 0.0)
            swy += tl.where(y < ymax, w, 0.0)
        plane = height.to(tl.int64) * width
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for ky in range(0, KY):
            y = ymin + ky
            wy = tl.maximum(1.0 - tl.abs((y.to(tl.float32) - cy + 0.5) / fy), 0.0)
            wy = tl.where(y < ymax, wy, 0.0)
            row = base + y.to(tl.int64) * width
            for kx in range(0, KX):
                x = xmin + kx
                wx = tl.maximum(1.0 - tl.abs((x.to(tl.float32) - cx + 0.5) / fx), 0.0)
                ok = live & (y < ymax) & (x < xmax)
                wgt = tl.where(ok, wx * wy, 0.0)
                p = row + x
                acc0 += wgt * tl.load(src_ptr + p, mask=ok, other=0).to(tl.float32)
                acc1 += wgt * tl.load(src_ptr + p + plane, mask=ok, other=0).to(tl.float32)
                acc2 += wgt * tl.load(src_ptr + p + 2 * plane, mask=ok, other=0).to(tl.float32)
        norm = 1.0 / tl.maximum(swx * swy, 1e-12)
        dx = tl.where(flip != 0, OW - 1 - ox, ox)
        o = (b.to(tl.int64) * OH * OW + oy * OW + dx) * 3  # NHWC: the channels_last batch
        tl.store(out_ptr + o, acc0 * norm * tl.load(scale_ptr) + tl.load(shift_ptr), mask=live)
        tl.store(out_ptr + o + 1, acc1 * norm * tl.load(scale_ptr + 1) + tl.load(shift_ptr + 1), mask=live)
        tl.store(out_ptr + o + 2, acc2 * norm * tl.load(scale_ptr + 2) + tl.load(shift_ptr + 2), mask=live)

    @triton.jit
    def _normalize_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        c = i % 3
        v = tl.load(x_ptr + i, mask=m, other=0).to(tl.float32)
        tl.store(out_ptr + i, v * tl.load(scale_ptr + c, mask=m, other=0.0) + tl.load(shift_ptr + c, mask=m, other=0.0),
                 mask=m)


def pack(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, out_size: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Planar (3, H, W) uint8 images -> (flat buffer, (B, 6) int64 table of offset, height,
    width, flip, taps x, taps y)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = [int(t.numel()) for t in images]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else np.zeros(0, np.int64)
    # Pillow's filter support is the downscale factor: a window spans at most 2 x factor + 2 pixels.
    taps = np.ceil(2 * np.maximum(boxes[:, 2:4] / out_size, 1.0)).astype(np.int64) + 2
    table = np.zeros((len(images), 6), np.int64)
    table[:, 0] = offsets
    table[:, 1] = [t.shape[1] for t in images]
    table[:, 2] = [t.shape[2] for t in images]
    table[:, 3] = np.asarray(flips, dtype=np.int64)
    table[:, 4:6] = taps
    flat = torch.cat([t.reshape(-1) for t in images]) if images else torch.zeros(0, dtype=torch.uint8)
    return flat, torch.from_numpy(table)


def _use_triton(device: torch.device) -> bool:
    return triton is not None and compiled_enabled() and device.type == "cuda"


def batch_crop_resize(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, out_size: int,
                      scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype,
                      force_kernel: bool = False) -> torch.Tensor:
    """(B, 3, S, S) channels_last batch in `dtype` from planar uint8 images on one device.

    scale/shift: (1, 3, 1, 1) from kernels.normalize.affine_constants. `force_kernel` runs the
    Triton kernel off CUDA too (with TRITON_INTERPRET=1: the CPU tests).
    """
    device = images[0].device
    if not (force_kernel or _use_triton(device)):
        return batch_crop_resize_reference(images, boxes, flips, out_size, scale, shift, dtype)
    flat, table = pack(images, boxes, flips, out_size)
    table = table.to(device)
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=device)
    b = len(images)
    out = torch.empty((b, out_size, out_size, 3), dtype=dtype, device=device)
    block = 128
    grid = (b, triton.cdiv(out_size * out_size, block))
    _crop_resize_kernel[grid](flat, table, boxes_t, out, scale.reshape(3).float().contiguous(),
                              shift.reshape(3).float().contiguous(), OH=out_size, OW=out_size, BLOCK=block)
    return out.permute(0, 3, 1, 2)


def batch_crop_resize_reference(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, out_size: int,
                                scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per image on the host: the numba/Pillow resize, then the same normalization."""
    from .normalize import normalize_nhwc
    from .resize import resize_crop_into

    host = np.empty((len(images), out_size, out_size, 3), np.uint8)
    for i, t in enumerate(images):
        hwc = np.ascontiguousarray(t.cpu().numpy().transpose(1, 2, 0))
        resize_crop_into(hwc, tuple(float(v) for v in boxes[i]), host[i], bool(flips[i]))
    x = torch.from_numpy(host).to(images[0].device if images else "cpu")
    return normalize_nhwc(x, scale.to(x.device), shift.to(x.device), dtype, channels_last=True)


def normalize_nhwc_fused(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype,
                         force_kernel: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) channels_last in `dtype`, one pass over memory on CUDA."""
    from .normalize import normalize_nhwc

    if not (force_kernel or _use_triton(images.device)):
        return normalize_nhwc(images, scale, shift, dtype, channels_last=True)
    x = images.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    block = 1024
    _normalize_kernel[(triton.cdiv(n, block),)](x, out, scale.reshape(3).float().contiguous(),
                                                shift.reshape(3).float().contiguous(), n, BLOCK=block)
    return out.permute(0, 3, 1, 2)
