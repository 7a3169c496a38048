"""Checkpoints with the seed's keys (epoch, arch, state_dict, best_acc1, optimizer) plus what an
exact resume needs: the precision state (fp32 master weights, loss scale), the loader position,
the RNG state, the global step and the resolved config.

This module is the only place that reads, writes or lists checkpoints, so another store (object
storage) plugs in here alone. A run folder holds `checkpoint.pth.tar` (the newest) and
`checkpoint.prev.pth.tar` (the one before it, kept so a damaged newest file still leaves a
checkpoint to resume from), and `model_best.pth.tar`.

Writes are atomic (temp file, fsync, rename). Reads use `torch.load(weights_only=True)`: a
checkpoint holds only tensors and plain containers, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

NEWEST = "checkpoint.pth.tar"
PREVIOUS = "checkpoint.prev.pth.tar"
BEST = "model_best.pth.tar"

# What torch.load raises on a truncated, empty or foreign file.
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError)


def _write_synced(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _write_synced(obj, tmp)
    os.replace(tmp, path)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a written checkpoint (model_best from checkpoint, as the seed does) atomically."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save(state: dict, output: str | os.PathLike) -> str:
    """Write `state` as the run folder's newest checkpoint; the one it replaces becomes the
    previous one. Returns the path written. At every moment the folder holds a complete newest
    or previous checkpoint: the new file is complete before any rename."""
    out = Path(output)
    tmp = out / f".{NEWEST}.partial"
    _write_synced(state, tmp)
    if (out / NEWEST).exists():
        os.replace(out / NEWEST, out / PREVIOUS)
    os.replace(tmp, out / NEWEST)
    return str(out / NEWEST)


def save_best(output: str | os.PathLike) -> str:
    """Copy the newest checkpoint to model_best (the same bytes: no second serialization)."""
    copy_atomic(Path(output) / NEWEST, Path(output) / BEST)
    return str(Path(output) / BEST)


def candidates(output: str | os.PathLike) -> list[str]:
    """The run folder's checkpoints that exist, newest first."""
    return [str(Path(output) / n) for n in (NEWEST, PREVIOUS) if (Path(output) / n).is_file()]


def peek(path: str | os.PathLike) -> dict:
    """{"step", "epoch", "batch"} of a checkpoint, without reading its tensors: memory-mapped, so
    only the file's index and pickle are read. Raises one of UNREADABLE for a damaged file."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"step": int(state["step"]), "epoch": int(state["epoch"]), "batch": int(state["loader"]["batch"])}


def newest(output: str | os.PathLike) -> tuple[str, dict] | None:
    """(path, peek of it) of the newest checkpoint in `output` that is complete, or None. A
    damaged file is skipped with a warning naming it, and the previous checkpoint is used."""
    for path in candidates(output):
        try:
            return path, peek(path)
        except UNREADABLE as e:
            warnings.warn(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          f"trying the one before it", RuntimeWarning, stacklevel=2)
    return None


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def strip_module_prefix(state_dict: dict) -> dict:
    """Accept checkpoints saved from DDP / DataParallel models ('module.' keys)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
