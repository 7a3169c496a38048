"""What each sample becomes (`Transform`, the one description every backend follows), and its
per-sample parameters from a counter-based RNG.

Sample `i` of epoch `e` draws its crop and flip from uniforms keyed on (seed, epoch, i), not
from a generator's running state, so the parameters do not depend on which worker decodes the
sample, in which order, or whether the run was resumed. The crop follows torchvision's
`RandomResizedCrop.get_params` exactly (ten tries, then the central-crop fallback), given the
same uniforms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# torchvision's RandomResizedCrop defaults, which the seed (pytorch/examples' imagenet) uses.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# The eval resize of the same recipe: the shorter side to size * 256 / 224, then a centre crop.
EVAL_RESIZE_RATIO = 256 / 224

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ATTEMPTS = 10
_UNIFORMS = 4 * _ATTEMPTS + 1  # (scale, log-ratio, top, left) per try, then the flip


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, ids: np.ndarray, n: int, stream: int = 0) -> np.ndarray:
    """(len(ids), n) float64 uniforms in [0, 1), a pure function of (seed, epoch, id, stream, k)."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        key = _mix(key ^ (np.uint64(epoch & 0xFFFFFFFF) * _GOLDEN + np.uint64(stream)))
        base = _mix(key + np.asarray(ids, dtype=np.uint64) * _GOLDEN)
        ks = (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        z = _mix(base[:, None] ^ ks)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop(width: np.ndarray, height: np.ndarray, u: np.ndarray,
                        scale=RRC_SCALE, ratio=RRC_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised over samples.

    width, height: source sizes; u: (n, >= 40) uniforms. Returns (n, 4) int64 boxes as
    (left, top, w, h) in source pixels.
    """
    width = np.asarray(width, np.int64)
    height = np.asarray(height, np.int64)
    n = len(width)
    area = (width * height).astype(np.float64)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    out = np.zeros((n, 4), np.int64)
    done = np.zeros(n, bool)
    for t in range(_ATTEMPTS):
        us, ur, ui, uj = (u[:, 4 * t + k] for k in range(4))
        target_area = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect = np.exp(log_r0 + (log_r1 - log_r0) * ur)
        w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # round half to even, as Python's
        h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
        ok = ~done & (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # torch.randint(0, size - h + 1): uniform over the allowed offsets.
        top = np.floor(ui * (height - h + 1)).astype(np.int64)
        left = np.floor(uj * (width - w + 1)).astype(np.int64)
        out[ok] = np.stack([left, top, w, h], 1)[ok]
        done |= ok
    if not done.all():
        # The central-crop fallback, for images whose shape defeats ten tries.
        rest = ~done
        wr, hr = width[rest], height[rest]
        in_ratio = wr / hr
        w = wr.copy()
        h = hr.copy()
        lo, hi = in_ratio < min(ratio), in_ratio > max(ratio)
        h[lo] = np.round(w[lo] / min(ratio)).astype(np.int64)
        w[hi] = np.round(h[hi] * max(ratio)).astype(np.int64)
        out[rest] = np.stack([(wr - w) // 2, (hr - h) // 2, w, h], 1)
    return out


def train_params(seed: int, epoch: int, ids: np.ndarray, width: np.ndarray, height: np.ndarray,
                 scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n, 4) float64 as left, top, w, h; flips (n,) bool) for the train transform."""
    u = uniforms(seed, epoch, ids, _UNIFORMS)
    boxes = random_resized_crop(width, height, u, scale, ratio).astype(np.float64)
    return boxes, u[:, -1] < 0.5


def val_params(width: np.ndarray, height: np.ndarray, image_size: int, resize: int | None = None) -> np.ndarray:
    """Boxes of torchvision's Resize(resize) + CenterCrop(image_size), in source pixels.

    resize defaults to image_size * 256 / 224 (256 for 224). The box is the region of the
    source that the centre crop of the resized image covers, so one resize of the box gives
    the same pixels up to filter rounding.
    """
    resize = resize or eval_resize(image_size)
    width = np.asarray(width, np.float64)
    height = np.asarray(height, np.float64)
    short = np.minimum(width, height)
    # torchvision: the short side becomes `resize`, the long side int(resize * long / short).
    new_w = np.where(width <= height, resize, np.floor(resize * width / short))
    new_h = np.where(height <= width, resize, np.floor(resize * height / short))
    sx, sy = new_w / width, new_h / height
    crop = min(image_size, resize)
    top = np.round((new_h - crop) / 2.0)
    left = np.round((new_w - crop) / 2.0)
    return np.stack([left / sx, top / sy, crop / sx, crop / sy], 1)


def eval_resize(image_size: int) -> int:
    return int(round(image_size * EVAL_RESIZE_RATIO))


def padded_crop_params(seed: int, epoch: int, ids: np.ndarray, width: np.ndarray, height: np.ndarray, size: int,
                       padding: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomCrop(size, padding) (zero fill) and a flip, as boxes in source pixels:
    the box may reach `padding` pixels past the image, where the output is zero."""
    u = uniforms(seed, epoch, ids, 3)
    width, height = np.asarray(width, np.int64), np.asarray(height, np.int64)
    # torch.randint(0, padded - size + 1): uniform over the allowed offsets of the padded image.
    left = np.floor(u[:, 0] * np.maximum(width + 2 * padding - size + 1, 1)).astype(np.int64) - padding
    top = np.floor(u[:, 1] * np.maximum(height + 2 * padding - size + 1, 1)).astype(np.int64) - padding
    boxes = np.stack([left, top, np.full_like(left, size), np.full_like(top, size)], 1).astype(np.float64)
    return boxes, u[:, 2] < 0.5


def center_crop_boxes(width: np.ndarray, height: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop(size): the box, past the image (zero filled) when it is smaller."""
    width, height = np.asarray(width, np.float64), np.asarray(height, np.float64)
    left, top = np.round((width - size) / 2.0), np.round((height - size) / 2.0)
    return np.stack([left, top, np.full_like(left, size), np.full_like(top, size)], 1)


CROPS = ("resized", "padded")


@dataclass(frozen=True)
class Transform:
    """What each sample becomes, in every backend.

    crop "resized" (ImageNet): train is torchvision's RandomResizedCrop(size, scale, ratio) and
    RandomHorizontalFlip(0.5); eval is Resize(resize) and CenterCrop(size), resize = `val_resize`
    or size * 256 / 224.
    crop "padded" (CIFAR): train is RandomCrop(size, padding) with zero fill and
    RandomHorizontalFlip(0.5); eval is CenterCrop(size), with no resize.
    Both are expressed as a box in source pixels plus a flip, drawn by `params`; a backend only
    has to resize the box to size x size (antialiased; "padded" boxes are size x size, a plain
    copy), with zeros where the box leaves the image, and flip it.
    """

    size: int
    train: bool
    scale: tuple[float, float] = RRC_SCALE
    ratio: tuple[float, float] = RRC_RATIO
    val_resize: int | None = None
    crop: str = "resized"
    padding: int = 4  # "padded" only

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r}: expected one of {', '.join(CROPS)}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    @property
    def resizes(self) -> bool:
        """Whether boxes are resized (else every box is size x size and only copied)."""
        return self.crop == "resized"

    @property
    def resize(self) -> int:
        """The eval resize of the shorter side."""
        return self.val_resize or eval_resize(self.size)

    def params(self, seed: int, epoch: int, ids, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (n, 4) float64 as left, top, w, h in source pixels; flips (n,) bool) for samples
        `ids` (their RNG keys) of sizes (n, 2) as (width, height)."""
        sizes = np.asarray(sizes).reshape(-1, 2)
        w, h = sizes[:, 0], sizes[:, 1]
        if self.crop == "padded":
            if self.train:
                return padded_crop_params(seed, epoch, np.asarray(ids), w, h, self.size, self.padding)
            return center_crop_boxes(w, h, self.size), np.zeros(len(sizes), bool)
        if self.train:
            return train_params(seed, epoch, np.asarray(ids), w, h, self.scale, self.ratio)
        return val_params(w, h, self.size, self.resize), np.zeros(len(sizes), bool)
