"""Convert an ImageNet-style ImageFolder tree into WebDataset shards plus a manifest.

    python -m convert.imagenet_to_shards --src DIR --out DIR [--max-side 500 --quality 90]
    python -m convert.imagenet_to_shards --src DIR --out s3://bucket/prefix

DIR holds train/ and/or val/ as ImageFolder trees (<wnid>/<file>.JPEG); val/ may instead be the
flat layout ImageNet ships (val/*.JPEG) with --val-labels. Class indices are the sorted folder
names' positions, exactly as torchvision's ImageFolder assigns them. Each sample is
KEY.jpg (RGB JPEG), KEY.cls (class index) and KEY.json (source path, size, decode facts).
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from pipeline.shard_format import JPEG_EXT, RESTART_INTERVAL_MCUS, Sample, sample_key

from .cli import add_image_options, add_output_options, check_image_options, finish, restart_interval
from .images import IMG_EXTENSIONS, RejectedImage, prepare_image
from .runner import (ConvertError, Item, default_workers, format_summary, plan_shards, run_conversion,
                     stored_ratio)

TOOL = "convert.imagenet_to_shards"
SPLITS = ("train", "val")


def find_classes(root: Path) -> list[str]:
    """Class folders in index order, as torchvision.datasets.folder.find_classes gives them."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_folder_split(src: Path, split: str, class_to_idx: dict[str, int]) -> tuple[list[tuple], list[str]]:
    """(abs path, display path, label) for every image, in ImageFolder order; plus ignored files."""
    root = src / split
    samples, ignored = [], []
    for wnid in find_classes(root):
        if wnid not in class_to_idx:
            raise ConvertError(f"--src {src}: {split}/{wnid} is not a class of the train split")
        label = class_to_idx[wnid]
        for dirpath, _, fnames in sorted(os.walk(root / wnid, followlinks=True)):
            for fname in sorted(fnames):
                path = Path(dirpath) / fname
                rel = path.relative_to(src).as_posix()
                (samples.append((str(path), rel, label)) if is_image_file(fname) else ignored.append(rel))
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_file():
            ignored.append(f"{split}/{e.name}")
    return samples, ignored


