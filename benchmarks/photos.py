"""ImageNet-like JPEGs cut from real photographs, for benchmarks only.

Synthetic renders (flat colours, smooth gradients) decode much faster than camera JPEGs of the
same size, which inflates every loader figure. This builds an ImageFolder from the photographs
that ship inside scikit-image's wheel (`skimage/data`, no download): each image is a random crop
of one photo at an ImageNet-like size (upscaled where the photo is smaller), with a slight blur or
sharpen, camera-like noise (shot noise + read noise) and ImageNet's mix of JPEG quality and chroma
subsampling, plus a few greyscale and CMYK files.

    python -m benchmarks.photos --out DIR [--classes 10 --per-class 100 --seed 49]

The class folder is arbitrary (any photo can land in any class): the set measures speed, not
accuracy. With `labels="photo"` (`--labels photo`) it is a classification task instead: class k's
images are all cut from photo k (at most 16 classes), so a model can learn it (the time-to-accuracy
benchmark uses it). Output is deterministic from the seed: image i of class k is drawn from an RNG keyed on
(seed, split, k, i), whatever the worker count.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from convert.synthetic import is_finished, mark_finished, wnid

# Photographs in scikit-image's wheel (not charts, drawings or microscopy of synthetic shapes).
COLOUR = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
          "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
GREY = ("camera.png", "moon.png", "grass.png", "gravel.png", "brick.png", "coins.png", "clock_motion.png")
COMPLETE_MARKER = "photos.json"
GENERATOR_VERSION = 1  # bump when the images change, so cached sets are regenerated
_SPLIT_IDS = {"train": 0, "val": 1}
LABELS = ("arbitrary", "photo")
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}  # Pillow's codes


@dataclass(frozen=True)
class PhotoConfig:
    classes: int = 10
    per_class: int = 100
    val_per_class: int = 10
    seed: int = 49
    grey_fraction: float = 0.02  # ImageNet has a few per cent greyscale JPEGs
    cmyk_fraction: float = 0.005  # and a handful of CMYK ones
    labels: str = "arbitrary"  # or "photo": class k is photo k (a learnable task)

    def __post_init__(self):
        if self.labels not in LABELS:
            raise ValueError(f"labels {self.labels!r}: expected one of {', '.join(LABELS)}")
        if self.labels == "photo" and not 1 <= self.classes <= len(COLOUR + GREY):
            raise ValueError(f"labels 'photo' has one class per photo: 1 to {len(COLOUR + GREY)} classes, "
                             f"not {self.classes}")


@dataclass(frozen=True)
class Plan:
    """Everything drawn for one image before any pixel work, so the mix can be checked cheaply."""
    photo: str
    width: int
    height: int
    quality: int
    subsampling: str
    mode: str  # "RGB", "L" or "CMYK"
    crop_scale: float  # fraction of the photo's area the crop covers, before resizing
    filter: str  # "blur", "sharpen" or "none"
    gain: float  # shot-noise scale: variance in uint8 units per unit of intensity


def photo_dir() -> Path:
    """scikit-image's bundled data folder, found without importing the (slow to import) package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the photo benchmark set needs scikit-image: pip install scikit-image "
                          "(or pip install -e '.[bench]'); or pass --content synthetic")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [f for f in COLOUR + GREY if not (folder / f).exists()]
    if missing:
        raise ImportError(f"scikit-image's wheel lacks {missing} in {folder}: install scikit-image >= 0.19")
    return folder


def _size(rng: np.random.Generator) -> tuple[int, int]:
    # ImageNet: most photos have a 500 px longer side at 4:3 or 3:4; the rest spread in size and
    # aspect, some much larger. Mean about 500 x 430 (measured by the tests over many draws).
    if rng.random() < 0.55:
        long = 500
    else:
        long = int(np.clip(rng.lognormal(np.log(540), 0.35), 160, 1400))
    r = rng.random()
    aspect = 4 / 3 if r < 0.55 else 1.0 if r < 0.7 else 3 / 2 if r < 0.8 else rng.uniform(1.0, 2.0)
    short = max(int(round(long / aspect)), 64)
    return (long, short) if rng.random() < 0.8 else (short, long)


def _quality(rng: np.random.Generator) -> int:
    r = rng.random()
    if r < 0.08:
        return int(rng.integers(50, 75))
    if r < 0.92:
        return int(rng.integers(75, 96))
    return int(rng.integers(96, 99))


