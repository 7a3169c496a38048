"""Read image datasets in the Hugging Face hub's parquet layout, one row group at a time.

The hub stores ImageNet-1k, CIFAR and most image-classification sets as
`{split}-NNNNN-of-NNNNN.parquet` files (under `data/`, or a config folder such as
`plain_text/`). A row holds the image as a struct {bytes, path} and an integer class label; the
dataset's features, the class names among them, sit in the schema metadata under the key
`huggingface`, as `datasets` writes them:

    {"info": {"features": {"image": {"_type": "Image"},
                           "label": {"names": ["tench", ...], "_type": "ClassLabel"}}}}

pyarrow is an optional extra (`pip install pyarrow`), imported on first use.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from pipeline.shard_format import split_in_name

from .runner import ConvertError, Item

METADATA_KEY = b"huggingface"
# Label columns in the order a dataset is most likely to mean them (CIFAR-100 has both
# fine_label and coarse_label: its classes are the fine ones).
LABEL_PREFERENCE = ("label", "labels", "fine_label", "class", "target")
IMAGE_PREFERENCE = ("image", "img")


def require_pyarrow():
    """pyarrow.parquet, or an ImportError that names the package to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


# -- files -------------------------------------------------------------------------------------

def find_split_files(src: str) -> tuple[Path, dict[str, list[Path]], list[str]]:
    """(base folder, {split: files in name order}, names of .parquet files naming no split) for
    `src`: a folder (searched recursively), one .parquet file, or a glob pattern (`**` allowed).
    The split comes from the file name: train-*, validation-* (the `val` split), test-*."""
    if glob.has_magic(src):
        found = sorted(Path(p) for p in glob.glob(src, recursive=True) if p.endswith(".parquet"))
        if not found:
            raise ConvertError(f"--src {src}: the pattern matches no .parquet file")
        base = Path(os.path.commonpath([p.parent for p in found]))
    elif os.path.isdir(src):
        base = Path(src)
        found = sorted(p for p in base.rglob("*.parquet") if p.is_file())
        if not found:
            raise ConvertError(f"--src {src}: holds no .parquet file")
    elif os.path.isfile(src):
        found, base = [Path(src)], Path(src).parent
    else:
        raise ConvertError(f"--src {src}: no such folder, file or pattern")
    splits: dict[str, list[Path]] = {}
    unnamed = []
    for p in found:
        split = split_in_name(p.name[:-len(".parquet")])
        if split is None:
            unnamed.append(p.relative_to(base).as_posix())
        else:
            splits.setdefault(split, []).append(p)
    for split, files in splits.items():
        folders = sorted({p.parent.relative_to(base).as_posix() for p in files})
        if len(folders) > 1:
            # Two configs of one dataset (the hub keeps each in its own folder) must not mix.
            raise ConvertError(f"--src {src}: {split} files sit in several folders ({', '.join(folders)}); "
                               f"point --src at one of them")
        files.sort(key=lambda p: p.name)
    if not splits:
        raise ConvertError(f"--src {src}: no file is named for a split (train-*, validation-*, test-*.parquet)")
    return base, splits, unnamed


def open_parquet(path: str | os.PathLike):
    pq = require_pyarrow()
    import pyarrow as pa

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ConvertError(f"{path}: not a readable parquet file ({e})") from None


def read_features(pf) -> dict:
    """The `datasets` features of a file ({} when the file has none or they do not parse)."""
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


# -- columns -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    image: str
    label: str
    other_labels: tuple[str, ...] = ()  # further class-label columns (CIFAR-100's coarse_label)


def _describe(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _is_image_type(t) -> bool:
    import pyarrow as pa

    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t))
    return binary or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                      and _is_image_type(t.field("bytes").type))


def _pick(candidates: list[str], preference: tuple[str, ...]) -> str | None:
    if len(candidates) == 1:
        return candidates[0]
    return next((name for name in preference if name in candidates), None)


def detect_columns(schema, features: dict, image: str | None = None, label: str | None = None) -> Columns:
    """The image and label columns: those given, else the features' Image and ClassLabel columns,
    else by type (a struct with `bytes`, an integer column), with the usual names preferred."""
    import pyarrow as pa

    names = schema.names
    kinds = {n: f.get("_type") for n, f in features.items() if isinstance(f, dict) and n in names}
    if image is not None:
        if image not in names or not _is_image_type(schema.field(image).type):
            raise ConvertError(f"--image-column {image}: not a column of image bytes; the files have "
                               f"{_describe(schema)}")
    else:
        found = [n for n in names if kinds.get(n) == "Image"] or \
                [n for n in names if _is_image_type(schema.field(n).type)]
        image = _pick(found, IMAGE_PREFERENCE)
        if image is None:
            raise ConvertError(f"cannot tell the image column (found {found or 'none'}); the files have "
                               f"{_describe(schema)}; pass --image-column NAME")
    integer = [n for n in names if pa.types.is_integer(schema.field(n).type)]
    class_labels = [n for n in integer if kinds.get(n) == "ClassLabel"]
    if label is not None:
        if label not in integer:
            raise ConvertError(f"--label-column {label}: not an integer column; the files have {_describe(schema)}")
    else:
        label = _pick(class_labels or integer, LABEL_PREFERENCE)
        if label is None:
            raise ConvertError(f"cannot tell the label column (found {class_labels or integer or 'none'}); the "
                               f"files have {_describe(schema)}; pass --label-column NAME")
    return Columns(image, label, tuple(n for n in class_labels if n != label))


