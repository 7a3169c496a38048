"""A learnable synthetic image-classification dataset, written as an ImageFolder of JPEGs.

Each class is a fixed combination of a shape, a hue and a stripe texture. Every image places one
to three instances of its class's object at a random position, scale and rotation on a noisy,
randomly tinted background, so a network has to learn shape, colour and texture rather than a
single pixel statistic. Images default to ImageNet-like sizes (mostly 500x375 or 375x500, about
110 KB at q90), so loader and converter benchmarks see realistic decode costs.

    python -m convert.synthetic --out DIR [--classes K --per-class N --val-per-class M --seed S]
    python -m convert.synthetic --out DIR --format cifar --size 128   # CIFAR-10's python files, 32 px

Output is deterministic from the seed: image i of class k is drawn from an RNG keyed on
(seed, split, k, i), independent of the worker count.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "bars")
HUES = 12
TEXTURES = 4  # stripe periods, in units of the object's size
COMPLETE_MARKER = "synthetic.json"
GENERATOR_VERSION = 2  # bump when the images change, so cached datasets are regenerated
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    classes: int = 10
    per_class: int = 100
    val_per_class: int = 20
    seed: int = 49
    size: int = 500  # longer side of most images, in pixels; ImageNet's typical is 500
    quality: int = 90
    noise: float = 22.0  # background noise std in uint8 units; sets the JPEG's size


def wnid(k: int) -> str:
    """ImageNet-style folder name of class k."""
    return f"n{k:08d}"


def class_attributes(k: int) -> tuple[str, float, int]:
    """The (shape, hue, texture) that define class k."""
    s = k % len(SHAPES)
    shape = SHAPES[s]
    # A bijection on k < 96 that also changes the hue between neighbouring classes, so even a
    # handful of classes differ in colour as well as in shape.
    hue = ((k // len(SHAPES) + 5 * s) % HUES) / HUES
    texture = (k // (len(SHAPES) * HUES)) % TEXTURES
    return shape, hue, texture


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    # 80 % of ImageNet's photos are 4:3 landscape or portrait; keep a spread of others.
    r = rng.random()
    if r < 0.45:
        w, h = size, size * 3 // 4
    elif r < 0.8:
        w, h = size * 3 // 4, size
    else:
        # The rest spread in aspect and size, some larger than `size` (as ImageNet's are).
        aspect = rng.uniform(0.6, 1.6)
        side = int(size * rng.uniform(0.6, 1.6))
        w, h = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
    return max(w, 8), max(h, 8)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple]]:
    """Polygons (outer outlines) approximating `shape`; a ring is drawn as two."""
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape in ("circle", "ring"):
        n = 48
        outer = [(r * math.cos(2 * math.pi * i / n), r * math.sin(2 * math.pi * i / n)) for i in range(n)]
        if shape == "circle":
            return [rot(outer)]
        inner = [(0.55 * x, 0.55 * y) for x, y in outer]
        return [rot(outer), rot(inner)]
    if shape == "square":
        return [rot([(-r, -r), (r, -r), (r, r), (-r, r)])]
    if shape == "triangle":
        return [rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if shape == "diamond":
        return [rot([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])]
    if shape == "cross":
        t = r / 3
        return [rot([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r),
                     (-t, t), (-r, t), (-r, -t), (-t, -t)])]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return [rot(pts)]
    if shape == "bars":
        t = r / 5
        return [rot([(x0, -r), (x0 + t, -r), (x0 + t, r), (x0, r)]) for x0 in (-r, -r + 2 * t, -r + 4 * t)]
    raise ValueError(f"unknown shape {shape!r}")


def render(k: int, index: int, split: str, cfg: SyntheticConfig) -> Image.Image:
    """Render image `index` of class `k` in `split`, deterministically."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], k, index])
    w, h = _image_size(rng, cfg.size)
    shape, hue, texture = class_attributes(k)

    # Background: a tinted linear gradient plus noise; the tint is random, so colour alone
    # does not give the class away.
    bg0 = rng.uniform(40, 215, size=3)
    bg1 = rng.uniform(40, 215, size=3)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
    grad = bg0[None, :] + (bg1 - bg0)[None, :] * t[:, None]
    if grad.shape[0] == w:
        img = np.broadcast_to(grad[None, :, :], (h, w, 3)).astype(np.float32)
    else:
        img = np.broadcast_to(grad[:, None, :], (h, w, 3)).astype(np.float32)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.12, 0.32)) * min(w, h)
        cx = float(rng.uniform(r, w - r))
        cy = float(rng.uniform(r, h - r))
        angle = float(rng.uniform(0, 2 * math.pi)) if shape != "circle" else 0.0
        mask_img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask_img)
        polys = _shape_polygon(shape, cx, cy, r, angle)
        draw.polygon(polys[0], fill=255)
        for hole in polys[1:]:
            draw.polygon(hole, fill=0 if shape == "ring" else 255)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0

        jitter_h = (hue + rng.uniform(-0.025, 0.025)) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(jitter_h, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))) * 255
        # Texture: stripes whose period (relative to the object) and direction depend on the class.
        period = r * (0.25 + 0.2 * texture)
        theta = angle + texture * math.pi / 4
        phase = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / period
        stripes = 0.72 + 0.28 * (np.sin(2 * math.pi * phase) > 0)
        fg = rgb[None, None, :] * stripes[..., None]
        img = img * (1 - mask) + fg * mask

    img += rng.normal(0.0, cfg.noise, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _write_one(job: tuple[int, int, str, str, SyntheticConfig]) -> int:
    k, index, split, path, cfg = job
    buf = io.BytesIO()
    render(k, index, split, cfg).save(buf, format="JPEG", quality=cfg.quality)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return buf.tell()


def generate(out: str | os.PathLike, cfg: SyntheticConfig, workers: int | None = None,
             progress: bool = True) -> Path:
    """Write the dataset as OUT/{train,val}/<wnid>/<wnid>_<i>.JPEG; return OUT.

    A finished dataset carries a marker with its config; asking again for the same config
    returns at once, which is what makes the demo's cache work.
    """
    out = Path(out)
    marker = out / COMPLETE_MARKER
    if is_finished(marker, _marker(cfg)):
        return out
    jobs = []
    for split, n in (("train", cfg.per_class), ("val", cfg.val_per_class)):
        for k in range(cfg.classes):
            d = out / split / wnid(k)
            if n:
                d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                jobs.append((k, i, split, str(d / f"{wnid(k)}_{i}.JPEG"), cfg))
    workers = workers or os.cpu_count() or 1
    bar = _progress_bar(len(jobs), progress)
    if workers == 1:
        for job in jobs:
            _write_one(job)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=16):
                bar.update(1)
    bar.close()
    mark_finished(marker, _marker(cfg))
    return out


