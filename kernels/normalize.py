"""uint8 NHWC batch -> normalized NCHW tensor in channels_last memory, on whatever device the
batch is on.

NHWC-contiguous memory *is* NCHW in channels_last layout, so the permute is free and the
output keeps the layout the model wants without a copy. The arithmetic is x * 1/(255 std) -
mean/std in float32, then a cast to the output dtype (bf16/fp16 lose nothing that matters: the
inputs are 8-bit).
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def affine_constants(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) shaped (1, 3, 1, 1) so that (x_uint8 * scale + shift) == (x/255 - mean)/std."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    return scale, -mean_t / std_t


def normalize_nhwc(images: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                   dtype: torch.dtype, channels_last: bool = True) -> torch.Tensor:
    """images: (B, H, W, 3) uint8. Returns (B, 3, H, W) in `dtype` (uint8 when scale is None)."""
    x = images.permute(0, 3, 1, 2)  # a view: NCHW shape, channels_last strides
    if scale is None:
        out = x
    else:
        out = x.to(torch.float32).mul_(scale).add_(shift)  # elementwise ops keep channels_last
        if dtype != torch.float32:
            out = out.to(dtype)
    if not channels_last:
        out = out.contiguous()
    return out
