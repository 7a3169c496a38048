"""Progressive resizing: the image size as a pure function of the epoch (`ResolutionSchedule`).

FFCV's ImageNet recipes train at a low resolution first and ramp to the final one near the end
(160 px -> 192 px), which is where most of their time to accuracy comes from. The size here
follows FFCV's `get_resolution`: `start` up to epoch `start_epoch`, `end` from `end_epoch` on, and
in between a linear interpolation rounded to a multiple of `step`.

The size depends on nothing but the epoch, so a resumed run, every backend and every DDP rank
compute the same size for the same epoch without talking to each other. A backend sizes its host
slots and device buffers for `max_size` once, and uses a prefix of them at smaller sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_SIZE = 8


@dataclass(frozen=True)
class ResolutionSchedule:
    """`start` px until epoch `start_epoch`, `end` px from epoch `end_epoch`, a linear ramp between
    them rounded to a multiple of `step` (FFCV rounds to 32) and kept within [start, end]."""

    start: int
    end: int
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32

    def __post_init__(self):
        for name in ("start", "end", "start_epoch", "end_epoch", "step"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"ResolutionSchedule.{name} must be an int, got {getattr(self, name)!r}")
        if min(self.start, self.end) < MIN_SIZE:
            raise ValueError(f"ResolutionSchedule: sizes must be >= {MIN_SIZE}, got {self.start} -> {self.end}")
        if not 0 <= self.start_epoch <= self.end_epoch:
            raise ValueError(f"ResolutionSchedule: need 0 <= start_epoch <= end_epoch, got "
                             f"{self.start_epoch} and {self.end_epoch}")
        if self.step < 1:
            raise ValueError(f"ResolutionSchedule: step must be >= 1, got {self.step}")

    @classmethod
    def constant(cls, size: int) -> "ResolutionSchedule":
        return cls(size, size)

    @property
    def fixed(self) -> bool:
        return self.start == self.end

    @property
    def max_size(self) -> int:
        """The largest size of any epoch: what buffers are allocated for."""
        return max(self.start, self.end)

    def size(self, epoch: int) -> int:
        """The image side of epoch `epoch`."""
        if epoch <= self.start_epoch:
            return self.start
        if epoch >= self.end_epoch:
            return self.end
        t = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        size = int(round((self.start + t * (self.end - self.start)) / self.step)) * self.step
        lo, hi = sorted((self.start, self.end))
        return min(max(size, lo), hi)

    def sizes(self, epochs: int) -> list[int]:
        """The size of each of epochs 0 .. epochs - 1."""
        return [self.size(e) for e in range(epochs)]

    def describe(self) -> str:
        if self.fixed:
            return f"{self.end} px"
        return (f"{self.start} px to epoch {self.start_epoch}, ramp to {self.end} px by epoch {self.end_epoch} "
                f"(steps of {self.step})")


def as_schedule(image_size) -> ResolutionSchedule:
    """An int size (a constant schedule) or a ResolutionSchedule, as a ResolutionSchedule."""
    if isinstance(image_size, ResolutionSchedule):
        return image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int or a ResolutionSchedule, got {image_size!r}")
    if image_size < MIN_SIZE:
        raise ValueError(f"image_size must be >= {MIN_SIZE}, got {image_size}")
    return ResolutionSchedule.constant(image_size)
