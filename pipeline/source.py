"""Where samples live: resolve `shards` (a folder with a manifest, a manifest URL, an object store
prefix, or a brace pattern of tar paths or URLs) for one split into a table of every sample's
shard, byte range and label.

How a table's samples are read is its `access`:

- LOCAL: files on this machine, mapped (random access).
- RANGED: objects in a bucket (`s3://`, `gs://`), read by range requests at the index's offsets
  (random access, like LOCAL: train keeps its full per-epoch permutation).
- STREAM: shards served over http(s), each read whole, in order (train streams through a shuffle
  buffer).

Shard entries of a manifest are untrusted: a name is only ever resolved as a file inside the
manifest's folder (or, for a manifest fetched over http or from a bucket, a URL on the same host or
bucket under the manifest's folder). Nothing is handed to a shell, `pipe:` included.

A pattern names shards of one split. When a manifest lies beside them, it must list every one of
them under the requested split; without one, a split named in a file name (`train-000001.tar`,
`imagenet-val-0003.tar`) must be the requested one. So a val loader can never silently read train
shards.
"""
from __future__ import annotations

import mmap
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np

from . import objstore
from . import shard_format as fmt
from .http import HTTPReadError, http_get, is_url
from .plan import shard_starts
from .shard_format import ManifestError, ShardError

LOCAL, RANGED, STREAM = "local", "ranged", "stream"


@dataclass
class SampleTable:
    """Every sample of one split, in shard order; a sample's id is its row."""

    urls: list[str]                 # shard path or URL, per shard
    shard_sizes: list[int]          # samples per shard
    shard: np.ndarray               # (N,) int32 shard of each sample
    offset: np.ndarray              # (N,) int64 byte offset of the image member
    size: np.ndarray                # (N,) int64 byte size of the image member
    label: np.ndarray               # (N,) int64 class index; -1 until read (streamed shards without a table)
    access: str                     # LOCAL, RANGED or STREAM: how the samples are read
    classes: list[str] = field(default_factory=list)
    keys: np.ndarray | None = None  # (N,) bytes: sample keys, for messages
    cls_offset: np.ndarray | None = None  # (N, 2) offset and size of the .cls member (-1: none)
    split: str = "train"
    shard_bytes: np.ndarray | None = None  # (shards,) int64 size of each shard file or object; None: unknown
    shard_sha256: list[str | None] | None = None  # the manifest's sha256 of each shard (None: not recorded)
    cache: object | None = None  # a ShardCache of RANGED shards (pipeline.shard_cache), or None

    def past_end(self, sample_id: int) -> str | None:
        """Why sample `sample_id`'s image member cannot be in its shard (its index entry runs past the
        shard's end), or None. Index entries are untrusted: one is checked before it sizes a read."""
        if self.shard_bytes is None:
            return None
        s = int(self.shard[sample_id])
        if int(self.offset[sample_id]) + int(self.size[sample_id]) > int(self.shard_bytes[s]):
            return f"member runs past the end of {self.urls[s]}"
        return None

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def streamed(self) -> bool:
        """Shards are read whole and in order (http): train streams through a shuffle buffer."""
        return self.access == STREAM

    @property
    def ranged(self) -> bool:
        """Samples are read by range requests from an object store."""
        return self.access == RANGED

    @property
    def shard_starts(self) -> np.ndarray:
        """(shards + 1,) first sample id of each shard, then the total."""
        return shard_starts(self.shard_sizes)

    @property
    def labels_known(self) -> bool:
        return bool(len(self.label)) and bool((self.label >= 0).all())

    @property
    def num_classes(self) -> int | None:
        """The manifest's class count, else one more than the largest label; None while unknown."""
        if self.classes:
            return len(self.classes)
        return int(self.label.max()) + 1 if self.labels_known else None

    def key(self, sample_id: int) -> str:
        """`shard.tar:KEY` of a sample, for messages."""
        s = int(self.shard[sample_id])
        return f"{posixpath.basename(self.urls[s])}:{self.keys[sample_id].decode(errors='replace')}"


