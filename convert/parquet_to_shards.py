"""Convert an image dataset in the Hugging Face hub's parquet layout into WebDataset shards.

    python -m convert.parquet_to_shards --src DIR_OR_GLOB --out DIR [--max-side 500 --quality 90]

DIR holds the hub's files (ImageNet-1k's data/train-00000-of-00294.parquet, CIFAR-10's
plain_text/test-00000-of-00001.parquet, ...); a glob pattern picks files itself. Splits come
from the file names: train-* -> train, validation-* -> val, test-* -> test. Class names come from
the files' ClassLabel feature. Every image goes through the ImageFolder converter's checks and
repairs (convert.images), and the shards, manifest, determinism and resume are the runner's.

Rows are read one row group at a time, in the process that writes their shard. Train is
shuffled in two steps that keep that true: the row groups in a random order (--seed), then the
rows within windows of consecutive row groups (about SHUFFLE_WINDOW_MB of images; shards are cut
at window ends), so a shard mixes rows from all over the split while the memory a writer holds
stays at one window. The loader shuffles every epoch across the whole split anyway.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.shard_format import RESTART_INTERVAL_MCUS, SPLIT_NAMES, Sample, sample_key

from .cli import add_image_options, add_output_options, check_image_options, finish, restart_interval
from .images import RejectedImage, prepare_image, target_size
from .parquet_source import (Columns, RowGroup, RowReader, RowRef, class_names, detect_columns, find_split_files,
                             open_parquet, read_features, require_pyarrow, scan_row_groups)
from .runner import (ConvertError, Item, ShardJob, default_workers, format_summary, plan_shards, run_conversion,
                     stored_ratio)

TOOL = "convert.parquet_to_shards"
# Source bytes of the row groups whose rows are shuffled together in train (see the docstring):
# what a writer process holds in memory at most, about 6 of ImageNet's 100-row groups.
SHUFFLE_WINDOW_MB = 64
# Up to this side, images of one fixed size (CIFAR's 32 px) also get the train split's
# pixel_stats, which the CIFAR recipe normalizes with; it costs a decode of every train image.
STATS_MAX_SIDE = 64


def encode_row(item: Item, options: dict) -> tuple[Sample, int]:
    """Encoder: one parquet row's image (as RowReader reads it) -> its sample."""
    data, extra = item.source
    if data is None:
        raise RejectedImage("no image bytes in the row")
    prepared = prepare_image(data, options.get("max_side"), options["quality"], options.get("restart_interval"),
                             options.get("keep_png", False))
    meta = {"path": item.path, "label": item.label, **extra, **prepared.meta}
    return Sample(prepared.jpeg, prepared.ext, item.label, meta), len(data)


# -- reading the plan's inputs -----------------------------------------------------------------

def scan_splits(files: dict[str, list[Path]], image_column: str | None,
                label_column: str | None) -> tuple[Columns, dict, dict[str, list[RowGroup]]]:
    """(columns, features of the first file, {split: row groups in file order}). The first file
    decides the columns; every file must have them and the same class names."""
    columns = features = names = first = None
    groups: dict[str, list[RowGroup]] = {}
    for split, paths in files.items():
        groups[split] = []
        for path in paths:
            pf = open_parquet(path)
            try:
                these = read_features(pf)
                if columns is None:
                    columns, features = detect_columns(pf.schema_arrow, these, image_column, label_column), these
                    names, first = class_names(these, columns.label), path
                missing = [c for c in (columns.image, columns.label, *columns.other_labels)
                           if c not in pf.schema_arrow.names]
                if missing:
                    raise ConvertError(f"{path}: lacks column(s) {', '.join(missing)}; it has "
                                       f"{', '.join(pf.schema_arrow.names)}")
                theirs = class_names(these, columns.label)
                if names is not None and theirs is not None and theirs != names:
                    raise ConvertError(f"{path}: its class names differ from those of {first}")
                groups[split] += scan_row_groups(path, pf, columns)
            finally:
                pf.close()
    return columns, features, groups


def resolve_classes(features: dict, columns: Columns, classes_file: Path | None,
                    groups: dict[str, list[RowGroup]]) -> tuple[list[str], str | None]:
    """Class names and, when they had to be made up, a note saying so."""
    if classes_file is not None:
        try:
            lines = classes_file.read_text().splitlines()
        except OSError as e:
            raise ConvertError(f"--classes {classes_file}: cannot read ({e.strerror or e})") from None
        classes = [line.strip() for line in lines if line.strip()]
        if not classes:
            raise ConvertError(f"--classes {classes_file}: no class names in it")
        origin = f"--classes {classes_file}"
    else:
        classes = class_names(features, columns.label)
        origin = f"the files' {columns.label!r} feature"
    note = None
    top = max((v for gs in groups.values() for g in gs for v in g.labels if v is not None), default=-1)
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
        note = (f"note: the files name no classes (no ClassLabel feature for {columns.label!r} in their "
                f"'huggingface' metadata): classes are numbered 0..{top}; --classes FILE names them")
    if top >= len(classes):
        g, r = next((g, r) for gs in groups.values() for g in gs for r, v in enumerate(g.labels)
                    if v is not None and v >= len(classes))
        raise ConvertError(f"{g.file}: row {g.first_row + r} has label {g.labels[r]}, but there are only "
                           f"{len(classes)} classes ({origin})")
    return classes, note


