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

    return CpuLoader(open_split(shards, cfg.split), cfg)


@register_backend("nvjpeg")
def _nvjpeg(shards, cfg: LoaderConfig):
    from .nvjpeg import NvjpegLoader

    return NvjpegLoader(open_split(shards, cfg.split), cfg)


@register_backend("dali")
def _dali(shards, cfg: LoaderConfig):
    from .dali import DaliLoader, import_dali

    import_dali()  # name the missing package before any work
    return DaliLoader(open_split(shards, cfg.split), cfg)


@register_backend("resident")
def _resident(shards, cfg: LoaderConfig):
    from .resident import ResidentLoader

    return ResidentLoader(open_split(shards, cfg.split), cfg)


@register_backend("synthetic")
def _synthetic(shards, cfg: LoaderConfig):
    from .synthetic import SyntheticLoader

    samples, classes = 1_281_167, 1000  # ImageNet's train split, when no shards are given
    if shards is not None:
        table = open_split(shards, cfg.split)
        samples, classes = len(table), table.num_classes or 1000
    return SyntheticLoader(cfg, samples, classes)


def resolve_backend(name: str, device: str) -> str:
    """'auto' picks the CPU backend: the device-side backends (nvjpeg, dali) are chosen by name
    until they have been measured on a GPU (see benchmarks/RESULTS.md)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r}: choose one of {', '.join(sorted(BACKENDS))} or 'auto'")
        return name
    return "cpu"
