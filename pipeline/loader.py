"""`create_loader`: build the loader that a backend name picks, from the registry
(`pipeline.backends`). What the shard backends share lives in `pipeline.planned`.
"""
from __future__ import annotations

import os
import warnings

import torch

from .backends import BACKENDS, resolve_backend
from .contract import BatchLoader, LoaderConfig
from .resolution import ResolutionSchedule, as_schedule


def dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, else from torch.distributed, else from the environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def create_loader(shards, split: str = "train", batch_size: int = 256, image_size: int | ResolutionSchedule = 224,
                  backend: str = "auto", device: str = "cuda", workers: int = 8, seed: int = 49,
                  rank: int | None = None, world_size: int | None = None, dtype: torch.dtype = torch.bfloat16,
                  channels_last: bool = True, normalize: bool = True, **options) -> BatchLoader:
    """A loader over `shards` (a folder with manifest.json, a manifest URL, an object store prefix
    `s3://bucket/prefix` or `gs://...`, or a brace pattern of tar paths/URLs) for one split, from
    the backend `backend` names ("auto", "cpu", "nvjpeg", "dali", "synthetic"). Extra `options`
    are LoaderConfig fields (drop_last, prefetch, worker_mode, start_method, shuffle_buffer, scale,
    ratio, val_resize, fast_dct, dct_scaling, max_open_shards, mean, std). The result honours the
    `BatchLoader` contract. `image_size` is a side in pixels, or a `ResolutionSchedule` (progressive
    resizing: `set_epoch` then selects the size too)."""
    rank, world_size = dist_rank_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    as_schedule(image_size)  # a clear error for a bad size or schedule, before any work
    if options.get("block_shuffle", 0) < 0 or options.get("fetch_ahead", 0) < 0:
        raise ValueError("block_shuffle (shards per block) and fetch_ahead must be >= 0")
    unknown = set(options) - set(LoaderConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"create_loader: unknown option(s) {', '.join(sorted(unknown))}")
    cfg = LoaderConfig(split=split, batch_size=batch_size, image_size=image_size, device=str(device),
                       workers=workers, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
                       channels_last=channels_last, normalize=normalize, **options)
    loader = BACKENDS[resolve_backend(backend, cfg.device)](shards, cfg)
    if not isinstance(loader, BatchLoader):
        raise TypeError(f"backend {backend!r} built a {type(loader).__name__}, which lacks the BatchLoader contract")
    return loader


def Loader(*args, **kwargs) -> BatchLoader:
    """Deprecated name of `create_loader` (it is a function, not a class)."""
    warnings.warn("pipeline.Loader is now pipeline.create_loader", DeprecationWarning, stacklevel=2)
    return create_loader(*args, **kwargs)