def _labelled(group: RowGroup) -> list[int]:
    # The hub marks a row without a label (ImageNet's test split) with -1.
    return [r for r, v in enumerate(group.labels) if v is not None and v >= 0]


def _display(base: Path, group: RowGroup, row: int) -> str:
    return f"{Path(group.file).relative_to(base).as_posix()}:{group.first_row + row}"


def _row_bytes(group: RowGroup) -> float:
    return group.nbytes / max(len(group.labels), 1)


def _ref(group: RowGroup, row: int) -> RowRef:
    return RowRef(group.file, group.index, row, tuple((c, v[row]) for c, v in group.others.items()))


# -- the plan ----------------------------------------------------------------------------------

def planned_rows(groups: list[RowGroup], shuffle: bool, seed: int,
                 window_bytes: float) -> list[tuple[RowGroup, int, bool]]:
    """(group, row, whether a shard may end after it) for every labelled row, in shard order.

    Without `shuffle`, file order (any row may end a shard). With it, the row groups in a seeded
    order, cut into windows of about `window_bytes` source bytes, each window's rows permuted:
    shards end only at window ends, so a writer holds one window of row groups at a time.
    """
    if not shuffle:
        return [(g, r, True) for g in groups for r in _labelled(g)]
    rng = np.random.default_rng(seed)
    windows, current, acc = [], [], 0.0
    for gi in rng.permutation(len(groups)):
        current.append(groups[gi])
        acc += groups[gi].nbytes
        if acc >= window_bytes:
            windows.append(current)
            current, acc = [], 0.0
    if current:
        windows.append(current)
    rows = []
    for window in windows:
        mine = [(g, r) for g in window for r in _labelled(g)]
        order = rng.permutation(len(mine))
        rows += [(*mine[i], k == len(order) - 1) for k, i in enumerate(order)]
    return rows


def build_items(base: Path, rows: list[tuple[RowGroup, int, bool]], ratio: float) -> list[Item]:
    """The split's items. An item's size (what plan_shards cuts shards by) is its estimated stored
    bytes; in a shuffled split the rows of a window weigh nothing but the last, which carries the
    whole window, so no shard ends inside a window."""
    items, pending = [], 0.0
    for i, (g, r, may_end) in enumerate(rows):
        pending += _row_bytes(g) * ratio
        size = int(pending) if may_end else 0
        if may_end:
            pending = 0.0
        items.append(Item(sample_key(i), _display(base, g, r), g.labels[r], size, _ref(g, r)))
    return items


def probe_items(base: Path, groups: list[RowGroup], per_group: int = 6, n_groups: int = 4) -> list[Item]:
    """A few rows from row groups spread over the split, to measure --max-side's size ratio while
    reading only `n_groups` row groups."""
    step = max(1, len(groups) // n_groups)
    return [Item(sample_key(0), _display(base, g, r), g.labels[r], 0, _ref(g, r))
            for g in groups[::step][:n_groups] for r in _labelled(g)[:per_group]]


def unlabelled_rejects(base: Path, groups: list[RowGroup]) -> list[dict]:
    return [{"path": _display(base, g, r), "reason": f"unlabelled (label {v})"}
            for g in groups for r, v in enumerate(g.labels) if v is None or v < 0]


# -- recipe hints -------------------------------------------------------------------------------

def fixed_size_extra(jobs: list[ShardJob], read_rows: RowReader, max_side: int | None) -> dict:
    """`image_size` and `pixel_stats` when every train image has one small size (at most
    STATS_MAX_SIDE): what train.recipes picks the CIFAR recipe by. Read from the source before the
    conversion, so the manifest is written once, complete; the scan stops at the first image that
    is larger or of another size (on ImageNet, the first one). Images that fail to open are left
    to the conversion, which rejects them."""
    from PIL import Image

    
    size, n = None, 0
    sums, squares = np.zeros(3), np.zeros(3)
    for job in jobs:
        for item in read_rows(job.items):
            data = item.source[0]
            if data is None:
                continue
            try:
                im = Image.open(io.BytesIO(data))
                if size is None:
                    size = im.size
                if im.size != size or max(size) > STATS_MAX_SIDE:
                    return {}  # only small fixed-size sets get a recipe hint: stop reading at once
                px = np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3) / 255
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
            sums += px.sum(0)
            squares += (px * px).sum(0)
            n += len(px)
    if size is None:
        return {}
    if max_side is not None and max(size) > max_side:
        return {"image_size": list(target_size(*size, max_side))}  # resized: the source's statistics differ
    extra = {"image_size": list(size)}
    if n:
        mean = sums / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0))
        extra["pixel_stats"] = {"split": "train", "mean": [round(float(v), 4) for v in mean],
                                "std": [round(float(v), 4) for v in std]}
    return extra


# -- the conversion ----------------------------------------------------------------------------

