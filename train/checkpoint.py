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

Two kinds of failure are kept apart. A checkpoint whose bytes were read and are not a checkpoint
(truncated, empty, foreign) is damaged: `newest()` warns and falls back to the one before it. A
checkpoint that could not be read at all (a download that failed past its retries, access denied,
an I/O error) raises `CheckpointUnavailable`, naming it and the cause: it may be good, so neither an
older checkpoint nor a fresh start may take its place.
"""
from __future__ import annotations

import os
import pickle
import posixpath
import shutil
import socket
import warnings
from pathlib import Path

import torch

from pipeline import objstore
from pipeline.workers import process_alive

NEWEST = "checkpoint.pth.tar"
PREVIOUS = "checkpoint.prev.pth.tar"
BEST = "model_best.pth.tar"

# What torch.load (and `peek`) raise on bytes that are not a complete checkpoint: a truncated, empty
# or foreign file. Not OSError: a file or object that could not be read says nothing of its bytes.
DAMAGED = (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message names it and why. train.run stops on it
    with that message."""


class CheckpointUnavailable(OSError):
    """A checkpoint exists but could not be read (fetch failed, access denied, I/O error). It may be
    good: a run must stop rather than fall back to an older one or start afresh."""

    def __init__(self, path, cause: BaseException):
        why = objstore.describe(cause).splitlines()[0]
        super().__init__(f"checkpoint {objstore.redact(str(path))} could not be read ({why}); it may be intact, so "
                         f"the run neither falls back to an older checkpoint nor starts afresh: fix the cause and "
                         f"start it again")
        self.path = str(path)
        self.cause = cause


def _write_synced(obj: dict, path: Path) -> None:
    """Write `obj` to `path` and sync it. A disk that refuses the write (full, over quota) raises
    CheckpointError naming the folder and the cause, and leaves no partial file: torch.save reports
    it as a RuntimeError about the zip stream, its OSError only in the context."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        refused = objstore.local_write_failure(e)
        if refused is None:
            raise
        path.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint not written: {objstore.local_write_error(refused, path.parent)}; the "
                              f"checkpoints before it are intact (free space and resume)") from e


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
    """Before a resume from a bucket: bring the local mirror's log and metrics up to the bucket's,
    which is the record. The mirror may be missing them (a restart on another node) or hold an
    older copy (rank 0 back on a node it left): the bucket's copy replaces it, unless the local one
    is the bucket's plus lines written after its last upload (this node's own newer copy)."""
    if not is_remote(output):
        return
    out = local_folder(output)
    for name in APPENDED:
        try:
            remote = objstore.get(_url(output, name))
        except objstore.ObjectNotFound:
            continue  # never uploaded: the local copy, if any, is all there is
        local = out / name
        mine = local.read_bytes() if local.is_file() else None
        if mine is not None and mine.startswith(remote):
            continue
        tmp = out / f".{name}.partial"
        tmp.write_bytes(remote)
        os.replace(tmp, local)


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
_RESUME_PREFIX = ".resume-"


def _local_copy(url: str) -> Path:
    """A local file with the object's bytes (downloaded atomically, once per process), named after
    this host and process; a download a dead process of this host left behind is removed first."""
    if url not in _downloaded:
        scheme, bucket, key = objstore.split_url(url)
        folder = local_folder(f"{scheme}://{bucket}/{posixpath.dirname(key)}")
        folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_downloads(folder)
        local = folder / f"{_RESUME_PREFIX}{_host()}-{os.getpid()}-{posixpath.basename(key)}"
        objstore.get_file(url, local)
        _downloaded[url] = local
    return _downloaded[url]


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _remove_dead_downloads(folder: Path) -> None:
    """Delete `.resume-HOST-PID-*` files (and their partial downloads) of this host whose process is
    gone: a rank killed while resuming leaves one behind. Another host's files are left alone (its
    processes cannot be seen from here), and so is any file this code did not name."""
    host = _host()
    for f in folder.iterdir():
        name = f.name[1:] if f.name.startswith(".") and f.name.endswith(".partial") else f.name
        if not name.startswith(f"{_RESUME_PREFIX}{host}-"):
            continue
        pid = name[len(f"{_RESUME_PREFIX}{host}-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            f.unlink(missing_ok=True)


def _forget(path: str) -> None:
    """Delete this process's download of a checkpoint in a bucket (nothing for a local path)."""
    local = _downloaded.pop(path, None)
    if local is not None:
        local.unlink(missing_ok=True)


def _read(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """torch.load of a checkpoint file or object. Raises CheckpointUnavailable when it cannot be
    read, one of DAMAGED when its bytes are not a checkpoint."""
    try:
        local = _local_copy(str(path)) if is_remote(path) else path
        return torch.load(local, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as e:
        raise CheckpointUnavailable(path, e) from e


def peek(path: str | os.PathLike) -> dict:
    """{"step", "epoch", "batch"} of a checkpoint, without reading its tensors: memory-mapped, so
    only the file's index and pickle are read. Raises one of DAMAGED for a damaged file,
    CheckpointUnavailable for one that could not be read."""
    state = _read(path, mmap=True)
    return {"step": int(state["step"]), "epoch": int(state["epoch"]), "batch": int(state["loader"]["batch"])}


def newest(output: str | os.PathLike) -> tuple[str, dict] | None:
    """(path, peek of it) of the newest checkpoint in `output` that is complete, or None when there
    is none. A damaged file is skipped with a warning naming it, and the previous checkpoint is
    used. One that could not be read (or listed) raises CheckpointUnavailable: it may be the good
    newest one."""
    try:
        paths = candidates(output)
    except OSError as e:
        raise CheckpointUnavailable(_url(output, NEWEST) if is_remote(output) else Path(output) / NEWEST, e) from e
    for path in paths:
        try:
            return path, peek(path)
        except DAMAGED as e:
            _forget(str(path))
            warnings.warn(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          f"trying the one before it", RuntimeWarning, stacklevel=2)
    return None


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint's state, from a file or a bucket (`s3://.../checkpoint.pth.tar`). Raises
    FileNotFoundError when there is none, CheckpointUnavailable when it could not be read, one of
    DAMAGED when its bytes are not a checkpoint."""
    try:
        return _read(path, map_location)
    except CheckpointUnavailable as e:
        if isinstance(e.cause, FileNotFoundError):
            raise FileNotFoundError(f"--resume {path}: no such checkpoint") from None
        raise
    finally:
        _forget(str(path))


def strip_module_prefix(state_dict: dict) -> dict:
    """Accept checkpoints saved from DDP / DataParallel models ('module.' keys)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
