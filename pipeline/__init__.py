"""Shard loader: `from pipeline import create_loader`.

Submodules load on first use, so the converters can import `pipeline.shard_format` (the one
owner of the on-disk format) without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "create_loader": "loader", "Loader": "loader", "LoaderConfig": "contract", "BatchLoader": "contract",
    "LoaderStats": "stats", "ShardError": "shard_format", "ManifestError": "shard_format",
    "BACKENDS": "backends", "register_backend": "backends", "Transform": "augment",
    "ResolutionSchedule": "resolution",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
