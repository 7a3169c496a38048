"""Where samples live: resolve `shards` (a directory, a manifest URL, or a brace pattern of tar
paths or URLs) into a table of every sample's shard, byte range and label.

Shard entries of a manifest are untrusted: a name is only ever resolved as a file inside the
manifest's folder (or, for a manifest fetched over http, a URL on the same host under the
manifest's folder). Nothing is handed to a shell, `pipe:` included.
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

from convert.manifest import MANIFEST_NAME, ManifestError, load_manifest, parse_manifest
from convert.tarwriter import parse_dali_index

from .http import http_get, is_url
from .plan import shard_starts

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class ShardError(RuntimeError):
    """A shard is missing, truncated or unreadable; the message names it."""


@dataclass
class SampleTable:
    """Every sample of one split, in manifest order; a sample's id is its row."""

    urls: list[str]                 # shard path or URL, per shard
    shard_sizes: list[int]          # samples per shard
    shard: np.ndarray               # (N,) int32 shard of each sample
    offset: np.ndarray              # (N,) int64 byte offset of the image member
    size: np.ndarray                # (N,) int64 byte size of the image member
    label: np.ndarray               # (N,) int64 class index, -1 until known (remote)
    remote: bool
    classes: list[str] = field(default_factory=list)
    keys: list[list[str]] = field(default_factory=list)  # sample keys per shard, for messages
    cls_offset: np.ndarray | None = None  # (N,) offset of the .cls member (remote: read in stream)

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def shard_starts(self) -> np.ndarray:
        """(shards + 1,) first sample id of each shard, then the total."""
        return shard_starts(self.shard_sizes)

    def key(self, sample_id: int) -> str:
        s = int(self.shard[sample_id])
        first = int(np.searchsorted(self.shard, s))
        return f"{Path(self.urls[s]).name}:{self.keys[s][sample_id - first]}"


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


def _index_from_tar(path: Path) -> list[tuple[str, dict]]:
    """Index a local tar that has no .idx beside it (a header walk; no member data is read)."""
    samples: list[tuple[str, dict]] = []
    with tarfile.open(path) as tar:
        for ti in tar:
            base = ti.name.rsplit("/", 1)[-1]
            if not ti.isfile() or "." not in base or base.startswith("."):
                continue
            key, ext = base.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (ti.offset_data, ti.size)
    return samples


def _load_index(url: str, remote: bool) -> list[tuple[str, dict]]:
    """The DALI index beside a shard (fetched for remote shards; built from the tar if absent)."""
    idx = url[:-4] + ".idx" if url.endswith(".tar") else url + ".idx"
    try:
        if remote:
            try:
                return parse_dali_index(http_get(idx).decode(), idx)
            except OSError as e:
                raise ShardError(f"{url}: remote shards need their .idx beside them ({e})") from None
        if os.path.isfile(idx):
            return parse_dali_index(Path(idx).read_text(), idx)
        return _index_from_tar(Path(url))
    except (ValueError, tarfile.TarError) as e:  # a damaged index or tar: name it
        raise ShardError(f"shard {url}: unreadable index ({e})") from None


def _image_ext(key: str, members: dict, origin: str) -> str:
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    raise ShardError(f"{origin}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)})")


def _build(urls: list[str], indexes: list[list[tuple[str, dict]]], remote: bool, classes: list[str],
           labels_from) -> SampleTable:
    shard, offset, size, keys, sizes, cls_off = [], [], [], [], [], []
    for s, (url, entries) in enumerate(zip(urls, indexes)):
        keys.append([key for key, _ in entries])
        sizes.append(len(entries))
        for key, members in entries:
            ext = _image_ext(key, members, url)
            shard.append(s)
            offset.append(members[ext][0])
            size.append(members[ext][1])
            cls_off.append(members.get("cls", (-1, 0)))
    table = SampleTable(urls, sizes, np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                        np.asarray(size, np.int64), np.full(len(shard), -1, np.int64), remote, classes, keys,
                        np.asarray(cls_off, np.int64).reshape(-1, 2))
    if labels_from is not None:
        labels_from(table)
    return table


def _read_local_labels(table: SampleTable) -> None:
    """Labels from the .cls members, read once through mmap (a few bytes per sample)."""
    starts = table.shard_starts
    for s, url in enumerate(table.urls):
        rows = range(starts[s], starts[s + 1])
        if not len(rows):
            continue
        with open(url, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for r in rows:
                off, n = table.cls_offset[r]
                if off < 0:
                    raise ShardError(f"{url}: sample {table.keys[s][r - rows[0]]!r} has no .cls member")
                table.label[r] = int(mm[off:off + n])


def _check_local_shards(paths: list[Path], entries: list[dict] | None) -> None:
    for i, p in enumerate(paths):
        if not p.is_file():
            raise ShardError(f"shard {p} is missing")
        if entries is not None and "bytes" in entries[i]:
            have, want = p.stat().st_size, entries[i]["bytes"]
            if have != want:
                raise ShardError(f"shard {p} is truncated or altered: {have} bytes, manifest says {want}")


def open_split(shards: str | os.PathLike, split: str) -> SampleTable:
    """Resolve `shards` for `split` into a SampleTable."""
    spec = str(shards)
    if is_url(spec) and spec.endswith(".json"):
        text = http_get(spec)
        manifest = parse_manifest(text, spec)
        info = _split_info(manifest, split, spec)
        urls = [resolve_remote(spec, e["name"], spec) for e in info["shards"]]
        return _build(urls, [_load_index(u, True) for u in urls], True, manifest["classes"], None)
    if is_url(spec) or "{" in spec or spec.endswith(".tar"):
        return _open_pattern(spec)
    folder = Path(spec)
    if folder.is_file() and folder.name == MANIFEST_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise ShardError(f"shards {spec}: no such directory")
    manifest = load_manifest(folder)
    origin = str(folder / MANIFEST_NAME)
    info = _split_info(manifest, split, origin)
    paths = [resolve_local(folder, e["name"], origin) for e in info["shards"]]
    _check_local_shards(paths, info["shards"])
    indexes = [_load_index(str(p), False) for p in paths]
    for p, e, idx in zip(paths, info["shards"], indexes):
        if len(idx) != e["samples"]:
            raise ShardError(f"shard {p}: index lists {len(idx)} samples, manifest says {e['samples']}")
    return _build([str(p) for p in paths], indexes, False, manifest["classes"], _read_local_labels)


def _split_info(manifest: dict, split: str, origin: str) -> dict:
    if split not in manifest["splits"]:
        raise ShardError(f"{origin}: no split {split!r} (has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    if not manifest.get("complete", True):
        raise ShardError(f"{origin}: the conversion has not finished (rerun it to complete)")
    return info


def _open_pattern(spec: str) -> SampleTable:
    from braceexpand import braceexpand

    if spec.startswith("pipe:"):
        raise ShardError(f"shards {spec!r}: pipe: sources are not supported")
    urls = list(braceexpand(spec))
    if is_url(spec):
        return _build(urls, [_load_index(u, True) for u in urls], True, [], None)
    _check_local_shards([Path(u) for u in urls], None)
    return _build(urls, [_load_index(u, False) for u in urls], False, [], _read_local_labels)