def _check_name(name: str, origin: str) -> str:
    """A shard name from a manifest: a relative path that stays inside the manifest's folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ManifestError(f"{origin}: invalid shard name {name!r}")
    if name.startswith(("pipe:", "/", "\\", "file:")) or "://" in name or ":" in name.split("/")[0]:
        raise ManifestError(f"{origin}: shard name {name!r} is not a relative path; refused")
    norm = posixpath.normpath(name)
    if norm.startswith("..") or posixpath.isabs(norm):
        raise ManifestError(f"{origin}: shard name {name!r} leaves the manifest's folder; refused")
    return norm


def resolve_local(folder: Path, name: str, origin: str) -> Path:
    norm = _check_name(name, origin)
    root = folder.resolve()
    path = (root / norm).resolve()
    if root != path and root not in path.parents:
        raise ManifestError(f"{origin}: shard name {name!r} resolves outside {root}; refused")
    return path


def resolve_remote(manifest_url: str, name: str, origin: str) -> str:
    norm = _check_name(name, origin)
    url = urljoin(manifest_url, norm)
    base, target = urlsplit(manifest_url), urlsplit(url)
    folder = posixpath.dirname(base.path) + "/"
    if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(folder):
        raise ManifestError(f"{origin}: shard name {name!r} resolves outside {folder}; refused")
    return url


def resolve_object(manifest_url: str, name: str, origin: str) -> str:
    """A manifest's shard name as a URL in the manifest's bucket, under the manifest's prefix."""
    norm = _check_name(name, origin)
    folder = manifest_url.rsplit("/", 1)[0] + "/"
    url = folder + norm
    if objstore.split_url(url)[:2] != objstore.split_url(manifest_url)[:2] or not url.startswith(folder):
        raise ManifestError(f"{origin}: shard name {name!r} resolves outside {folder}; refused")
    return url


def manifest_url(spec: str) -> str:
    """The manifest of an object store dataset, given as its prefix or as the manifest itself."""
    if posixpath.basename(spec) == fmt.MANIFEST_NAME:
        return spec
    return spec.rstrip("/") + "/" + fmt.MANIFEST_NAME


def _load_index(url: str, access: str) -> list[fmt.IndexEntry]:
    """The DALI index beside a local or streamed shard (fetched for streamed shards; built from
    the tar if a local one has none)."""
    idx = fmt.index_name(url)
    try:
        if access == STREAM:
            try:
                return fmt.parse_index(http_get(idx).decode(), idx)
            except OSError as e:
                raise ShardError(f"{url}: remote shards need their {fmt.INDEX_SUFFIX} beside them ({e})") from None
        if os.path.isfile(idx):
            return fmt.read_index(idx)
        return fmt.index_from_tar(url)
    except (ValueError, UnicodeDecodeError, tarfile.TarError) as e:  # a damaged index or tar: name it
        raise ShardError(f"shard {url}: unreadable index ({e})") from None


def _load_indexes(urls: list[str], access: str) -> list[list[fmt.IndexEntry]]:
    """Every shard's index; an object store's are fetched concurrently."""
    if access != RANGED:
        return [_load_index(u, access) for u in urls]
    names = [fmt.index_name(u) for u in urls]
    try:
        texts = objstore.get_many(names)
    except objstore.ObjectNotFound as e:
        raise ShardError(f"{e}: shards in object storage need their {fmt.INDEX_SUFFIX} beside them") from None
    except objstore.ObjectStoreError as e:
        raise ShardError(f"shard index: {e}") from None
    out = []
    for url, idx, text in zip(urls, names, texts):
        try:
            out.append(fmt.parse_index(text.decode(), idx))
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"shard {url}: unreadable index ({e})") from None
    return out


