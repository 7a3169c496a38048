"""Shard loader: `from pipeline import Loader`."""
from __future__ import annotations

import torch

from .backends import BACKENDS, register_backend, resolve_backend
from .loader import LoaderConfig, dist_rank_world
from .source import ShardError
from .stats import LoaderStats

__all__ = ["Loader", "LoaderConfig", "LoaderStats", "ShardError", "BACKENDS", "register_backend"]


def Loader(shards, split: str = "train", batch_size: int = 256, image_size: int = 224, backend: str = "auto",
           device: str = "cuda", workers: int = 8, seed: int = 49, rank: int | None = None,
           world_size: int | None = None, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True,
           normalize: bool = True, **options):
    """Build a loader over `shards` (a directory with manifest.json, a manifest URL, or a brace
    pattern of tar paths/URLs). Extra `options` are LoaderConfig fields (drop_last, prefetch,
    worker_mode, shuffle_buffer, val_resize, fast_dct, mean, std)."""
    rank, world_size = dist_rank_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if batch_size < 1 or image_size < 8:
        raise ValueError("batch_size must be >= 1 and image_size >= 8")
    unknown = set(options) - set(LoaderConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"Loader: unknown option(s) {', '.join(sorted(unknown))}")
    cfg = LoaderConfig(split=split, batch_size=batch_size, image_size=image_size, device=str(device),
                       workers=workers, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
                       channels_last=channels_last, normalize=normalize, **options)
    return BACKENDS[resolve_backend(backend, cfg.device)](shards, cfg)