def read_val_labels(path: Path) -> dict[str, str]:
    """Map image stem -> wnid from a Kaggle LOC_val_solution.csv or a plain 'filename wnid' list."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConvertError(f"--val-labels {path}: cannot read ({e.strerror or e})") from None
    labels: dict[str, str] = {}
    lines = text.splitlines()
    if lines and lines[0].startswith("ImageId"):
        for row in csv.reader(lines[1:]):
            if row and len(row) >= 2 and row[1].split():
                labels[Path(row[0]).stem] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.replace(",", " ").split()
            if len(fields) < 2:
                raise ConvertError(f"--val-labels {path}:{n}: expected 'filename wnid', got {line!r}")
            labels[Path(fields[0]).stem] = fields[1]
    if not labels:
        raise ConvertError(f"--val-labels {path}: no labels found")
    return labels


def scan_flat_val(src: Path, labels: dict[str, str], class_to_idx: dict[str, int]):
    """Flat val/*.JPEG: labels from the list. Unlabelled images are rejected, not dropped."""
    samples, ignored, unlabelled = [], [], []
    for e in sorted(os.scandir(src / "val"), key=lambda e: e.name):
        rel = f"val/{e.name}"
        if not e.is_file():
            continue
        if not is_image_file(e.name):
            ignored.append(rel)
            continue
        wnid = labels.get(Path(e.name).stem)
        if wnid is None:
            unlabelled.append({"path": rel, "reason": "no label in --val-labels"})
            continue
        if wnid not in class_to_idx:
            raise ConvertError(f"--val-labels: {e.name} has class {wnid!r}, which is not a known class")
        samples.append((e.path, rel, class_to_idx[wnid]))
    return samples, ignored, unlabelled


def encode_image_file(item: Item, options: dict) -> tuple[Sample, int]:
    """Encoder: read one source file and return its sample."""
    try:
        with open(item.source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RejectedImage(f"unreadable file ({e.strerror or e})") from None
    prepared = prepare_image(data, options.get("max_side"), options["quality"], options.get("restart_interval"))
    meta = {"path": item.path, "label": item.label, **prepared.meta}
    return Sample(prepared.jpeg, JPEG_EXT, item.label, meta), len(data)


def estimate_ratio(items: list[Item], options: dict, probes: int = 24) -> float:
    """Stored/source bytes when re-encoding, from a fixed, evenly spread sample of images."""
    if not options.get("max_side") or not items:
        return 1.0
    step = max(1, len(items) // probes)
    return stored_ratio(items[::step][:probes], options, encode_image_file)


def build_items(triples: list[tuple], order: np.ndarray | None) -> list[Item]:
    seq = [triples[i] for i in order] if order is not None else triples
    items = []
    for i, (path, rel, label) in enumerate(seq):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0  # the encoder will reject it with the reason
        items.append(Item(sample_key(i), rel, label, size, path))
    return items


def convert(src: Path, out: Path | str, splits: list[str] | None = None, val_labels: Path | None = None,
            shard_size_mb: float = 256, max_side: int | None = None, quality: int = 90, seed: int = 49,
            workers: int | None = None, strict: bool = False, progress: bool = True,
            restart_interval: int | None = RESTART_INTERVAL_MCUS, staging: Path | None = None) -> tuple[dict, str]:
    """Run the conversion; return (manifest, summary text). `out`: a folder or an object store
    URL (staged in `staging`). `restart_interval`: MCUs between the restart markers added to
    full-size JPEGs (0: one MCU row); None stores them byte for byte."""
    t0 = time.perf_counter()
    if not src.is_dir():
        raise ConvertError(f"--src {src}: no such directory")
    present = [s for s in SPLITS if (src / s).is_dir()]
    splits = splits or present
    missing = [s for s in splits if s not in present]
    if missing or not splits:
        raise ConvertError(f"--src {src}: holds no {' or '.join(missing or SPLITS)}/ directory")
    flat_val = "val" in splits and not find_classes(src / "val")
    if flat_val and val_labels is None:
        raise ConvertError(f"--src {src}: val/ is the flat layout; --val-labels FILE is required")
    labels = read_val_labels(val_labels) if flat_val else None

    if (src / "train").is_dir():
        classes = find_classes(src / "train")
    elif not flat_val:
        classes = find_classes(src / "val")
    else:
        classes = sorted(set(labels.values()))
    if not classes:
        raise ConvertError(f"--src {src}: no class folders found")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    options = {"max_side": max_side, "quality": quality, "seed": seed, "shard_size_mb": shard_size_mb,
               "restart_interval": restart_interval}
    shard_bytes = int(shard_size_mb * 1e6)
    planned, ignored, early_rejects = {}, {}, []
    for split in splits:
        if split == "val" and flat_val:
            triples, ignored[split], unlabelled = scan_flat_val(src, labels, class_to_idx)
            early_rejects += unlabelled
        else:
            triples, ignored[split] = scan_folder_split(src, split, class_to_idx)
        # Train is shuffled across shards so every shard mixes classes; val keeps its natural
        # order, which is what an exactly-once evaluation wants anyway.
        order = np.random.default_rng(seed).permutation(len(triples)) if split == "train" else None
        items = build_items(triples, order)
        ratio = estimate_ratio(items, options)
        for it in items:
            it.size = int(it.size * ratio)
        planned[split] = plan_shards(split, items, shard_bytes, encode_image_file, options)
    if strict and early_rejects:
        r = early_rejects[0]
        raise ConvertError(f"{r['path']}: {r['reason']} (--strict)")

    manifest, reports = run_conversion(out, TOOL, classes, planned, options, workers or default_workers(),
                                       strict, ignored, {"val": early_rejects}, progress=progress, staging=staging)
    return manifest, format_summary(reports, time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, type=Path, help="folder holding train/ and/or val/")
    add_output_options(p)
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="splits to convert (default: those present)")
    p.add_argument("--val-labels", type=Path, help="LOC_val_solution.csv or 'filename wnid' list for flat val/")
    add_image_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    check_image_options(parser, a)
    if a.val_labels is not None and not a.val_labels.is_file():
        parser.error(f"--val-labels {a.val_labels}: no such file")
    return finish(lambda: convert(a.src, a.out, a.splits, a.val_labels, a.shard_size_mb, a.max_side, a.quality,
                                  a.seed, a.workers, a.strict, progress=not a.no_progress,
                                  restart_interval=restart_interval(a), staging=a.staging))


if __name__ == "__main__":
    raise SystemExit(main())
