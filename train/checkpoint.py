"""Checkpoints with the seed's keys (epoch, arch, state_dict, best_acc1, optimizer) plus what an
exact resume needs: the precision state (fp32 master weights, loss scale), the loader position,
the RNG states, the global step and the resolved config.

Writes are atomic (temp file, fsync, rename). Reads use `torch.load(weights_only=True)`: a
checkpoint holds only tensors and plain containers, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a written checkpoint (model_best from checkpoint, as the seed does) atomically."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def strip_module_prefix(state_dict: dict) -> dict:
    """Accept checkpoints saved from DDP / DataParallel models ('module.' keys)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
