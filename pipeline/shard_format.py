"""The shard format: the one module that knows how a converted dataset lies on disk.

The converters (`convert/`, the writers) and the loader (`pipeline/`, the reader) both import
this module, and no other module spells a member name, the index layout or the manifest schema.

    DIR/manifest.json            FORMAT, VERSION, `complete`, classes, per-split shards, rejects
    DIR/<split>-NNNNNN.tar       a WebDataset shard (USTAR, fixed metadata: byte-identical reruns)
    DIR/<split>-NNNNNN.idx       its DALI index (the format of DALI's wds2idx, v1.2)

A sample is the members `KEY.<image ext>` (an RGB JPEG, or a PNG for CIFAR), `KEY.cls` (the
class index in ASCII decimal, as webdataset's `cls` decoder reads it) and `KEY.json` (metadata).
`KEY` is the sample's position in its split's planned order, zero-padded to 8 digits.

The manifest (version 2):

    {"format": "webdataset-shards", "version": 2, "complete": true,
     "tool": "convert.imagenet_to_shards", "options": {...},
     "classes": ["n01440764", ...],
     "splits": {"train": {"samples": N,
                          "shards": [{"name", "index", "samples", "bytes", "sha256", "plan",
                                      "labels": [class index of each sample, in tar order]}],
                          "rejects": [...], "ignored": {...}}},
     "rejects": [{"path", "reason"}, ...]}

`labels` is the split's label table, cut per shard, so a reader learns every label from one file
instead of reading each `.cls` member (version 1 manifests have no table; their labels are read
from the `.cls` members). `plan` fingerprints what a converter planned for the shard; `complete`
is false while a conversion is still running.

Full-size JPEGs are stored losslessly transcoded with a restart marker every few MCUs
(`RESTART_INTERVAL_MCUS`, rounded down to a divisor of the MCUs per row; `KEY.json` says
`restart_interval`), so a loader can decode a crop from only the restart intervals that cover it.
They stay standard baseline JPEGs. No offset table is stored: the loader finds the markers by a
scan of the sample's bytes, at most about 1 % of its decode + resize (and an untrusted table
would have to be checked against the bytes anyway). `--no-restart-index` stores them byte for byte.
Resized (`--max-side`) JPEGs get their markers from the encoder, with the same interval rule.

Optional top-level keys a converter may add: `image_size` ([width, height], when every image has
that size), `pixel_stats` ({"split", "mean", "std"}: per-channel RGB statistics of a split, in
0..1 units, for normalization) and `coarse_classes` (CIFAR-100's superclass names).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "webdataset-shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)

# Image member extensions a reader accepts, in the order it looks for them; writers use the first
# two (jpg for photos, png for CIFAR's lossless pixels).
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp", "ppm", "bmp")
JPEG_EXT, PNG_EXT = "jpg", "png"
LABEL_EXT = "cls"
META_EXT = "json"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"
# DALI's `wds2idx` writes this version tag; `fn.readers.webdataset(index_paths=...)` reads it.
DALI_INDEX_VERSION = "v1.2"
SPLIT_NAMES = ("train", "val", "test")
# Target restart interval of full-size shard JPEGs, in MCUs (see the module docstring). Chosen by
# benchmarks/restart_index.py on ~100 KB 500 px photos: 2 MCUs decoded crops a little faster than 4
# (1.22-1.24x today's decode + resize against 1.19-1.20x; one MCU row: 1.07-1.09x), for files about
# 2 % larger than their sources (the markers; the transcode writes the standard Huffman tables).
RESTART_INTERVAL_MCUS = 2
_FIXED_MTIME = 0


class ManifestError(ValueError):
    """A manifest is missing, malformed, of another version, or names a shard unsafely."""


class ShardError(RuntimeError):
    """A shard or its index is missing, truncated, unreadable, or belongs to another split; the
    message names it."""


class MissingSplit(ShardError):
    """The dataset has no such split (not: a split it has could not be read)."""


# -- names -------------------------------------------------------------------------------------

def sample_key(index: int) -> str:
    """Key of a split's index-th planned sample: stable across reruns and worker counts."""
    return f"{index:08d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}{TAR_SUFFIX}"


def is_split_file(name: str, split: str) -> bool:
    """Whether `name` is a shard or index file that a converter writes for `split`."""
    suffixes = f"({re.escape(TAR_SUFFIX)}|{re.escape(INDEX_SUFFIX)})"
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}{suffixes}", name) is not None


def split_in_name(name: str) -> str | None:
    """The split a shard's file name announces (`train-000001.tar`, `imagenet-val-03.tar`,
    `validation_7.tar`), if any: for shards that come without a manifest."""
    m = re.search(r"(?:^|[^a-z])(train|validation|val|test)(?=$|[^a-z])", name.lower())
    if m is None:
        return None
    return "val" if m.group(1) == "validation" else m.group(1)