def _build(split: str, urls: list[str], indexes: list[list[fmt.IndexEntry]], access: str, classes: list[str],
           labels: list[list[int] | None], shard_bytes: list[int] | None = None) -> SampleTable:
    """The table of a split's samples. `shard_bytes` (each shard's size; for local and object store
    shards) bounds every index entry before any read is sized by it."""
    shard, offset, size, keys, cls_off, label = [], [], [], [], [], []
    for s, (url, entries) in enumerate(zip(urls, indexes)):
        if labels[s] is not None and len(labels[s]) != len(entries):
            raise ShardError(f"shard {url}: the manifest's label table has {len(labels[s])} labels, "
                             f"the index {len(entries)} samples")
        for key, members in entries:
            ext = fmt.image_member(key, members, url)
            shard.append(s)
            offset.append(members[ext][0])
            size.append(members[ext][1])
            keys.append(key.encode())
            cls_off.append(members.get(fmt.LABEL_EXT, (-1, 0)))
        label.extend(labels[s] if labels[s] is not None else [-1] * len(entries))
    n = len(shard)
    table = SampleTable(urls, [len(e) for e in indexes], np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                        np.asarray(size, np.int64), np.asarray(label, np.int64), access, classes,
                        np.asarray(keys, dtype="S") if n else np.zeros(0, "S1"),
                        np.asarray(cls_off, np.int64).reshape(n, 2), split,
                        None if shard_bytes is None else np.asarray(shard_bytes, np.int64))
    if access == LOCAL:
        _read_local_labels(table)  # version 1 manifests and foreign shards carry no label table
    elif access == RANGED:
        _read_ranged_labels(table)
    return table  # streamed shards: their .cls members are read from the stream


def _unlabelled(table: SampleTable) -> np.ndarray:
    """Rows still without a label; a missing .cls member among them, or one its index places past
    the shard's end, is an error naming it."""
    rows = np.flatnonzero(table.label < 0)
    for r in rows[table.cls_offset[rows, 0] < 0][:1]:
        url = table.urls[table.shard[r]]
        raise ShardError(f"{url}: sample {table.key(int(r))!r} has no .{fmt.LABEL_EXT} member")
    if table.shard_bytes is not None and len(rows):
        ends = table.cls_offset[rows, 0] + table.cls_offset[rows, 1]
        for r in rows[ends > table.shard_bytes[table.shard[rows]]][:1]:
            url = table.urls[table.shard[r]]
            raise ShardError(f"{url}: sample {table.key(int(r))!r}: its index places the .{fmt.LABEL_EXT} "
                             f"member past the end of the shard")
    return rows


def _set_label(table: SampleTable, row: int, data) -> None:
    try:
        table.label[row] = fmt.decode_label(data)
    except ValueError as e:
        raise ShardError(f"{table.urls[table.shard[row]]}: sample {table.key(row)!r}: {e}") from None


