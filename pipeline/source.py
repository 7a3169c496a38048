"""Where samples live: resolve `shards` (a folder with a manifest, a manifest URL, or a brace
pattern of tar paths or URLs) for one split into a table of every sample's shard, byte range and
label.

Shard entries of a manifest are untrusted: a name is only ever resolved as a file inside the
manifest's folder (or, for a manifest fetched over http, a URL on the same host under the
manifest's folder). Nothing is handed to a shell, `pipe:` included.

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

from . import shard_format as fmt
from .http import HTTPReadError, http_get, is_url
from .plan import shard_starts
from .shard_format import ManifestError, ShardError


@dataclass
class SampleTable:
    """Every sample of one split, in shard order; a sample's id is its row."""

    urls: list[str]                 # shard path or URL, per shard
    shard_sizes: list[int]          # samples per shard
    shard: np.ndarray               # (N,) int32 shard of each sample
    offset: np.ndarray              # (N,) int64 byte offset of the image member
    size: np.ndarray                # (N,) int64 byte size of the image member
    label: np.ndarray               # (N,) int64 class index; -1 until read (remote shards without a table)
    remote: bool
    classes: list[str] = field(default_factory=list)
    keys: np.ndarray | None = None  # (N,) bytes: sample keys, for messages
    cls_offset: np.ndarray | None = None  # (N, 2) offset and size of the .cls member (-1: none)
    split: str = "train"

    def __len__(self) -> int:
        return len(self.shard)

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


def _load_index(url: str, remote: bool) -> list[fmt.IndexEntry]:
    """The DALI index beside a shard (fetched for remote shards; built from the tar if absent)."""
    idx = fmt.index_name(url)
    try:
        if remote:
            try:
                return fmt.parse_index(http_get(idx).decode(), idx)
            except OSError as e:
                raise ShardError(f"{url}: remote shards need their {fmt.INDEX_SUFFIX} beside them ({e})") from None
        if os.path.isfile(idx):
            return fmt.read_index(idx)
        return fmt.index_from_tar(url)
    except (ValueError, UnicodeDecodeError, tarfile.TarError) as e:  # a damaged index or tar: name it
        raise ShardError(f"shard {url}: unreadable index ({e})") from None


def _build(split: str, urls: list[str], indexes: list[list[fmt.IndexEntry]], remote: bool, classes: list[str],
           labels: list[list[int] | None]) -> SampleTable:
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
    return SampleTable(urls, [len(e) for e in indexes], np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                       np.asarray(size, np.int64), np.asarray(label, np.int64), remote, classes,
                       np.asarray(keys, dtype="S") if n else np.zeros(0, "S1"),
                       np.asarray(cls_off, np.int64).reshape(n, 2), split)


