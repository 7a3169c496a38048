"""Train-loader throughput, side by side in one run: the pytorch/examples reference
(ImageFolder + DataLoader), plain webdataset, our CPU backend (1 and 2 workers, full-size and
--max-side 256 shards), our synthetic backend, and the decode ceilings.

    python -m benchmarks.loader [--classes 20 --per-class 100 --batch-size 64 --repeats 3]

Every loader does RandomResizedCrop(224) + horizontal flip. Ours is measured as the batches
a GPU would receive (uint8 NHWC, normalized on the device) and, separately, normalized on the
CPU in the main process. Rates are medians of full epochs after a warm-up epoch.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch

from .common import imagenet_like, table, timed, write_json


def epoch_rate(make_iter, repeats: int) -> dict:
    """Median images/s over full passes of an iterable of (images, labels) batches."""
    def once():
        n = 0
        for _, y in make_iter():
            n += len(y)
        return n
    return timed(once, repeats=repeats, warmup=1)


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


def decode_ceiling(shards: Path, n: int = 300) -> dict:
    """Single-core images/s of a full Pillow decode and of our crop-region decode + resize."""
    from PIL import Image

    from pipeline.augment import Transform
    from pipeline.decode import BatchDecoder
    from pipeline.samples import SampleReader
    from pipeline.source import open_split

    table_ = open_split(shards, "train")
    dec = BatchDecoder(SampleReader(table_), Transform(224, train=True), seed=49, fast_dct=True)
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

    return {"pil_full": timed(full, 3)["median"], "ours": timed(ours, 3)["median"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=100)
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
    if a.device != "cpu" or a.per_backend:
        return device_benchmark(a, argv)

    from convert.imagenet_to_shards import convert
    from pipeline import create_loader

    src = imagenet_like(a.classes, a.per_class)
    cache = src.parent
    shards = {}
    for label, max_side in (("full", None), ("max256", 256)):
        out = cache / f"{src.name}_shards_{label}"
        if not (out / "manifest.json").exists():
            convert(src, out, splits=["train"], shard_size_mb=8, max_side=max_side, progress=False)
        shards[label] = out
    n_train = sum(1 for _ in (src / "train").rglob("*.JPEG"))
    cores = len(os.sched_getaffinity(0))
    print(f"dataset: {n_train} train JPEGs (ImageNet-like), batch {a.batch_size}, {cores} cores")

    ceil = decode_ceiling(shards["full"])
    rows = [{"name": "ceiling: full Pillow decode, 1 core", "img_s": ceil["pil_full"]},
            {"name": f"ceiling: full Pillow decode x {cores} cores", "img_s": ceil["pil_full"] * cores},
            {"name": "ours: ROI decode + resize only, 1 core", "img_s": ceil["ours"]}]
    ref_rate = None
    bs = a.batch_size
    if not a.skip_reference:
        for w in a.workers:
            dl = reference_loader(src, w, bs)
            r = epoch_rate(lambda: dl, a.repeats)
            rows.append({"name": f"reference: ImageFolder + DataLoader, {w} workers", "img_s": r["median"]})
            if w == max(a.workers):
                ref_rate = r["median"]
            del dl
        wl = webdataset_loader(shards["full"], max(a.workers), bs)
        r = epoch_rate(lambda: wl, a.repeats)
        rows.append({"name": f"plain webdataset, {max(a.workers)} workers", "img_s": r["median"]})
        del wl

    for label in ("full", "max256"):
        for w in a.workers:
            for mode in ("process", "thread"):
                for normalize in (False, True):
                    if normalize and (mode == "thread" or label == "max256"):
                        continue
                    ld = create_loader(shards[label], batch_size=bs, image_size=224, device="cpu", workers=w,
                                worker_mode=mode, normalize=normalize, dtype=torch.float32)
                    r = epoch_rate(lambda: ld, a.repeats)
                    ld.close()
                    out = "normalized fp32" if normalize else "uint8 for the device"
                    rows.append({"name": f"ours cpu, {label} shards, {w} {mode} workers, {out}",
                                 "img_s": r["median"], "shards": label, "workers": w, "mode": mode,
                                 "normalize": normalize})
    syn = create_loader(shards["full"], backend="synthetic", batch_size=bs, image_size=224, device="cpu")
    rows.append({"name": "ours synthetic backend", "img_s": epoch_rate(lambda: syn, a.repeats)["median"]})

    for r in rows:
        if r["name"].startswith("ours synthetic"):
            continue  # one resident batch: no decode at all, a ratio would mean nothing
        if ref_rate:
            r["vs_ref"] = r["img_s"] / ref_rate
        r["vs_ceiling"] = r["img_s"] / (ceil["pil_full"] * cores)
    print(table(rows, [("name", "loader", "s"), ("img_s", "img/s", ".0f"), ("vs_ref", "x reference", ".2f"),
                       ("vs_ceiling", "of decode ceiling", ".0%")]))
    path = write_json("loader", {"rows": rows, "images": n_train, "batch_size": bs, "cores": cores,
                                 "command": "python -m benchmarks.loader " + " ".join(argv or [])})
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
    from convert.imagenet_to_shards import convert
    from pipeline import create_loader

    src = imagenet_like(a.classes, a.per_class)
    shards = src.parent / f"{src.name}_shards_full"
    if not (shards / "manifest.json").exists():
        convert(src, shards, splits=["train"], shard_size_mb=32, progress=False)
    rows = []

    def save():
        return write_json(f"loader_{a.device.split(':')[0]}", {
            "rows": rows, "batch_size": a.batch_size, "command": "python -m benchmarks.loader " + " ".join(argv or [])})

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
    colours = ["#999999" if n.startswith("ceiling") else "#4477aa" if n.startswith("ours") else "#cc6677"
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
