"""The one contract every loader backend honours (`BatchLoader`), and its configuration.

    len(loader)                      batches per epoch, identical on every rank (in an epoch resumed
                                     from another world size: this world's batches of what is left)
    loader.num_samples               samples this rank yields per epoch (val: its exactly-once share)
    loader.num_classes               classes of the dataset (None when the shards cannot tell)
    loader.set_epoch(e)              selects epoch e's order, augmentation and image size
    loader.image_size                the side of the current epoch's images (`image_size` may be a
                                     ResolutionSchedule: a pure function of the epoch)
    for images, labels in loader:    images (B, 3, H, W) on `device`, labels int64 on `device`
    loader.state_dict()              where to resume: right after the last batch this loader yielded
    loader.load_state_dict(sd)       the next iteration continues from there, bitwise as if uninterrupted;
                                     a train state from any rank of another world size continues the
                                     epoch's global order (each sample at most once across the worlds)
    loader.epoch_offset              samples of the current epoch's order other world sizes consumed
                                     before this loader's plan of it (0 unless the world changed)
    loader.stats                     a LoaderStats, fields meaning the same in every backend
    loader.close()                   frees workers, threads, maps and device buffers; idempotent

The state belongs to the backend: callers store it and hand it back unchanged, never edit it.
`tests/test_conformance.py` runs every registered backend through the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Protocol, runtime_checkable

import torch

from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD

from .augment import RRC_RATIO, RRC_SCALE, Transform
from .resolution import ResolutionSchedule, as_schedule
from .stats import LoaderStats


@runtime_checkable
class BatchLoader(Protocol):
    stats: LoaderStats

    @property
    def num_samples(self) -> int: ...

    @property
    def num_classes(self) -> int | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def epoch_offset(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoaderConfig:
    """Every loader option; `create_loader`'s keyword arguments are these fields."""

    split: str = "train"
    batch_size: int = 256
    image_size: int | ResolutionSchedule = 224  # a side in pixels, or one per epoch
    device: str = "cuda"
    workers: int = 8
    seed: int = 49
    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True
    normalize: bool = True
    drop_last: bool | None = None  # default: True for train, never for val
    prefetch: int = 2  # batches in flight per worker (cpu), or ahead of the consumer (nvjpeg, dali)
    worker_mode: str = "process"  # cpu backend: "process" or "thread"
    start_method: str | None = None  # process workers: None is fork, or forkserver once CUDA or threads run
    shuffle_buffer: int = 4096  # streamed (http) shards only
    crop: str = "resized"  # "resized": RandomResizedCrop / Resize + CenterCrop; "padded": CIFAR's RandomCrop
    scale: tuple = RRC_SCALE  # RandomResizedCrop area range
    ratio: tuple = RRC_RATIO  # RandomResizedCrop aspect range
    val_resize: int | None = None  # default image_size * 256 / 224
    padding: int = 4  # "padded": zero padding of the random crop
    # libjpeg's fast integer IDCT and plain chroma upsampling: ~4 % more train throughput here;
    # None means on for train (augmentation dwarfs the error) and off for val.
    fast_dct: bool | None = None
    # Decode at a reduced DCT scale (1/2, 1/4, 1/8) when that still covers the output; None means
    # on for train and off for val, whose pixels then match torchvision's Resize + CenterCrop.
    dct_scaling: bool | None = None
    # Object storage shards: a node-local folder of whole shards shared by the node's ranks and
    # workers (None: range requests only), its bound in bytes (None: none), and whether a sample of
    # a shard not yet cached waits for its download ("wait") or is read by range ("ranged").
    cache_dir: str | None = None
    cache_limit: int | None = None
    cache_fill: str = "ranged"
    # Train, random-access shards: 0 is a full permutation per epoch; k > 0 keeps each stretch of
    # the epoch within blocks of k shards (plan.block_permutation), for a cache smaller than the data.
    block_shuffle: int = 0
    # Object storage without a cached copy: batches whose ranges a worker fetches while it decodes.
    fetch_ahead: int = 2
    max_open_shards: int = 64  # shard files each process keeps mapped (an LRU): bounds open descriptors
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def schedule(self) -> ResolutionSchedule:
        return as_schedule(self.image_size)

    @property
    def max_size(self) -> int:
        """The largest image side of any epoch: what host slots and device buffers are sized for."""
        return self.schedule.max_size

    def size_at(self, epoch: int) -> int:
        return self.schedule.size(epoch)

    def transform_at(self, epoch: int) -> Transform:
        """What each sample of `epoch` becomes (its size is the schedule's for that epoch)."""
        return Transform(self.size_at(epoch), self.train, tuple(self.scale), tuple(self.ratio), self.val_resize,
                         self.crop, self.padding)

    @property
    def transform(self) -> Transform:
        """The transform at the largest size (what does not depend on the epoch: crop kind, split)."""
        return replace(self.transform_at(0), size=self.max_size)

    @property
    def use_fast_dct(self) -> bool:
        return self.train if self.fast_dct is None else self.fast_dct

    @property
    def use_dct_scaling(self) -> bool:
        return self.train if self.dct_scaling is None else self.dct_scaling

    @property
    def drop(self) -> bool:
        return self.train if self.drop_last is None else self.drop_last