def _read_local_labels(table: SampleTable) -> None:
    """Labels the manifest does not carry: read from the .cls members through mmap."""
    rows = _unlabelled(table)
    for s in np.unique(table.shard[rows]).tolist():
        url = table.urls[s]
        with open(url, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for r in rows[table.shard[rows] == s].tolist():
                off, n = table.cls_offset[r]
                _set_label(table, r, mm[off:off + n])


# Labels of bucket shards without a manifest: .cls members this close are read in one request. A
# full-size ImageNet sample is ~110 KB, so the default gap would cost one request per sample (1.28 M
# before the first batch); this one reads a shard in a few requests of at most objstore.MAX_MERGED.
LABEL_MERGE_GAP = 256 << 10


def _read_ranged_labels(table: SampleTable) -> None:
    """Labels the manifest does not carry: the .cls members, read by merged range requests."""
    rows = _unlabelled(table)
    if not len(rows):
        return
    off, n = table.cls_offset[rows, 0], table.cls_offset[rows, 1]
    try:
        blobs = objstore.read_ranges([table.urls[s] for s in table.shard[rows]], off, off + n,
                                     merge_gap=LABEL_MERGE_GAP)
    except objstore.ObjectStoreError as e:
        raise ShardError(f"shard {e}") from None
    for r, data in zip(rows.tolist(), blobs):
        _set_label(table, r, data)


def _check_local_shards(paths: list[Path], entries: list[dict] | None) -> list[int]:
    """Every shard exists, at the manifest's size; returns their sizes."""
    sizes = []
    for i, p in enumerate(paths):
        if not p.is_file():
            raise ShardError(f"shard {p} is missing")
        have = p.stat().st_size
        if entries is not None and "bytes" in entries[i] and have != entries[i]["bytes"]:
            raise ShardError(f"shard {p} is truncated or altered: {have} bytes, manifest says {entries[i]['bytes']}")
        sizes.append(have)
    return sizes


def _check_object_shards(urls: list[str], entries: list[dict] | None) -> list[int]:
    """Every shard and its index exist, at the manifest's size: one listing per folder. Returns
    their sizes. Without permission to list, the reads themselves name a missing object, and a
    size comes from the manifest, else from the object itself."""
    listings: dict[str, dict[str, int] | None] = {}
    sizes = []
    for i, url in enumerate(urls):
        folder, name = url.rsplit("/", 1)
        if folder not in listings:
            try:
                listings[folder] = objstore.listdir(folder)
            except objstore.ObjectAccessDenied:
                listings[folder] = None
            except objstore.ObjectStoreError as e:
                raise ShardError(f"shards {folder}/: cannot be listed ({e})") from None
        listing = listings[folder]
        if listing is None:
            sizes.append(_object_size(url, entries[i] if entries is not None else {}))
            continue
        for obj in (name, fmt.index_name(name)):
            if obj not in listing:
                raise ShardError(f"{'shard' if obj == name else 'shard index'} {folder}/{obj} is missing")
        if entries is not None and "bytes" in entries[i] and listing[name] != entries[i]["bytes"]:
            raise ShardError(f"shard {url} is truncated or altered: {listing[name]} bytes, manifest says "
                             f"{entries[i]['bytes']}")
        sizes.append(listing[name])
    return sizes


def _object_size(url: str, entry: dict) -> int:
    if "bytes" in entry:
        return int(entry["bytes"])
    try:
        return objstore.size(url)
    except objstore.ObjectStoreError as e:
        raise ShardError(f"shard {e}") from None


def _check_counts(urls, entries: list[dict], indexes) -> None:
    for u, e, idx in zip(urls, entries, indexes):
        if len(idx) != e["samples"]:
            raise ShardError(f"shard {u}: index lists {len(idx)} samples, manifest says {e['samples']}")


def _is_pattern(spec: str) -> bool:
    return "{" in spec or spec.endswith(fmt.TAR_SUFFIX)


def open_split(shards: str | os.PathLike, split: str) -> SampleTable:
    """Resolve `shards` for `split` into a SampleTable."""
    spec = str(shards)
    if spec.startswith("pipe:"):
        raise ShardError(f"shards {spec!r}: pipe: sources are not supported")
    if objstore.is_object_url(spec) and not _is_pattern(spec):
        origin = manifest_url(spec)
        manifest = _object_manifest(origin)
        entries = fmt.split_shards(manifest, split, origin)
        urls = [resolve_object(origin, e["name"], origin) for e in entries]
        sizes = _check_object_shards(urls, entries)
        indexes = _load_indexes(urls, RANGED)
        _check_counts(urls, entries, indexes)
        table = _build(split, urls, indexes, RANGED, manifest["classes"], [e.get("labels") for e in entries], sizes)
        table.shard_sha256 = [e.get("sha256") for e in entries]
        return table
    if is_url(spec) and spec.endswith(".json"):
        manifest = fmt.parse_manifest(http_get(spec), spec)
        entries = fmt.split_shards(manifest, split, spec)
        urls = [resolve_remote(spec, e["name"], spec) for e in entries]
        indexes = _load_indexes(urls, STREAM)
        _check_counts(urls, entries, indexes)
        return _build(split, urls, indexes, STREAM, manifest["classes"], [e.get("labels") for e in entries])
    if is_url(spec) or objstore.is_object_url(spec) or _is_pattern(spec):
        return _open_pattern(spec, split)
    folder = _local_folder(spec)
    manifest = fmt.load_manifest(folder)
    origin = str(folder / fmt.MANIFEST_NAME)
    entries = fmt.split_shards(manifest, split, origin)
    paths = [resolve_local(folder, e["name"], origin) for e in entries]
    sizes = _check_local_shards(paths, entries)
    indexes = _load_indexes([str(p) for p in paths], LOCAL)
    _check_counts(paths, entries, indexes)
    return _build(split, [str(p) for p in paths], indexes, LOCAL, manifest["classes"],
                  [e.get("labels") for e in entries], sizes)


def read_manifest(shards: str | os.PathLike) -> dict | None:
    """The manifest behind `shards`: the folder's, the URL itself, the one under an object store
    prefix, or the one beside a pattern's first shard; None when there is none (foreign shards)."""
    spec = str(shards)
    if objstore.is_object_url(spec) and not _is_pattern(spec):
        return _object_manifest(manifest_url(spec))
    if is_url(spec) and spec.endswith(".json"):
        return fmt.parse_manifest(http_get(spec), spec)
    if is_url(spec) or objstore.is_object_url(spec) or _is_pattern(spec):
        from braceexpand import braceexpand

        first = next(iter(braceexpand(spec)))
        return _manifest_beside(first, _access_of(first))[0]
    return fmt.load_manifest(_local_folder(spec))


def _access_of(url: str) -> str:
    return RANGED if objstore.is_object_url(url) else STREAM if is_url(url) else LOCAL


def _object_manifest(url: str) -> dict:
    try:
        return fmt.parse_manifest(objstore.get(url), url)
    except objstore.ObjectNotFound:
        raise ManifestError(f"{url}: no manifest (convert the dataset first, or give a pattern of its "
                            f"{fmt.TAR_SUFFIX} files)") from None
    except objstore.ObjectStoreError as e:
        raise ShardError(f"manifest {e}") from None


def _local_folder(spec: str) -> Path:
    """A local dataset folder, given as the folder or its manifest.json."""
    folder = Path(spec)
    if folder.is_file() and folder.name == fmt.MANIFEST_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise ShardError(f"shards {spec}: no such directory")
    return folder


def _manifest_beside(url: str, access: str) -> tuple[dict | None, str]:
    """The manifest in a shard's folder, if there is one."""
    if access == STREAM:
        origin = urljoin(url, fmt.MANIFEST_NAME)
        try:
            return fmt.parse_manifest(http_get(origin), origin), origin
        except HTTPReadError as e:
            if e.status in (403, 404, 410):
                return None, origin
            raise
    if access == RANGED:
        origin = url.rsplit("/", 1)[0] + "/" + fmt.MANIFEST_NAME
        try:
            return fmt.parse_manifest(objstore.get(origin), origin), origin
        except (objstore.ObjectNotFound, objstore.ObjectAccessDenied):
            return None, origin
        except objstore.ObjectStoreError as e:
            raise ShardError(f"manifest {e}") from None
    path = Path(url).parent / fmt.MANIFEST_NAME
    return (fmt.load_manifest(path), str(path)) if path.is_file() else (None, str(path))


def _open_pattern(spec: str, split: str) -> SampleTable:
    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    access = _access_of(spec)
    if any(_access_of(u) != access for u in urls):
        raise ShardError(f"shards {spec}: a pattern must name shards of one kind (files, http or one object store)")
    manifests: dict[str, tuple[dict | None, str]] = {}
    classes, labels, described = [], [], []
    for u in urls:
        folder = posixpath.dirname(u)
        if folder not in manifests:
            manifests[folder] = _manifest_beside(u, access)
        manifest, origin = manifests[folder]
        name = posixpath.basename(u)
        if manifest is None:
            named = fmt.split_in_name(name)
            if named is not None and named != split:
                raise fmt.MissingSplit(f"shard {u}: its name says split {named!r}, not {split!r} (and no "
                                       f"{fmt.MANIFEST_NAME} beside it says otherwise)")
            labels.append(None)
            continue
        owner = fmt.shard_split(manifest, name)
        if owner != split:
            error = fmt.MissingSplit if owner else ShardError  # another split's shard: the pattern has none of this
            where = f"belongs to split {owner!r}" if owner else "is not listed"
            raise error(f"shard {u} {where} in {origin}, not to split {split!r}")
        entry = next(e for e in fmt.split_shards(manifest, split, origin) if fmt.posix_basename(e["name"]) == name)
        labels.append(entry.get("labels"))
        described.append(entry)
        if classes and manifest["classes"] != classes:
            raise ShardError(f"shards {spec}: their manifests list different classes")
        classes = manifest["classes"]
    described = described if len(described) == len(urls) else None
    sizes = None  # streamed shards are read whole: a stream has no ranges to bound
    if access == LOCAL:
        sizes = _check_local_shards([Path(u) for u in urls], described)
    elif access == RANGED:
        sizes = _check_object_shards(urls, described)
    indexes = _load_indexes(urls, access)
    if described is not None:
        _check_counts(urls, described, indexes)
    table = _build(split, urls, indexes, access, classes, labels, sizes)
    if described is not None:
        table.shard_sha256 = [e.get("sha256") for e in described]
    return table