def convert(src: str | Path, out: Path, splits: list[str] | None = None, image_column: str | None = None,
            label_column: str | None = None, classes_file: Path | None = None, shard_size_mb: float = 256,
            max_side: int | None = None, quality: int = 90, seed: int = 49, workers: int | None = None,
            strict: bool = False, progress: bool = True, restart_interval: int | None = RESTART_INTERVAL_MCUS,
            keep_png: bool = False, staging: Path | None = None) -> tuple[dict, str]:
    """Run the conversion; return (manifest, summary text). Options as in
    convert.imagenet_to_shards.convert (`out` may be s3://bucket/prefix, staged in `staging`);
    `keep_png` stores PNG images losslessly (for CIFAR)."""
    t0 = time.perf_counter()
    require_pyarrow()
    base, files, unnamed = find_split_files(str(src))
    notes = [f"note: ignored {len(unnamed)} .parquet file(s) whose names name no split: "
             f"{', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}"] if unnamed else []
    missing = [s for s in splits or [] if s not in files]
    if missing:
        raise ConvertError(f"--splits {' '.join(missing)}: --src has no such files (it has {', '.join(files)})")
    files = {s: files[s] for s in SPLIT_NAMES if s in files and (not splits or s in splits)}
    columns, features, groups = scan_splits(files, image_column, label_column)
    for split, gs in list(groups.items()):
        if not any(_labelled(g) for g in gs):
            if splits:
                raise ConvertError(f"--splits {split}: no row of its files has a label (the hub marks "
                                   f"unlabelled rows -1); shards hold labelled samples only")
            notes.append(f"note: skipped {split}: none of its {sum(len(g.labels) for g in gs)} rows has a label "
                         f"(-1 on the hub); shards hold labelled samples only")
            del groups[split]
    if not groups:
        raise ConvertError(f"--src {src}: no split has labelled rows")
    classes, note = resolve_classes(features, columns, classes_file, groups)
    notes += [note] if note else []
    if progress:
        for line in notes:
            print(line, file=sys.stderr)

    options = {"max_side": max_side, "quality": quality, "seed": seed, "shard_size_mb": shard_size_mb,
               "restart_interval": restart_interval, "keep_png": keep_png, "image_column": columns.image,
               "label_column": columns.label, "shuffle_window_mb": SHUFFLE_WINDOW_MB}
    shard_bytes = int(shard_size_mb * 1e6)
    read_rows = RowReader(columns.image)
    planned, early_rejects = {}, {}
    for split, gs in groups.items():
        early_rejects[split] = unlabelled_rejects(base, gs)
        ratio = stored_ratio(probe_items(base, gs), options, encode_row, read_rows) if max_side else 1.0
        # Windows are counted in source bytes and never outgrow a shard.
        window = min(SHUFFLE_WINDOW_MB * 1e6, shard_bytes / max(ratio, 1e-6))
        rows = planned_rows(gs, split == "train", seed, window)
        planned[split] = plan_shards(split, build_items(base, rows, ratio), shard_bytes, encode_row, options, read_rows)
    if strict and any(early_rejects.values()):
        r = next(r for rs in early_rejects.values() for r in rs)
        raise ConvertError(f"{r['path']}: {r['reason']} (--strict)")

    extra = {}
    if "coarse_label" in columns.other_labels and class_names(features, "coarse_label"):
        extra["coarse_classes"] = class_names(features, "coarse_label")  # as convert.cifar_to_shards
    if "train" in planned:
        extra.update(fixed_size_extra(planned["train"], read_rows, max_side))
    manifest, reports = run_conversion(out, TOOL, classes, planned, options, workers or default_workers(), strict,
                                       unplanned_rejects=early_rejects, extra=extra, progress=progress,
                                       staging=staging)
    return manifest, "\n".join([format_summary(reports, time.perf_counter() - t0), *notes])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True,
                   help="folder of the hub's .parquet files (searched recursively), or a glob pattern")
    add_output_options(p)
    p.add_argument("--splits", nargs="+", choices=SPLIT_NAMES, help="splits to convert (default: those present)")
    p.add_argument("--image-column", help="column of the images (default: the Image feature, e.g. image or img)")
    p.add_argument("--label-column", help="column of the class index (default: the ClassLabel feature; label, "
                                          "then fine_label)")
    p.add_argument("--classes", type=Path, help="file of class names, one a line, for files that name none")
    add_image_options(p)
    p.add_argument("--keep-png", action="store_true",
                   help="store PNG images as lossless PNGs, not JPEGs (CIFAR: pixel-exact, as cifar_to_shards)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        require_pyarrow()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check_image_options(parser, a)
    if a.classes is not None and not a.classes.is_file():
        parser.error(f"--classes {a.classes}: no such file")
    return finish(lambda: convert(a.src, a.out, a.splits, a.image_column, a.label_column, a.classes,
                                  a.shard_size_mb, a.max_side, a.quality, a.seed, a.workers, a.strict,
                                  progress=not a.no_progress, restart_interval=restart_interval(a),
                                  keep_png=a.keep_png, staging=a.staging))


if __name__ == "__main__":
    raise SystemExit(main())