def class_names(features: dict, column: str) -> list[str] | None:
    """A ClassLabel column's names, from the features."""
    f = features.get(column)
    if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list):
        return [str(n) for n in f["names"]]
    return None


# -- row groups --------------------------------------------------------------------------------

@dataclass
class RowGroup:
    """One row group of one file, as the plan sees it: its labels, not its images."""

    file: str
    index: int
    first_row: int            # of the file
    labels: list              # int or None, per row
    others: dict = field(default_factory=dict)  # other label column -> values per row
    nbytes: int = 0           # the image column's bytes in the file: cuts shards and windows


def scan_row_groups(path: Path, pf, columns: Columns) -> list[RowGroup]:
    """Every row group of a file with its labels (only the label columns are read)."""
    import pyarrow as pa

    meta = pf.metadata
    groups, first = [], 0
    wanted = [columns.label, *columns.other_labels]
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        image_bytes = sum(rg.column(j).total_compressed_size for j in range(rg.num_columns)
                          if rg.column(j).path_in_schema.split(".")[0] == columns.image)
        try:
            table = pf.read_row_group(i, columns=wanted)
        except (OSError, pa.ArrowException) as e:
            raise ConvertError(f"{path}: cannot read row group {i} ({e})") from None
        values = {c: table.column(c).to_pylist() for c in wanted}
        groups.append(RowGroup(str(path), i, first, values[columns.label],
                               {c: values[c] for c in columns.other_labels}, image_bytes))
        first += rg.num_rows
    return groups


@dataclass(frozen=True)
class RowRef:
    """Where a planned sample's image is: an Item's `source` until RowReader reads it."""

    file: str
    row_group: int
    row: int                  # in the row group
    meta: tuple = ()          # (name, value) pairs for KEY.json: the row's other labels


@dataclass(frozen=True)
class RowReader:
    """runner.SourceReader for RowRef items: reads each row group the items need once, when the
    first of its rows comes up, and drops it after the last, so a shard's worth of images is never
    in memory, only the row groups in use. The items come back with `source` = (image bytes or
    None, KEY.json additions)."""

    image_column: str

    def __call__(self, items: list[Item]) -> Iterator[Item]:
        group_done: dict[tuple, int] = {}  # position of each row group's, and file's, last row
        file_done: dict[str, int] = {}
        for pos, it in enumerate(items):
            group_done[(it.source.file, it.source.row_group)] = file_done[it.source.file] = pos
        files, groups = {}, {}
        try:
            for pos, it in enumerate(items):
                ref: RowRef = it.source
                key = (ref.file, ref.row_group)
                if key not in groups:
                    if ref.file not in files:
                        files[ref.file] = open_parquet(ref.file)
                    groups[key] = self._read(files[ref.file], ref)
                data, path = self._row(groups[key], ref)
                meta = dict(ref.meta)
                if path:
                    meta["source_path"] = path
                yield replace(it, source=(data, meta))
                if group_done[key] == pos:
                    del groups[key]
                if file_done[ref.file] == pos:
                    files.pop(ref.file).close()
        finally:
            for pf in files.values():
                pf.close()

    def _read(self, pf, ref: RowRef):
        import pyarrow as pa

        try:
            return pf.read_row_group(ref.row_group, columns=[self.image_column]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise ConvertError(f"{ref.file}: cannot read row group {ref.row_group} ({e})") from None

    @staticmethod
    def _row(column, ref: RowRef) -> tuple[bytes | None, str | None]:
        import pyarrow as pa

        if ref.row >= len(column):
            raise ConvertError(f"{ref.file}: row group {ref.row_group} has fewer rows than when it was planned")
        value = column[ref.row]
        if not value.is_valid:
            return None, None
        if isinstance(value, pa.StructScalar):  # the hub's {bytes, path}
            path = value["path"].as_py() if "path" in value.keys() else None
            return value["bytes"].as_py(), path
        return value.as_py(), None