def _read_local_labels(table: SampleTable) -> None:
    """Labels the manifest does not carry: read from the .cls members through mmap."""
    starts = table.shard_starts
    for s, url in enumerate(table.urls):
        rows = range(starts[s], starts[s + 1])
        if not len(rows) or (table.label[rows.start:rows.stop] >= 0).all():
            continue
        with open(url, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for r in rows:
                off, n = table.cls_offset[r]
                if off < 0:
                    raise ShardError(f"{url}: sample {table.key(r)!r} has no .{fmt.LABEL_EXT} member")
                try:
                    table.label[r] = fmt.decode_label(mm[off:off + n])
                except ValueError as e:
                    raise ShardError(f"{url}: sample {table.key(r)!r}: {e}") from None


def _check_local_shards(paths: list[Path], entries: list[dict] | None) -> None:
    for i, p in enumerate(paths):
        if not p.is_file():
            raise ShardError(f"shard {p} is missing")
        if entries is not None and "bytes" in entries[i]:
            have, want = p.stat().st_size, entries[i]["bytes"]
            if have != want:
                raise ShardError(f"shard {p} is truncated or altered: {have} bytes, manifest says {want}")


def _check_counts(urls, entries: list[dict], indexes) -> None:
    for u, e, idx in zip(urls, entries, indexes):
        if len(idx) != e["samples"]:
            raise ShardError(f"shard {u}: index lists {len(idx)} samples, manifest says {e['samples']}")


def open_split(shards: str | os.PathLike, split: str) -> SampleTable:
    """Resolve `shards` for `split` into a SampleTable."""
    spec = str(shards)
    if spec.startswith("pipe:"):
        raise ShardError(f"shards {spec!r}: pipe: sources are not supported")
    if is_url(spec) and spec.endswith(".json"):
        manifest = fmt.parse_manifest(http_get(spec), spec)
        entries = fmt.split_shards(manifest, split, spec)
        urls = [resolve_remote(spec, e["name"], spec) for e in entries]
        indexes = [_load_index(u, True) for u in urls]
        _check_counts(urls, entries, indexes)
        return _build(split, urls, indexes, True, manifest["classes"], [e.get("labels") for e in entries])
    if is_url(spec) or "{" in spec or spec.endswith(fmt.TAR_SUFFIX):
        return _open_pattern(spec, split)
    folder = _local_folder(spec)
    manifest = fmt.load_manifest(folder)
    origin = str(folder / fmt.MANIFEST_NAME)
    entries = fmt.split_shards(manifest, split, origin)
    paths = [resolve_local(folder, e["name"], origin) for e in entries]
    _check_local_shards(paths, entries)
    indexes = [_load_index(str(p), False) for p in paths]
    _check_counts(paths, entries, indexes)
    table = _build(split, [str(p) for p in paths], indexes, False, manifest["classes"],
                   [e.get("labels") for e in entries])
    _read_local_labels(table)  # version 1 manifests carry no label table
    return table


def read_manifest(shards: str | os.PathLike) -> dict | None:
    """The manifest behind `shards`: the folder's, the URL itself, or the one beside a pattern's
    first shard; None when there is none (foreign shards)."""
    spec = str(shards)
    if is_url(spec) and spec.endswith(".json"):
        return fmt.parse_manifest(http_get(spec), spec)
    if is_url(spec) or "{" in spec or spec.endswith(fmt.TAR_SUFFIX):
        from braceexpand import braceexpand

        return _manifest_beside(next(iter(braceexpand(spec))), is_url(spec))[0]
    return fmt.load_manifest(_local_folder(spec))


def _local_folder(spec: str) -> Path:
    """A local dataset folder, given as the folder or its manifest.json."""
    folder = Path(spec)
    if folder.is_file() and folder.name == fmt.MANIFEST_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise ShardError(f"shards {spec}: no such directory")
    return folder


def _manifest_beside(url: str, remote: bool) -> tuple[dict | None, str]:
    """The manifest in a shard's folder, if there is one."""
    if remote:
        origin = urljoin(url, fmt.MANIFEST_NAME)
        try:
            return fmt.parse_manifest(http_get(origin), origin), origin
        except HTTPReadError as e:
            if e.status in (403, 404, 410):
                return None, origin
            raise
    path = Path(url).parent / fmt.MANIFEST_NAME
    return (fmt.load_manifest(path), str(path)) if path.is_file() else (None, str(path))


def _open_pattern(spec: str, split: str) -> SampleTable:
    from braceexpand import braceexpand

    remote = is_url(spec)
    urls = list(braceexpand(spec))
    manifests: dict[str, tuple[dict | None, str]] = {}
    classes, labels, described = [], [], []
    for u in urls:
        folder = posixpath.dirname(u)
        if folder not in manifests:
            manifests[folder] = _manifest_beside(u, remote)
        manifest, origin = manifests[folder]
        name = posixpath.basename(u)
        if manifest is None:
            named = fmt.split_in_name(name)
            if named is not None and named != split:
                raise ShardError(f"shard {u}: its name says split {named!r}, not {split!r} (and no "
                                 f"{fmt.MANIFEST_NAME} beside it says otherwise)")
            labels.append(None)
            continue
        owner = fmt.shard_split(manifest, name)
        if owner != split:
            where = f"belongs to split {owner!r}" if owner else "is not listed"
            raise ShardError(f"shard {u} {where} in {origin}, not to split {split!r}")
        entry = next(e for e in fmt.split_shards(manifest, split, origin) if fmt.posix_basename(e["name"]) == name)
        labels.append(entry.get("labels"))
        described.append(entry)
        if classes and manifest["classes"] != classes:
            raise ShardError(f"shards {spec}: their manifests list different classes")
        classes = manifest["classes"]
    described = described if len(described) == len(urls) else None
    if not remote:
        _check_local_shards([Path(u) for u in urls], described)
    indexes = [_load_index(u, remote) for u in urls]
    if described is not None:
        _check_counts(urls, described, indexes)
    table = _build(split, urls, indexes, remote, classes, labels)
    if not remote:
        _read_local_labels(table)
    return table