CIFAR_SIZE = 32


def _cifar_row(job: tuple[int, int, str, SyntheticConfig]) -> np.ndarray:
    """One image as a CIFAR row: the render's centre square, downscaled (antialiased) to 32 x 32,
    planar RGB (3 x 1024 bytes)."""
    k, index, split, cfg = job
    im = render(k, index, split, cfg)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((CIFAR_SIZE, CIFAR_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(im, np.uint8).transpose(2, 0, 1).reshape(-1)


def generate_cifar(out: str | os.PathLike, cfg: SyntheticConfig, workers: int | None = None,
                   progress: bool = True) -> Path:
    """Write the dataset in the layout of CIFAR-10's python download (OUT/cifar-10-batches-py:
    data_batch_1..5, test_batch, batches.meta) at 32 x 32, the val images as the test batch;
    return the folder. The pickles are what `convert.cifar_to_shards` and torchvision's CIFAR10
    read."""
    import pickle

    folder = Path(out) / "cifar-10-batches-py"
    marker = folder / COMPLETE_MARKER
    if is_finished(marker, _marker(cfg)):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jobs = {split: [(k, i, split, cfg) for i in range(n) for k in range(cfg.classes)]
            for split, n in (("train", cfg.per_class), ("val", cfg.val_per_class))}
    bar = _progress_bar(sum(len(j) for j in jobs.values()), progress)
    rows = {}
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for split, js in jobs.items():
            rows[split] = []
            for row in pool.map(_cifar_row, js, chunksize=32):
                rows[split].append(row)
                bar.update(1)
    bar.close()
    parts = np.array_split(np.arange(len(jobs["train"])), 5)
    batches = [(f"data_batch_{b + 1}", part) for b, part in enumerate(parts)]
    files = [(n, i, "train") for n, i in batches] + [("test_batch", np.arange(len(jobs["val"])), "val")]
    for name, idx, split in files:
        data = np.stack([rows[split][i] for i in idx]) if len(idx) else np.zeros((0, 3072), np.uint8)
        labels = [jobs[split][i][0] for i in idx]
        # str keys, as Python 2 wrote them: what torchvision (latin1) and our converter (bytes) read
        body = {"batch_label": name, "labels": labels, "data": data,
                "filenames": [f"{wnid(jobs[split][i][0])}_{jobs[split][i][1]}.png" for i in idx]}
        (folder / name).write_bytes(pickle.dumps(body, protocol=2))
    meta = {"label_names": [wnid(k) for k in range(cfg.classes)], "num_cases_per_batch": len(batches[0][1])}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    mark_finished(marker, _marker(cfg))
    return folder


def _marker(cfg: SyntheticConfig) -> dict:
    """What a finished dataset records, and what a cached one must match."""
    return {**asdict(cfg), "generator": GENERATOR_VERSION}


def is_finished(marker: Path, record: dict) -> bool:
    """Whether a generated set was finished with this `record` (its config): an absent,
    unreadable or different marker means "generate it again"."""
    try:
        return json.loads(marker.read_text()) == record
    except (OSError, ValueError):
        return False


def mark_finished(marker: Path, record: dict) -> None:
    """Written last and atomically, so a set interrupted half-way is never taken as finished."""
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, marker)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="synthetic", disable=not enabled, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output ImageFolder root (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=SyntheticConfig.classes)
    p.add_argument("--per-class", type=int, default=SyntheticConfig.per_class, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=SyntheticConfig.val_per_class)
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p.add_argument("--size", type=int, default=SyntheticConfig.size, help="longer side in pixels")
    p.add_argument("--quality", type=int, default=SyntheticConfig.quality)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--format", choices=("imagefolder", "cifar"), default="imagefolder",
                   help="an ImageFolder of JPEGs, or CIFAR-10's python files at 32 x 32 (rendered at --size)")
    a = p.parse_args(argv)
    for name in ("classes", "size", "quality"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be positive")
    if a.per_class < 0 or a.val_per_class < 0:
        p.error("--per-class and --val-per-class must be >= 0")
    cfg = SyntheticConfig(classes=a.classes, per_class=a.per_class, val_per_class=a.val_per_class,
                          seed=a.seed, size=a.size, quality=a.quality)
    where = generate_cifar(a.out, cfg, workers=a.workers) if a.format == "cifar" else generate(a.out, cfg, a.workers)
    print(f"wrote {cfg.classes * (cfg.per_class + cfg.val_per_class)} images to {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
