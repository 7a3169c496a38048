"""Train-loader throughput, side by side in one run: the pytorch/examples reference
(ImageFolder + DataLoader), plain webdataset, our CPU backend (1 and 2 workers; full-size shards
with and without the restart index, and --max-side 256 shards), our synthetic backend, and the
decode ceilings.

    python -m benchmarks.loader [--classes 20 --per-class 100 --batch-size 64 --repeats 3]
    python -m benchmarks.loader --src IMAGEFOLDER          # your data: converted once, cached
    python -m benchmarks.loader --shards SHARDS [--src IMAGEFOLDER]   # your shards as they are

The default set is JPEGs cut from real photographs (`benchmarks.photos`, needs scikit-image);
`--content synthetic` uses the older flat renders, which decode faster and flatter every figure.

Every loader does RandomResizedCrop(224) + horizontal flip. Ours is measured as the batches
a GPU would receive (uint8 NHWC, normalized on the device) and, separately, normalized on the
CPU in the main process. Rates are medians of full epochs after a warm-up epoch.

Efficiency is a loader's img/s / (min(workers, cores) x our single-core rate for the same
per-sample work: BatchDecoder decoding the same shards with the same kind of crops, in-process).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .common import CONTENTS, DEFAULT_CACHE, epoch_rate, imagenet_like, print_machine, table, timed, write_json


def reference_transform():
    """pytorch/examples' train transform, which both reference loaders run."""
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def reference_loader(root: Path, workers: int, batch: int):
    from torchvision import datasets

    ds = datasets.ImageFolder(str(root / "train"), reference_transform())
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=True, drop_last=True)


def webdataset_loader(shards: Path, workers: int, batch: int):
    import webdataset as wds

    from pipeline.shard_format import JPEG_EXT, LABEL_EXT, load_manifest

    urls = [str(shards / s["name"]) for s in load_manifest(shards)["splits"]["train"]["shards"]]
    tf = reference_transform()
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .shuffle(1000).decode("pil").to_tuple(JPEG_EXT, LABEL_EXT).map_tuple(tf, lambda c: c).batched(batch))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)


def decode_ceiling(shards: Path, n: int = 2000) -> dict:
    """Single-core images/s of a full Pillow decode and of our crop-region decode + resize (the
    loader's per-sample work, with the train config's decoder settings), on the first n samples;
    the *_cpu rates are per second of CPU time, which other jobs' load does not move."""
    from PIL import Image

    from pipeline.augment import Transform
    from pipeline.decode import BatchDecoder
    from pipeline.samples import SampleReader
    from pipeline.source import open_split

    table_ = open_split(shards, "train")
    dec = BatchDecoder(SampleReader(table_), Transform(224, train=True), seed=49, fast_dct=True, dct_scaling=True)
    datas = [bytes(dec.samples.bytes(i)) for i in range(min(n, len(table_)))]

    def full():
        for d in datas:
            Image.open(io.BytesIO(d)).convert("RGB")
        return len(datas)

    images = np.empty((len(datas), 224, 224, 3), np.uint8)
    labels = np.empty(len(datas), np.int64)

    def ours():
        dec.decode_batch(0, np.arange(len(datas)), images, labels)
        return len(datas)

    pil, mine = timed(full, 3), timed(ours, 3)
    return {"pil_full": pil["median"], "ours": mine["median"], "pil_full_cpu": pil["cpu_rate"],
            "ours_cpu": mine["cpu_rate"]}


def image_folder_error(path: Path) -> str | None:
    """Why `path` is not an ImageFolder with a train/ split of class folders, or None."""
    if not path.is_dir():
        return f"{path} is not a directory"
    train = path / "train"
    if not train.is_dir():
        return f"{path} has no train/ folder (expected train/<class>/<image> [and val/])"
    if not any(c.is_dir() and any(f.is_file() for f in c.iterdir()) for c in train.iterdir()):
        return f"{train} has no class folders with images"
    return None


def shards_error(path: Path) -> str | None:
    """Why `path` is not a shard folder with a train split, or None."""
    from pipeline.shard_format import load_manifest

    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        manifest = load_manifest(path)
    except (OSError, ValueError) as e:
        return f"{path} has no readable manifest.json ({e})"
    if "train" not in manifest.get("splits", {}):
        return f"{path}'s manifest has no train split"
    return None


