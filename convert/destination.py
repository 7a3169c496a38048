"""Where a conversion's output goes: a local folder, or a bucket (`--out s3://bucket/prefix`).

Shards are always written locally first, atomically (`ShardWriter`). For a bucket the local folder
is a staging folder: each finished shard is uploaded as soon as it is done (its index first, as a
local shard's index is renamed into place first) and then deleted locally, and `manifest.json` is
uploaded last, once every shard is in place, so a reader never sees a half-written dataset. Before
a rerun changes or removes a shard in the bucket, it deletes the bucket's manifest first.

Resume: the staging folder keeps the manifest of the run so far (as a local conversion does in its
output folder). A planned shard whose entry is there (or in the bucket's finished manifest) and
whose object is in the bucket at the entry's size is kept; a staged shard that was written but not
uploaded is uploaded. The bytes are the same whatever the destination.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline import objstore
from pipeline.shard_format import (MANIFEST_NAME, ManifestError, index_name, is_split_file, load_manifest,
                                   parse_manifest, partial_files, sha256_file, write_manifest)


class ConvertError(Exception):
    """A failure the user must fix (bad input directory, unwritable output, strict reject)."""


def destination(out: str | os.PathLike, staging: str | os.PathLike | None = None):
    """A LocalFolder for a path, a Bucket for an object store URL (staged in `staging`, by default
    a folder under the user's cache named after the URL)."""
    if objstore.is_object_url(str(out)):
        return Bucket(str(out), Path(staging) if staging is not None else default_staging(str(out)))
    return LocalFolder(Path(out))


def out_arg(value: str) -> Path | str:
    """The `--out` flag: a local folder, or an object store URL kept as it is (a Path would fold
    its `//`)."""
    return value if objstore.is_object_url(value) else Path(value)


OUT_HELP = "output folder, or s3://bucket/prefix (gs://...) to upload each finished shard, manifest.json last"
STAGING_HELP = ("with --out s3://...: local folder where shards are written before their upload and the "
                "run's state is kept for a resume (default: under ~/.cache/resnet-shards/staging)")


def default_staging(url: str) -> Path:
    """A stable local folder per output URL, so that a rerun of the same command resumes."""
    scheme, bucket, key = objstore.split_url(url)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "resnet-shards" / "staging" / scheme / bucket / key.strip("/")


class LocalFolder:
    """Shards and manifest written in place, in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = str(folder)

    def prepare(self) -> None:
        _prepare_folder(self.folder, f"--out {self.name}")

    def previous_entries(self) -> dict[str, dict]:
        """Finished shard entries of an earlier run into the same place, by name."""
        return _entries(self.folder)

    def still_valid(self, entry: dict | None, job) -> bool:
        return _staged_valid(self.folder, entry, job)

    def remove_unplanned(self, split: str, planned: set[str]) -> None:
        """Drop shards of this split that an earlier, differently planned run left behind."""
        _remove_local(self.folder, split, planned)

    def publish(self, name: str, entry: dict) -> None:
        pass  # the writer renamed it into place

    def write_manifest(self, manifest: dict) -> None:
        write_manifest(self.folder, manifest)


class Bucket:
    """Shards staged in `staging`, uploaded to `url` (a prefix) one by one, the manifest last."""

    def __init__(self, url: str, staging: Path):
        self.url = url.rstrip("/")
        self.name = url
        self.folder = staging
        self._objects: dict[str, int] = {}
        self._retracted = False

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except ImportError as e:
            raise ConvertError(f"--out {self.name}: {e}") from None
        except objstore.ObjectStoreError as e:
            raise ConvertError(f"--out {self.name}: {what} failed ({e})") from None

    def prepare(self) -> None:
        _prepare_folder(self.folder, f"--staging {self.folder}")
        probe = f"{self.url}/.write-test"
        self._call("writing", objstore.put, probe, b"")
        self._call("writing", objstore.remove, probe)
        self._objects = self._call("listing", objstore.listdir, self.url)

    def previous_entries(self) -> dict[str, dict]:
        """The staged manifest's entries; without one, the bucket's finished manifest's."""
        staged = _entries(self.folder)
        if staged or MANIFEST_NAME not in self._objects:
            return staged
        origin = f"{self.url}/{MANIFEST_NAME}"
        try:
            m = parse_manifest(self._call("reading", objstore.get, origin), origin)
        except ManifestError:
            return {}
        return {s["name"]: s for info in m["splits"].values() for s in info["shards"]}

    def still_valid(self, entry: dict | None, job) -> bool:
        if not entry or entry.get("plan") != job.plan or "labels" not in entry:
            return False
        idx = entry.get("index", "")
        if self._objects.get(job.name) == entry.get("bytes") and idx in self._objects:
            return True
        if _staged_valid(self.folder, entry, job):  # written, then interrupted before its upload
            self.publish(job.name, entry)
            return True
        return False

    def remove_unplanned(self, split: str, planned: set[str]) -> None:
        _remove_local(self.folder, split, planned)
        keep = planned | {index_name(n) for n in planned}
        for name in sorted(self._objects):
            if is_split_file(name, split) and name not in keep:
                self._retract()
                self._call("deleting", objstore.remove, f"{self.url}/{name}")
                del self._objects[name]

    def publish(self, name: str, entry: dict) -> None:
        """Upload a finished shard, its index first, and drop the staged copy."""
        self._retract()
        for obj in (entry["index"], name):
            path = self.folder / obj
            self._call("uploading", objstore.put_file, path, f"{self.url}/{obj}")
            self._objects[obj] = path.stat().st_size
        for obj in (entry["index"], name):
            (self.folder / obj).unlink()

    def write_manifest(self, manifest: dict) -> None:
        """Keep the staged manifest current; upload it once the conversion is complete, and then
        drop the staging folder."""
        write_manifest(self.folder, manifest)
        if manifest.get("complete"):
            self._call("uploading", objstore.put_file, self.folder / MANIFEST_NAME, f"{self.url}/{MANIFEST_NAME}")
            shutil.rmtree(self.folder, ignore_errors=True)

    def _retract(self) -> None:
        """Delete the bucket's manifest before the first change to a shard it may describe."""
        if not self._retracted and MANIFEST_NAME in self._objects:
            self._call("deleting", objstore.remove, f"{self.url}/{MANIFEST_NAME}")
            del self._objects[MANIFEST_NAME]
        self._retracted = True


def _prepare_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"{flag}: not writable ({e.strerror or e})") from None
    # Leftovers of a killed run: never under a final name, always safe to drop.
    for stale in partial_files(folder):
        stale.unlink(missing_ok=True)


def _entries(folder: Path) -> dict[str, dict]:
    if not (folder / MANIFEST_NAME).exists():
        return {}
    try:
        m = load_manifest(folder)
    except ManifestError:
        return {}
    return {s["name"]: s for info in m["splits"].values() for s in info["shards"]}


def _staged_valid(folder: Path, entry: dict | None, job) -> bool:
    if not entry or entry.get("plan") != job.plan or "labels" not in entry:
        return False
    tar, idx = folder / job.name, folder / entry.get("index", "")
    if not tar.is_file() or not idx.is_file() or tar.stat().st_size != entry.get("bytes"):
        return False
    return sha256_file(tar) == entry.get("sha256")


def _remove_local(folder: Path, split: str, planned: set[str]) -> None:
    keep = planned | {index_name(n) for n in planned}
    for p in folder.iterdir():
        if is_split_file(p.name, split) and p.name not in keep:
            p.unlink(missing_ok=True)