def index_name(tar_name: str) -> str:
    """The DALI index beside a shard: `x.tar` -> `x.idx` (a name without .tar gets .idx added)."""
    stem = tar_name[:-len(TAR_SUFFIX)] if tar_name.endswith(TAR_SUFFIX) else tar_name
    return stem + INDEX_SUFFIX


def encode_label(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def decode_label(data: bytes) -> int:
    """A `.cls` member: ASCII decimal, surrounding whitespace allowed (as webdataset reads it)."""
    try:
        return int(bytes(data).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a class index: {bytes(data[:20])!r}") from None


# -- samples and shards ------------------------------------------------------------------------

@dataclass
class Sample:
    """What a converter stores for one image."""

    image: bytes
    image_ext: str  # JPEG_EXT or PNG_EXT
    label: int
    meta: dict = field(default_factory=dict)  # goes into KEY.json

    def members(self) -> dict[str, bytes]:
        if self.image_ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {self.image_ext!r} is not one of {IMAGE_EXTS}")
        return {self.image_ext: self.image, LABEL_EXT: encode_label(self.label),
                META_EXT: json.dumps(self.meta, sort_keys=True).encode()}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def partial_files(folder: Path):
    """Leftovers of an interrupted write (never under a final name, always safe to delete)."""
    return folder.glob(".*.partial")


class ShardWriter:
    """Write samples into one tar plus its DALI index; `close()` publishes both.

    Headers come from `tarfile.TarInfo`; the member data is written straight through (one
    write, one hash update) rather than through tarfile's 16 KB copy loop, which measured at a
    third of the converter's non-decode time. Use as a context manager: leaving the block
    through an exception discards the partial files. `labels` collects each sample's class index
    for the manifest's label table.
    """

    def __init__(self, tar_path: str | os.PathLike):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_name(index_name(self.tar_path.name))
        self._tmp = self.tar_path.with_name(f".{self.tar_path.name}.partial")
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._offset = 0
        self._index_lines: list[str] = []
        self.labels: list[int] = []
        self.samples = 0

    def _put(self, b: bytes) -> None:
        self._file.write(b)
        self._hash.update(b)
        self._offset += len(b)

    def write_sample(self, key: str, sample: Sample) -> None:
        self.write(key, sample.members())

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Low level: one sample's members ({ext: bytes}), in the order given."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _FIXED_MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._put(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            parts.append(f"{ext} {self._offset} {len(data)} {name}")  # DALI indexes the data offset
            self._put(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._put(bytes(pad))
        self._index_lines.append(" ".join(parts))
        if LABEL_EXT in members:
            self.labels.append(decode_label(members[LABEL_EXT]))
        self.samples += 1

    def close(self) -> tuple[int, str]:
        """Finish, fsync and rename into place; return (bytes, sha256 hex) of the tar."""
        # End of archive: two zero blocks, then pad to a whole record, as tarfile does.
        self._put(bytes(2 * tarfile.BLOCKSIZE))
        pad = -self._offset % tarfile.RECORDSIZE
        if pad:
            self._put(bytes(pad))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = f"{DALI_INDEX_VERSION} {self.samples}\n" + "".join(line + "\n" for line in self._index_lines)
        # Index first: a published tar always has its index beside it.
        atomic_write_bytes(self.idx_path, index.encode())
        os.replace(self._tmp, self.tar_path)
        return self._offset, self._hash.hexdigest()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- the index ---------------------------------------------------------------------------------

IndexEntry = tuple[str, dict[str, tuple[int, int]]]  # (sample key, {ext: (data offset, size)})


def parse_index(text: str, origin: str = "index") -> list[IndexEntry]:
    """Parse a DALI index: one entry per sample, in tar order. Raises ValueError naming `origin`."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(DALI_INDEX_VERSION + " "):
        raise ValueError(f"{origin}: not a DALI {DALI_INDEX_VERSION} index")
    try:
        n = int(lines[0].split()[1])
        samples = []
        for line in lines[1:]:
            fields = line.split()
            if not fields or len(fields) % 4:
                raise ValueError(f"{origin}: malformed index line {line!r}")
            key = fields[3].rsplit("/", 1)[-1].split(".", 1)[0]
            members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
            if any(off < 0 or size < 0 for off, size in members.values()):
                raise ValueError(f"{origin}: negative offset or size in {line!r}")
            samples.append((key, members))
    except (IndexError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith(origin) else f"{origin}: malformed index ({e})") from None
    if len(samples) != n:
        raise ValueError(f"{origin}: header says {n} samples, found {len(samples)}")
    return samples


def read_index(path: str | os.PathLike) -> list[IndexEntry]:
    return parse_index(Path(path).read_text(), str(path))


def index_from_tar(path: str | os.PathLike) -> list[IndexEntry]:
    """Index a local tar that has no .idx beside it (a header walk; no member data is read)."""
    samples: list[IndexEntry] = []
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


def image_member(key: str, members: dict, origin: str) -> str:
    """The extension of a sample's image member."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    raise ShardError(f"{origin}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)})")


# -- the manifest ------------------------------------------------------------------------------

def shard_entry(name: str, samples: int, nbytes: int, sha256: str, plan: str, labels: list[int]) -> dict:
    return {"name": name, "index": index_name(name), "samples": samples, "bytes": nbytes, "sha256": sha256,
            "plan": plan, "labels": labels}


def new_manifest(tool: str, options: dict, classes: list[str], splits: dict[str, dict], complete: bool,
                 extra: dict | None = None) -> dict:
    """A manifest; `splits` maps each split to {"shards": [shard_entry...], "rejects": [...],
    "ignored": {...}}; `extra` adds fixed top-level keys (e.g. CIFAR-100's coarse classes)."""
    m = {"format": FORMAT, "version": VERSION, "complete": complete, "tool": tool, "options": options,
         "classes": classes, **(extra or {}), "splits": {}, "rejects": []}
    for split, info in splits.items():
        m["splits"][split] = {"samples": sum(e["samples"] for e in info["shards"]), **info}
        m["rejects"].extend(info.get("rejects", []))
    return m


def pixel_stats(pixels_nchw) -> dict:
    """`pixel_stats` of uint8 images (N, 3, ...): per-channel mean and std in 0..1 units."""
    x = pixels_nchw.reshape(pixels_nchw.shape[0], 3, -1).astype("float64") / 255.0
    mean = x.mean(axis=(0, 2))
    std = x.std(axis=(0, 2))
    return {"split": "train", "mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std]}


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def parse_manifest(text: str | bytes, origin: str = "manifest") -> dict:
    """Parse and check the structure of a manifest; raise ManifestError naming what is wrong."""
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{origin}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"{origin}: not a {FORMAT} manifest")
    if m.get("version") not in READABLE_VERSIONS:
        raise ManifestError(f"{origin}: manifest version {m.get('version')!r}, this code reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    classes = m.get("classes")
    if not isinstance(classes, list) or not isinstance(m.get("splits"), dict):
        raise ManifestError(f"{origin}: missing 'classes' or 'splits'")
    size = m.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0
                                                                                    for v in size)):
        raise ManifestError(f"{origin}: 'image_size' must be [width, height]")
    stats = m.get("pixel_stats")
    if stats is not None and not (isinstance(stats, dict) and all(
            isinstance(stats.get(k), list) and len(stats[k]) == 3 and all(isinstance(v, (int, float)) for v in stats[k])
            for k in ("mean", "std")) and all(v > 0 for v in stats["std"])):
        raise ManifestError(f"{origin}: 'pixel_stats' must hold three-channel 'mean' and positive 'std'")
    for split, info in m["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ManifestError(f"{origin}: split {split!r} has no shard list")
        for s in shards:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int) \
                    or s["samples"] < 0:
                raise ManifestError(f"{origin}: split {split!r} has a malformed shard entry {str(s)[:200]}")
            labels = s.get("labels")
            if labels is None:
                continue
            if not isinstance(labels, list) or len(labels) != s["samples"] or not all(
                    type(v) is int and 0 <= v < max(len(classes), 1) for v in labels):
                raise ManifestError(f"{origin}: shard {s['name']!r} has a label table that does not hold "
                                    f"{s['samples']} class indices below {len(classes)}")
    return m


def load_manifest(path: str | os.PathLike) -> dict:
    """Load DIR/manifest.json (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (convert the dataset first)") from None
    return parse_manifest(text, str(p))


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a readable manifest of a finished conversion."""
    try:
        return bool(load_manifest(folder).get("complete", False))
    except (OSError, ManifestError):
        return False


def split_shards(manifest: dict, split: str, origin: str) -> list[dict]:
    """The shard entries of `split`, once the conversion that wrote them has finished."""
    if not manifest.get("complete", True):
        raise ShardError(f"{origin}: the conversion has not finished (rerun it to complete)")
    if split not in manifest["splits"]:
        raise MissingSplit(f"{origin}: no split {split!r} (has {sorted(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def shard_split(manifest: dict, name: str) -> str | None:
    """The split a shard file name belongs to, by the manifest."""
    for split, info in manifest["splits"].items():
        if any(posix_basename(s["name"]) == name for s in info["shards"]):
            return split
    return None


def posix_basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]
