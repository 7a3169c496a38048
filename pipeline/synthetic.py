"""The synthetic backend: one device-resident random batch, yielded `len` times.

It has the same contract and output spec as the real backends, so a training run on it
measures the model alone, with no loader cost (the DeepLearningExamples `synthetic` backend).
"""
from __future__ import annotations

import torch

from kernels.normalize import affine_constants, normalize_nhwc

from .stats import LoaderStats


class SyntheticLoader:
    def __init__(self, cfg, num_samples: int, num_classes: int = 1000):
        self.cfg = cfg
        self.epoch = 0
        self._position = self._resume = 0
        self.stats = LoaderStats()
        self.num_classes = num_classes
        self.num_samples = num_samples // cfg.world_size
        self._len = self.num_samples // cfg.batch_size if cfg.train else -(-self.num_samples // cfg.batch_size)
        if self._len == 0:
            raise ValueError(f"synthetic: {num_samples} samples give no batch of {cfg.batch_size}")
        device = torch.device(cfg.device)
        g = torch.Generator().manual_seed(cfg.seed)
        raw = torch.randint(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), generator=g,
                            dtype=torch.uint8).to(device)
        scale, shift = affine_constants(cfg.mean, cfg.std, device) if cfg.normalize else (None, None)
        dtype = cfg.dtype if cfg.normalize else torch.uint8
        self.images = normalize_nhwc(raw, scale, shift, dtype, cfg.channels_last)
        self.labels = torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)
        self.stats.device_bytes = self.images.numel() * self.images.element_size()

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._position = self._resume = 0
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "batch": self._position, "backend": "synthetic"}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = int(sd["epoch"])
        self._position = self._resume = int(sd["batch"])

    def __iter__(self):
        self._position, self._resume = self._resume, 0
        while self._position < self._len:
            self._position += 1
            self.stats.batches += 1
            self.stats.samples += self.cfg.batch_size
            yield self.images, self.labels

    def close(self) -> None:
        pass