def _fingerprint(src: Path) -> str:
    """Names, sizes and mtimes of src's train images: a changed folder gets fresh shards."""
    h = hashlib.sha1(str(src.resolve()).encode())
    for f in sorted((src / "train").rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# (label, --max-side): full-size shards with the converter's default restart index, the same
# stored byte for byte (--no-restart-index), and resized ones.
SHARD_KINDS = (("full", None), ("full-noindex", None), ("max256", 256))


def resolve_data(a, content: str, labels=SHARD_KINDS) -> tuple[Path | None, dict[str, Path]]:
    """The ImageFolder (None with --shards alone) and the shard folders to measure, by label."""
    from convert.imagenet_to_shards import convert
    from pipeline.shard_format import RESTART_INTERVAL_MCUS

    if a.shards is not None:
        return a.src, {"given": a.shards}
    if a.src is not None:
        src, cache, stem = a.src, DEFAULT_CACHE, f"src_{_fingerprint(a.src)}"
    else:
        src = imagenet_like(a.classes, a.per_class, content=content)
        cache, stem = src.parent, src.name
    shards = {}
    for label, max_side in labels:
        out = cache / f"{stem}_shards_{label}"
        if not (out / "manifest.json").exists():
            restarts = None if label.endswith("noindex") else RESTART_INTERVAL_MCUS
            convert(src, out, splits=["train"], shard_size_mb=8, max_side=max_side, progress=False,
                    restart_interval=restarts)
        shards[label] = out
    return src, shards


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--content", choices=CONTENTS, default=None,
                   help="the generated set: real-photo crops (default) or synthetic renders (the default "
                        "with --device/--per-backend, whose end-to-end check trains on them)")
    p.add_argument("--src", type=Path, default=None,
                   help="your ImageFolder (train/<class>/*, val/ optional) instead of the generated set")
    p.add_argument("--shards", type=Path, default=None,
                   help="your existing shards, measured as they are; the reference loaders need --src too")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-reference", action="store_true", help="only our loaders")
    p.add_argument("--chart", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--device", default="cpu", help="cuda: measure batches delivered to the GPU, per backend")
    p.add_argument("--backends", nargs="+", default=["cpu", "nvjpeg"], help="with --device cuda or --per-backend")
    p.add_argument("--per-backend", action="store_true",
                   help="the device check's table (each --backends on --device) even on a CPU, to rehearse it")
    p.add_argument("--image-size", type=int, default=224)
    a = p.parse_args(argv)
    # Bad paths fail here, naming the flag, before minutes of dataset building.
    if a.src is not None and (why := image_folder_error(a.src)):
        p.error(f"--src: {why}")
    if a.shards is not None and (why := shards_error(a.shards)):
        p.error(f"--shards: {why}")
    if min(a.workers) < 1 or a.batch_size < 1 or a.repeats < 1:
        p.error("--workers, --batch-size and --repeats must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.device != "cpu" or a.per_backend:
        return device_benchmark(a, argv)
    machine = print_machine()

    from pipeline import create_loader
    from pipeline.source import open_split

    content = a.content or "photos"
    src, shards = resolve_data(a, content)
    n_train = len(open_split(next(iter(shards.values())), "train"))
    cores = len(os.sched_getaffinity(0))
    what = "your shards" if a.shards else "your ImageFolder" if a.src else f"ImageNet-like, {content}"
    print(f"dataset: {n_train} train samples ({what}), batch {a.batch_size}, {cores} cores")

    ceil = {label: decode_ceiling(path) for label, path in shards.items()}
    rows = []
    for label, c in ceil.items():
        rows += [{"name": f"1 core: full Pillow decode, {label} shards", "img_s": c["pil_full"],
                  "cpu_img_s": c["pil_full_cpu"]},
                 {"name": f"1 core: ours, ROI decode + resize, {label} shards", "img_s": c["ours"],
                  "cpu_img_s": c["ours_cpu"]}]
    ref_rate = None
    bs = a.batch_size
    if a.skip_reference:
        pass
    elif src is None:
        print("reference loaders skipped: they read an ImageFolder, and --shards was given without --src")
    else:
        for w in a.workers:
            dl = reference_loader(src, w, bs)
            r = epoch_rate(lambda: dl, a.repeats)
            rows.append({"name": f"reference: ImageFolder + DataLoader, {w} workers", "img_s": r["median"]})
            if w == max(a.workers):
                ref_rate = r["median"]
            del dl
        first = next(iter(shards))
        wl = webdataset_loader(shards[first], max(a.workers), bs)
        r = epoch_rate(lambda: wl, a.repeats)
        rows.append({"name": f"plain webdataset, {first} shards, {max(a.workers)} workers", "img_s": r["median"]})
        del wl

    for label in shards:
        for w in a.workers:
            for mode in ("process", "thread"):
                for normalize in (False, True):
                    if (normalize and (mode == "thread" or label != "full")) or \
                            (mode == "thread" and label == "full-noindex"):
                        continue
                    ld = create_loader(shards[label], batch_size=bs, image_size=224, device="cpu", workers=w,
                                       worker_mode=mode, normalize=normalize, dtype=torch.float32)
                    r = epoch_rate(lambda: ld, a.repeats)
                    ld.close()
                    out = "normalized fp32" if normalize else "uint8 for the device"
                    rows.append({"name": f"ours cpu, {label} shards, {w} {mode} workers, {out}",
                                 "img_s": r["median"], "shards": label, "workers": w, "mode": mode,
                                 "normalize": normalize,
                                 # the honest ceiling: the same per-sample work on the cores it may use
                                 "efficiency": r["median"] / (min(w, cores) * ceil[label]["ours"])})
    first = next(iter(shards))
    syn = create_loader(shards[first], backend="synthetic", batch_size=bs, image_size=224, device="cpu")
    rows.append({"name": "ours synthetic backend", "img_s": epoch_rate(lambda: syn, a.repeats)["median"]})

    for r in rows:
        if r["name"].startswith(("ours synthetic", "1 core")):
            continue  # no decode at all / one core against a 2-worker loader: a ratio would mislead
        if ref_rate:
            r["vs_ref"] = r["img_s"] / ref_rate
    print(table(rows, [("name", "loader", "s"), ("img_s", "img/s", ".0f"), ("vs_ref", "x reference", ".2f"),
                       ("efficiency", "of workers x 1-core rate", ".0%"), ("cpu_img_s", "img/CPU-s", ".0f")]))
    path = write_json("loader", {"rows": rows, "images": n_train, "batch_size": bs, "cores": cores,
                                 "content": None if (a.src or a.shards) else content,
                                 "ceilings": ceil,
                                 "command": "python -m benchmarks.loader " + " ".join(argv or [])},
                      machine=machine)
    print(f"wrote {path}")
    chart = Path(a.chart) if a.chart else path.with_suffix(".png")
    try:
        draw_chart(rows, chart)
        print(f"wrote {chart}")
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no chart")
    return 0


def device_benchmark(a, argv) -> int:
    """Loader alone on a GPU machine: normalized bf16 batches on the device, per backend."""
    sync = torch.cuda.synchronize if torch.device(a.device).type == "cuda" else (lambda: None)
    from pipeline import create_loader

    machine = print_machine(a.device)

    # The device check trains end to end on these shards afterwards, by this folder name.
    _, found = resolve_data(a, a.content or "synthetic", labels=(("full", None),))
    shards = found.get("given", found.get("full"))
    rows = []

    def save():
        return write_json(f"loader_{a.device.split(':')[0]}", {
            "rows": rows, "batch_size": a.batch_size, "command": "python -m benchmarks.loader " + " ".join(argv or [])},
            machine=machine)

    for backend in a.backends:
        for w in a.workers:
            try:
                ld = create_loader(shards, backend=backend, batch_size=a.batch_size, image_size=a.image_size,
                            device=a.device, workers=w, dtype=torch.bfloat16)
            except ImportError as e:  # e.g. DALI not installed on this machine
                rows.append({"name": f"{backend}, {w} workers", "img_s": None, "note": str(e)[:60]})
                continue

            def epoch():
                n = 0
                for _, y in ld:
                    n += len(y)
                sync()
                return n
            r = timed(epoch, repeats=a.repeats, warmup=1)
            rows.append({"name": f"{backend}, {w} workers", "backend": backend, "workers": w, "img_s": r["median"],
                         "loader_gpu_bytes": ld.stats.device_bytes})
            ld.close()
            print(f"{backend} {w} workers: {r['median']:.0f} img/s", flush=True)
            save()  # after every row: a run cut short by a time limit keeps what it measured
    print(table(rows, [("name", "loader to the device", "s"), ("img_s", "img/s", ".0f"), ("note", "note", "s")]))
    print(f"wrote {save()}")
    return 0


def draw_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows if not r["name"].startswith("ours synthetic")]
    vals = [r["img_s"] for r in rows if not r["name"].startswith("ours synthetic")]
    colours = ["#999999" if n.startswith("1 core") else "#4477aa" if n.startswith("ours") else "#cc6677"
               for n in names]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(names) + 1))
    ax.barh(range(len(names)), vals, color=colours)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (RandomResizedCrop 224 + flip)")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_title(f"Train loader throughput ({time.strftime('%Y-%m-%d')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
