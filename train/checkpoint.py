"""Checkpoints with the seed's keys (epoch, arch, state_dict, best_acc1, optimizer) plus what an
exact resume needs: the precision state (fp32 master weights, loss scale), the loader position,
the RNG state, the global step and the resolved config.

This module is the only place that reads, writes or lists checkpoints. A run folder holds
`checkpoint.pth.tar` (the newest) and `checkpoint.prev.pth.tar` (the one before it, kept so a
damaged newest file still leaves a checkpoint to resume from), and `model_best.pth.tar`.

The run folder may be an object store prefix (`--output s3://bucket/run`). The log, metrics and
TensorBoard files are then written in a local mirror (`local_folder`) and uploaded with each
checkpoint; a checkpoint is written locally, then uploaded with one PUT (readers see the old
object or all of the new one), after a server-side copy has made the newest the previous one.

Writes are atomic (temp file, fsync, rename; a PUT). Reads use `torch.load(weights_only=True)`: a
checkpoint holds only tensors and plain containers, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import pickle
import posixpath
import shutil
import warnings
from pathlib import Path

import torch

from pipeline import objstore

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


def is_remote(output: str | os.PathLike) -> bool:
    """Whether the run folder is an object store prefix (s3://, gs://)."""
    return objstore.is_object_url(str(output))


def local_folder(output: str | os.PathLike) -> Path:
    """Where this process writes the run's files: the run folder itself, or for an object store
    prefix a local mirror (under the user's cache, named after the URL; `RESNET_RUN_CACHE`
    overrides the cache folder)."""
    if not is_remote(output):
        return Path(output)
    scheme, bucket, key = objstore.split_url(str(output))
    cache = os.environ.get("RESNET_RUN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "resnet-shards" / "runs"
    return Path(cache) / scheme / bucket / key.strip("/")


def _url(output, name: str) -> str:
    return f"{str(output).rstrip('/')}/{name}"


def save(state: dict, output: str | os.PathLike) -> str:
    """Write `state` as the run folder's newest checkpoint; the one it replaces becomes the
    previous one. Returns the path written. At every moment the folder holds a complete newest
    or previous checkpoint: the new file is complete before any rename (a PUT, for a bucket:
    the newest is first copied to the previous one in the bucket). For a bucket, the run's log,
    metrics and TensorBoard files are uploaded after it."""
    out = local_folder(output)
    tmp = out / f".{NEWEST}.partial"
    _write_synced(state, tmp)
    if not is_remote(output):
        if (out / NEWEST).exists():
            os.replace(out / NEWEST, out / PREVIOUS)
        os.replace(tmp, out / NEWEST)
        return str(out / NEWEST)
    try:
        if objstore.exists(_url(output, NEWEST)):
            objstore.copy(_url(output, NEWEST), _url(output, PREVIOUS))
        objstore.put_file(tmp, _url(output, NEWEST))
    finally:
        tmp.unlink(missing_ok=True)  # the bucket holds it; a resume downloads what it reads
    upload_record(output)
    return _url(output, NEWEST)


# The run's record beside its checkpoints in a bucket (the files train.run writes); a resume
# continues the appended ones.
APPENDED = ("metrics.jsonl", "train.log")
RECORD = ("config.json", *APPENDED)


def upload_record(output: str | os.PathLike) -> None:
    """Copy the local mirror's log, metrics, config and TensorBoard files to the bucket (each a
    whole-object PUT); nothing for a local run folder."""
    if not is_remote(output):
        return
    out = local_folder(output)
    files = [out / n for n in RECORD] + sorted((out / "tensorboard").glob("*"))
    for f in files:
        if f.is_file():
            objstore.put_file(f, _url(output, f.relative_to(out).as_posix()))


def fetch_record(output: str | os.PathLike) -> None:
    """Before a resume from a bucket: download the log and metrics the local mirror lacks (a
    restart on another machine), so they continue rather than start over."""
    if not is_remote(output):
        return
    out = local_folder(output)
    for name in APPENDED:
        if not (out / name).exists() and objstore.exists(_url(output, name)):
            objstore.get_file(_url(output, name), out / name)


def save_best(output: str | os.PathLike) -> str:
    """Copy the newest checkpoint to model_best (the same bytes: no second serialization)."""
    if is_remote(output):
        objstore.copy(_url(output, NEWEST), _url(output, BEST))
        return _url(output, BEST)
    copy_atomic(Path(output) / NEWEST, Path(output) / BEST)
    return str(Path(output) / BEST)


def candidates(output: str | os.PathLike) -> list[str]:
    """The run folder's checkpoints that exist, newest first."""
    if is_remote(output):
        return [u for u in (_url(output, NEWEST), _url(output, PREVIOUS)) if objstore.exists(u)]
    return [str(Path(output) / n) for n in (NEWEST, PREVIOUS) if (Path(output) / n).is_file()]


# Checkpoints in a bucket, downloaded once in this process: URL -> local file.
_downloaded: dict[str, Path] = {}


def _local_copy(url: str) -> Path:
    """A local file with the object's bytes (downloaded atomically, once per process)."""
    if url not in _downloaded:
        scheme, bucket, key = objstore.split_url(url)
        folder = local_folder(f"{scheme}://{bucket}/{posixpath.dirname(key)}")
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / f".resume-{os.getpid()}-{posixpath.basename(key)}"
        objstore.get_file(url, local)
        _downloaded[url] = local
    return _downloaded[url]


def _forget(path: str) -> None:
    """Delete this process's download of a checkpoint in a bucket (nothing for a local path)."""
    local = _downloaded.pop(path, None)
    if local is not None:
        local.unlink(missing_ok=True)


def peek(path: str | os.PathLike) -> dict:
    """{"step", "epoch", "batch"} of a checkpoint, without reading its tensors: memory-mapped, so
    only the file's index and pickle are read. Raises one of UNREADABLE for a damaged file."""
    if is_remote(path):
        path = _local_copy(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"step": int(state["step"]), "epoch": int(state["epoch"]), "batch": int(state["loader"]["batch"])}


def newest(output: str | os.PathLike) -> tuple[str, dict] | None:
    """(path, peek of it) of the newest checkpoint in `output` that is complete, or None. A
    damaged file is skipped with a warning naming it, and the previous checkpoint is used."""
    for path in candidates(output):
        try:
            return path, peek(path)
        except UNREADABLE as e:
            _forget(str(path))
            warnings.warn(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          f"trying the one before it", RuntimeWarning, stacklevel=2)
    return None


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint's state, from a file or a bucket (`s3://.../checkpoint.pth.tar`)."""
    if is_remote(path):
        try:
            local = _local_copy(str(path))
        except objstore.ObjectNotFound:
            raise FileNotFoundError(f"--resume {path}: no such checkpoint") from None
        try:
            return torch.load(local, map_location=map_location, weights_only=True)
        finally:
            _forget(str(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def strip_module_prefix(state_dict: dict) -> dict:
    """Accept checkpoints saved from DDP / DataParallel models ('module.' keys)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
