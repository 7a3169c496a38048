"""Backend registry: name -> factory(shards, cfg), each building a `BatchLoader` (see
pipeline.contract).

Backends that need optional packages import them inside their factory and fail with a message
naming the package to install.
"""
from __future__ import annotations

from typing import Callable

from .contract import LoaderConfig
from .source import open_split

BACKENDS: dict[str, Callable] = {}


def register_backend(name: str):
    def deco(factory: Callable) -> Callable:
        BACKENDS[name] = factory
        return factory
    return deco


@register_backend("cpu")
def _cpu(shards, cfg: LoaderConfig):
    from .cpu import CpuLoader

    return CpuLoader(open_table(shards, cfg), cfg)


@register_backend("nvjpeg")
def _nvjpeg(shards, cfg: LoaderConfig):
    from .nvjpeg import NvjpegLoader

    return NvjpegLoader(open_table(shards, cfg), cfg)


@register_backend("dali")
def _dali(shards, cfg: LoaderConfig):
    from .dali import DaliLoader, import_dali

    import_dali()  # name the missing package before any work
    return DaliLoader(open_table(shards, cfg), cfg)


@register_backend("resident")
def _resident(shards, cfg: LoaderConfig):
    from .resident import ResidentLoader

    return ResidentLoader(open_table(shards, cfg), cfg)


@register_backend("synthetic")
def _synthetic(shards, cfg: LoaderConfig):
    from .synthetic import SyntheticLoader

    samples, classes = 1_281_167, 1000  # ImageNet's train split, when no shards are given
    if shards is not None:
        table = open_split(shards, cfg.split)
        samples, classes = len(table), table.num_classes or 1000
    return SyntheticLoader(cfg, samples, classes)


def open_table(shards, cfg: LoaderConfig):
    """`source.open_split`, with the node-local shard cache of `cfg` attached to a table of object
    storage shards (`cfg.cache_dir`; other tables read their shards where they are)."""
    table = open_split(shards, cfg.split)
    if cfg.cache_dir is not None and table.ranged:
        from .shard_cache import ShardCache, parse_size

        if cfg.cache_fill not in ("ranged", "wait"):
            raise ValueError(f"cache_fill {cfg.cache_fill!r}: expected 'ranged' or 'wait'")
        table.cache = ShardCache(cfg.cache_dir, parse_size(cfg.cache_limit), table.urls, table.shard_bytes,
                                 table.shard_sha256, wait=cfg.cache_fill == "wait")
    return table


def resolve_backend(name: str, device: str) -> str:
    """'auto' picks the CPU backend: the device-side backends (nvjpeg, dali) are chosen by name
    until they have been measured on a GPU (see benchmarks/RESULTS.md)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r}: choose one of {', '.join(sorted(BACKENDS))} or 'auto'")
        return name
    return "cpu"