def plan(k: int, index: int, split: str, cfg: PhotoConfig) -> Plan:
    """What image `index` of class `k` in `split` will be: photo, size, JPEG settings, noise."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], k, index])
    w, h = _size(rng)
    r = rng.random()
    mode = "L" if r < cfg.grey_fraction else "CMYK" if r < cfg.grey_fraction + cfg.cmyk_fraction else "RGB"
    # Colour photos dominate, as in ImageNet; greyscale sources still appear as RGB files.
    photos = COLOUR if rng.random() < 0.75 else GREY
    photo = photos[int(rng.integers(len(photos)))]
    if cfg.labels == "photo":  # (after the same draws, so the other fields do not change)
        photo = (COLOUR + GREY)[k]
    s = rng.random()
    subsampling = "4:2:0" if s < 0.85 else "4:4:4" if s < 0.97 else "4:2:2"
    f = rng.random()
    return Plan(photo, w, h, _quality(rng), subsampling, mode, float(rng.uniform(0.3, 1.0)),
                "blur" if f < 0.3 else "sharpen" if f < 0.6 else "none", float(rng.uniform(1.0, 3.0)))


_PHOTOS: dict[str, np.ndarray] = {}


def _photo(name: str) -> Image.Image:
    if name not in _PHOTOS:
        with Image.open(photo_dir() / name) as im:
            _PHOTOS[name] = np.asarray(im.convert("RGB"))
    return Image.fromarray(_PHOTOS[name])


def render(k: int, index: int, split: str, cfg: PhotoConfig) -> bytes:
    """The JPEG bytes of image `index` of class `k` in `split`, deterministically."""
    p = plan(k, index, split, cfg)
    # A second stream for pixel-level draws, so adding one never shifts the plan's.
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], k, index, 1])
    src = _photo(p.photo)
    sw, sh = src.size
    # Crop of the target aspect covering crop_scale of the photo's area (capped by the photo).
    aspect = p.width / p.height
    cw = min(sw, int(round((p.crop_scale * sw * sh * aspect) ** 0.5)))
    ch = min(sh, int(round(cw / aspect)))
    cw = min(cw, int(round(ch * aspect)))
    x0 = int(rng.integers(0, sw - cw + 1))
    y0 = int(rng.integers(0, sh - ch + 1))
    im = src.resize((p.width, p.height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p.filter == "blur":
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 0.9))))
    elif p.filter == "sharpen":
        im = im.filter(ImageFilter.UnsharpMask(radius=1.5, percent=int(rng.integers(40, 120)), threshold=2))
    a = np.asarray(im, np.float32)
    # White balance / exposure differences between cameras.
    a = a * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    # Shot noise (variance proportional to intensity) plus read noise, as a sensor produces; the
    # upscaled crops then carry fine detail again, which is what makes camera JPEGs costly.
    sigma = np.sqrt(p.gain * np.maximum(a, 0) + 2.0)
    a += sigma * rng.standard_normal(a.shape, dtype=np.float32)
    im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    if p.mode != "RGB":
        im = im.convert(p.mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=p.quality, subsampling=SUBSAMPLING[p.subsampling])
    return buf.getvalue()


def _write_one(job: tuple[int, int, str, str, PhotoConfig]) -> int:
    k, index, split, path, cfg = job
    data = render(k, index, split, cfg)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def _marker(cfg: PhotoConfig) -> dict:
    fields = asdict(cfg)
    if fields["labels"] == "arbitrary":
        del fields["labels"]  # the marker of sets made before the option existed
    return {"version": GENERATOR_VERSION, **fields}


def generate(out: str | os.PathLike, cfg: PhotoConfig, workers: int | None = None) -> Path:
    """Write the set as OUT/{train,val}/<wnid>/<wnid>_<i>.JPEG and return OUT; a finished set
    with the same config is reused."""
    photo_dir()  # fail before any work if scikit-image is missing
    out = Path(out)
    marker = out / COMPLETE_MARKER
    if is_finished(marker, _marker(cfg)):
        return out
    jobs = []
    for split, n in (("train", cfg.per_class), ("val", cfg.val_per_class)):
        for k in range(cfg.classes if n else 0):
            d = out / split / wnid(k)
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(k, i, split, str(d / f"{wnid(k)}_{i}.JPEG"), cfg) for i in range(n)]
    workers = workers or len(os.sched_getaffinity(0))
    if workers == 1:
        for job in jobs:
            _write_one(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    mark_finished(marker, _marker(cfg))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.photos", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=49)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--labels", choices=LABELS, default="arbitrary", help="photo: class k is photo k (learnable)")
    a = p.parse_args(argv)
    try:
        cfg = PhotoConfig(a.classes, a.per_class, a.val_per_class, a.seed, labels=a.labels)
    except ValueError as e:
        p.error(str(e))
    out = generate(a.out, cfg, a.workers)
    files = list((out / "train").rglob("*.JPEG"))
    sizes = [Image.open(f).size for f in files]
    print(f"{out}: {len(files)} train JPEGs, mean {np.mean([s[0] for s in sizes]):.0f} x "
          f"{np.mean([s[1] for s in sizes]):.0f} px, {np.mean([f.stat().st_size for f in files]) / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
