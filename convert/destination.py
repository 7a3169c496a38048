"""Where a conversion's output goes: a local folder, or a bucket (`--out s3://bucket/prefix`).

Shards are always written locally first, atomically (`ShardWriter`). For a bucket the local folder
is a staging folder: each finished shard is uploaded as soon as it is done (its index first, as a
local shard's index is renamed into place first) and then deleted locally, and `manifest.json` is
uploaded last, once every shard is in place, so a reader never sees a half-written dataset. Before
a rerun changes or removes a shard in the bucket, it deletes the bucket's manifest first.

The staging folder is the converter's own: a subfolder named after the URL, of `--staging DIR` or of
the user's cache, so two destinations never share (or nest) one. Once the manifest is uploaded the
converter removes the files it wrote there, and the subfolder when that leaves it empty; nothing
else in `DIR` is ever touched.

Resume: the staging folder keeps the manifest of the run so far (as a local conversion does in its
output folder). A planned shard whose entry is there (or in the bucket's finished manifest) and
whose object is in the bucket at the entry's size is kept; a staged shard that was written but not
uploaded is uploaded. The bytes are the same whatever the destination.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from pipeline import objstore
from pipeline.shard_format import (MANIFEST_NAME, ManifestError, index_name, is_split_file, load_manifest,
                                   parse_manifest, partial_files, sha256_file, write_manifest)


class ConvertError(Exception):
    """A failure the user must fix (bad input directory, unwritable output, strict reject)."""


def destination(out: str | os.PathLike, staging: str | os.PathLike | None = None):
    """A LocalFolder for a path, a Bucket for an object store URL (staged in a subfolder named after
    the URL, of `staging` or of the user's cache)."""
    if objstore.is_object_url(str(out)):
        return Bucket(str(out), staging_folder(str(out), staging))
    return LocalFolder(Path(out))


def out_arg(value: str) -> Path | str:
    """The `--out` flag: a local folder, or an object store URL kept as it is (a Path would fold
    its `//`)."""
    return value if objstore.is_object_url(value) else Path(value)


OUT_HELP = "output folder, or s3://bucket/prefix (gs://...) to upload each finished shard, manifest.json last"
STAGING_HELP = ("with --out s3://...: local folder in which a subfolder named after the URL holds the shards "
                "before their upload and the run's state for a resume (default: ~/.cache/resnet-shards/staging)")


def staging_folder(url: str, staging: str | os.PathLike | None = None) -> Path:
    """The converter's own folder for one output URL: a stable name, so that a rerun of the same
    command resumes, and one level deep, so that `s3://b` and `s3://b/sub` never nest."""
    scheme, bucket, key = objstore.split_url(url)
    if staging is None:
        staging = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet-shards" / "staging"
    where = f"{bucket}/{key.strip('/')}".rstrip("/")
    return Path(staging) / f"{scheme}-{quote(where, safe='')}"


class LocalFolder:
    """Shards and manifest written in place, in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = str(folder)
        self.flag = "--out"  # the flag that chose `folder`, for messages

    def prepare(self) -> None:
        _prepare_folder(self.folder, f"--out {self.name}")

    def previous_manifest(self) -> dict | None:
        """The manifest of an earlier run into the same place (finished or not), if readable."""
        return _manifest(self.folder)

    def still_valid(self, entry: dict | None, job) -> bool:
        return _staged_valid(self.folder, entry, job)

    def intact(self, entry: dict) -> bool:
        """Whether a shard of another split that this run leaves alone is still all there."""
        tar = self.folder / entry["name"]
        return tar.is_file() and tar.stat().st_size == entry.get("bytes") and \
            (self.folder / entry.get("index", index_name(entry["name"]))).is_file()

    def retract(self) -> None:
        """Before the first change to a shard the folder's manifest may describe: mark that manifest
        unfinished, so no reader takes the folder for a complete dataset meanwhile."""
        m = _manifest(self.folder)
        if m is not None and m.get("complete"):
            write_manifest(self.folder, {**m, "complete": False})

    def remove_unplanned(self, split: str, planned: set[str], known: set[str]) -> None:
        """Drop shards of this split that an earlier, differently planned run left behind: those its
        manifest lists (`known`); a file no manifest of ours names is not ours to delete."""
        stale = _unplanned_local(self.folder, split, planned, known)
        if stale:
            self.retract()
        for p in stale:
            p.unlink(missing_ok=True)

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
        self.flag = "--staging"
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

    def previous_manifest(self) -> dict | None:
        """The staged manifest (an interrupted run's); without one that lists a shard, the bucket's
        finished manifest."""
        staged = _manifest(self.folder)
        if (staged is not None and entries_by_name(staged)) or MANIFEST_NAME not in self._objects:
            return staged
        origin = f"{self.url}/{MANIFEST_NAME}"
        try:
            return parse_manifest(self._call("reading", objstore.get, origin), origin)
        except ManifestError:
            return None

    def intact(self, entry: dict) -> bool:
        return self._objects.get(entry["name"]) == entry.get("bytes") and \
            entry.get("index", index_name(entry["name"])) in self._objects

    def retract(self) -> None:
        self._retract()

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

    def remove_unplanned(self, split: str, planned: set[str], known: set[str]) -> None:
        """As LocalFolder's, in the bucket and in the staging folder (which is the converter's own)."""
        for p in _unplanned_local(self.folder, split, planned):
            p.unlink(missing_ok=True)
        keep, ours = _with_indexes(planned), _with_indexes(known)
        for name in sorted(self._objects):
            if is_split_file(name, split) and name not in keep and name in ours:
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
        remove what the conversion left in its staging folder (the staged manifest: every shard was
        deleted once uploaded), and the folder if that empties it."""
        write_manifest(self.folder, manifest)
        if manifest.get("complete"):
            self._call("uploading", objstore.put_file, self.folder / MANIFEST_NAME, f"{self.url}/{MANIFEST_NAME}")
            (self.folder / MANIFEST_NAME).unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something else is in it: not ours to delete

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


def _manifest(folder: Path) -> dict | None:
    if not (folder / MANIFEST_NAME).exists():
        return None
    try:
        return load_manifest(folder)
    except ManifestError:
        return None


def entries_by_name(manifest: dict | None) -> dict[str, dict]:
    """Every shard entry of a manifest, by shard name."""
    if manifest is None:
        return {}
    return {s["name"]: s for info in manifest["splits"].values() for s in info["shards"]}


def _staged_valid(folder: Path, entry: dict | None, job) -> bool:
    if not entry or entry.get("plan") != job.plan or "labels" not in entry:
        return False
    tar, idx = folder / job.name, folder / entry.get("index", "")
    if not tar.is_file() or not idx.is_file() or tar.stat().st_size != entry.get("bytes"):
        return False
    return sha256_file(tar) == entry.get("sha256")


def _with_indexes(names: set[str]) -> set[str]:
    return names | {index_name(n) for n in names}


def _unplanned_local(folder: Path, split: str, planned: set[str], known: set[str] | None = None) -> list[Path]:
    """This split's shard files in `folder` that the plan does not name (of those in `known`, if given)."""
    keep = _with_indexes(planned)
    ours = None if known is None else _with_indexes(known)
    return [p for p in folder.iterdir() if is_split_file(p.name, split) and p.name not in keep
            and (ours is None or p.name in ours)]
