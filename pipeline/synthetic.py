"""The synthetic backend: one device-resident random batch, yielded `len` times.

It has the same contract, batch counts and output spec as the shard backends (the same plan
sizes: equal train steps on every rank, val split exactly once), so a training run on it
measures the model alone, with no loader cost (the DeepLearningExamples `synthetic` backend).
The batch is made once at the schedule's largest size; a smaller epoch (progressive resizing)
yields a view of its first elements, as the cpu backend's host slots do.
"""
from __future__ import annotations

import torch

from kernels.normalize import affine_constants, normalize_nhwc

from . import plan
from .contract import LoaderConfig
from .planned import ResumableLoader
from .stats import LoaderStats
from .workers import packed


class SyntheticLoader(ResumableLoader):
    def __init__(self, cfg: LoaderConfig, num_samples: int, num_classes: int = 1000):
        super().__init__()
        self.cfg = cfg
        self.stats = LoaderStats()
        self.dataset_samples = num_samples
        self._num_classes = num_classes
        w, b = cfg.world_size, cfg.batch_size
        self._sizes_at: dict[int, list[int]] = {}
        if not self._sizes or min(self._sizes) == 0:
            raise ValueError(f"synthetic: {num_samples} samples give no batch of {b} on each of {w} rank(s)")
        device = torch.device(cfg.device)
        g = torch.Generator().manual_seed(cfg.seed)
        side = cfg.max_size
        raw = torch.randint(0, 256, (b, side, side, 3), generator=g, dtype=torch.uint8)
        scale, shift = affine_constants(cfg.mean, cfg.std, device) if cfg.normalize else (None, None)
        dtype = cfg.dtype if cfg.normalize else torch.uint8
        self.images = normalize_nhwc(raw.to(device), scale, shift, dtype, cfg.channels_last)
        self.labels = torch.randint(0, num_classes, (b,), generator=g).to(device)
        self.stats.device_bytes = self.images.numel() * self.images.element_size()

    @property
    def _sizes(self) -> list[int]:
        """The shard backends' batch sizes in the current epoch (the order does not matter here)."""
        c, offset = self.cfg, self._offset
        if offset not in self._sizes_at:
            batches = plan.train_batches_local(self.dataset_samples, c.seed, 0, c.rank, c.world_size, c.batch_size,
                                               c.drop, offset) if c.train \
                else plan.val_batches(self.dataset_samples, c.rank, c.world_size, c.batch_size)
            self._sizes_at = {offset: [len(ids) for ids in batches]}
        return self._sizes_at[offset]

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def num_samples(self) -> int:
        return sum(self._sizes)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _plan_key(self) -> dict:
        c = self.cfg
        return {"seed": c.seed, "world_size": c.world_size, "batch_size": c.batch_size,
                "samples": self.dataset_samples, "split": c.split, "drop_last": c.drop}

    def _images_at(self, size: int) -> torch.Tensor:
        """The batch at `size`: a view of the first elements of the one allocation, in its layout."""
        x = self.images
        if x.shape[2] == size:
            return x
        if self.cfg.channels_last:
            return packed(x.permute(0, 2, 3, 1), size).permute(0, 3, 1, 2)
        return x.reshape(-1)[:x.shape[0] * 3 * size * size].view(x.shape[0], 3, size, size)

    def __iter__(self):
        self._start()
        images = self._images_at(self.image_size)
        while self._position < len(self._sizes):
            n = self._sizes[self._position]
            self._position += 1
            self.stats.batches += 1
            self.stats.samples += n
            yield images[:n], self.labels[:n]
