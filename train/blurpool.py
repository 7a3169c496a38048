"""BlurPool: anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant
Again"; the antialiased-cnns package). A strided conv samples its input without a low-pass
filter, so small shifts of the image change the features; blurring with a binomial filter first
removes the frequencies the stride would alias.

`BlurPool(channels, stride)` is antialiased-cnns' `BlurPool(filt_size=3, pad_type='reflect')`: a
depthwise [1, 2, 1] x [1, 2, 1] / 16 filter on the reflect-padded input, sampled at `stride`.
`apply_blurpool(model)` puts one in front of every strided conv with at least 16 input channels,
as FFCV's ResNet-50 recipe does (the 3-channel stem conv keeps its stride):

- a k x k conv (k > 1) keeps its stride and gets the blur at stride 1 before it (FFCV's
  BlurPoolConv2d: blur, then the strided conv);
- a 1 x 1 conv (ResNet's downsample shortcut) runs at stride 1 after a stride-`s` BlurPool, which
  is the same function (a 1 x 1 conv commutes with subsampling) for a quarter of the blur's work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BINOMIAL_3 = (1.0, 2.0, 1.0)
MIN_CHANNELS = 16  # FFCV's threshold: the RGB stem conv is left alone


class BlurPool(torch.nn.Module):
    """Depthwise 3 x 3 binomial blur of a reflect-padded input, then sampling at `stride`."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        if channels < 1 or stride < 1:
            raise ValueError(f"BlurPool needs channels >= 1 and stride >= 1, got {channels} and {stride}")
        self.channels, self.stride = channels, stride
        a = torch.tensor(BINOMIAL_3)
        filt = (a[:, None] * a[None, :]) / (a.sum() ** 2)
        # Not persistent: a constant, so checkpoints hold only what training changes.
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reflection needs two pixels; a 1-pixel map (a tiny image deep in the net) repeats its edge.
        x = F.pad(x, (1, 1, 1, 1), mode="reflect" if min(x.shape[-2:]) > 1 else "replicate")
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


def blurred(conv: torch.nn.Conv2d) -> torch.nn.Sequential:
    """`conv` with anti-aliasing in front of its stride (see the module docstring for the two forms)."""
    stride = conv.stride[0]
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        conv.stride = (1, 1)
        return torch.nn.Sequential(BlurPool(conv.in_channels, stride), conv)
    return torch.nn.Sequential(BlurPool(conv.in_channels, 1), conv)


def apply_blurpool(model: torch.nn.Module, min_channels: int = MIN_CHANNELS) -> int:
    """Anti-alias every strided conv of `model` with at least `min_channels` inputs, in place.
    Returns how many convs were changed."""
    changed = 0
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= min_channels:
            if child.stride[0] != child.stride[1]:
                raise ValueError(f"apply_blurpool: {name} has an anisotropic stride {child.stride}")
            setattr(model, name, blurred(child))
            changed += 1
        else:
            changed += apply_blurpool(child, min_channels)
    return changed
