"""Our CPU loader and converter against FFCV, side by side in one run, on the same photos.

    python -m benchmarks.ffcv_compare --ffcv-python VENV/bin/python [--classes 10 --per-class 100]

FFCV pins its own numba/opencv stack, so it lives in its own virtual environment (Python 3.11:
`python3.11 -m venv V && V/bin/pip install torch torchvision ffcv==1.0.2`, after the system
packages libopencv-dev libturbojpeg0-dev pkg-config). This module runs in the project's
environment and starts that interpreter for the FFCV half (`--child`); only this file, the stdlib,
numpy, torch, torchvision and ffcv are imported there.

Every loader: 2 workers, batch 64, RandomResizedCrop 224 + horizontal flip, uint8 out (ours and
FFCV; the pytorch/examples reference normalizes, as it does in its training script). The
reference runs in both processes and each loader is given as a ratio to the reference measured in
its own process, so a machine busy with other jobs moves both sides of a ratio together.
Writers: FFCV's DatasetWriter and our converter, both at --max-side / max_resolution 256,
JPEG quality 90, the same worker count, on the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import DEFAULT_CACHE, epoch_rate, imagenet_like, print_machine, table, timed, write_json
from .machine import torch_build

QUALITY = 90
FFCV_FORMATS = (("jpg", 512), ("jpg", 256), ("raw", 256))


def reference_rate(src: Path, workers: int, batch: int, repeats: int) -> float:
    """pytorch/examples' loader: ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize + DataLoader."""
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dl = torch.utils.data.DataLoader(datasets.ImageFolder(str(src / "train"), tf), batch_size=batch, shuffle=True,
                                     num_workers=workers, persistent_workers=True, drop_last=True)
    rate = epoch_rate(lambda: dl, repeats)["median"]
    dl = None  # its persistent workers stop here
    return rate


# -- the FFCV half, run by the FFCV environment's interpreter ----------------------------------------
def child(job: dict) -> dict:
    """Write FFCV datasets of job['src'] and time the writer and the loaders; return the figures."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    from ffcv.writer import DatasetWriter
    from torchvision import datasets

    src, work = Path(job["src"]), Path(job["work"])
    workers, batch, repeats = job["workers"], job["batch"], job["repeats"]
    images = datasets.ImageFolder(str(src / "train"))  # PIL images, as FFCV's own ImageNet example
    # The FFCV environment's own torch: the machine line names only the project's.
    out = {"reference": reference_rate(src, workers, batch, repeats), "writers": {}, "loaders": {},
           "torch": torch_build()}
    for mode, res in FFCV_FORMATS:
        path = work / f"ffcv_{mode}_{res}.beton"

        def write():
            DatasetWriter(str(path), {
                "image": RGBImageField(write_mode=mode, max_resolution=res, jpeg_quality=QUALITY),
                "label": IntField()}, num_workers=workers).from_indexed_dataset(images)
            return len(images)
        out["writers"][f"{mode}_{res}"] = timed(write, repeats=repeats, warmup=1)["median"]
        out["bytes_" + f"{mode}_{res}"] = path.stat().st_size
        loader = Loader(str(path), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                        drop_last=True, os_cache=True, pipelines={
                            "image": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(),
                                      ToTensor()],
                            "label": [IntDecoder(), ToTensor()]})
        out["loaders"][f"{mode}_{res}"] = epoch_rate(lambda: loader, repeats)["median"]
        loader = None  # its workers stop here
    out["reference_after"] = reference_rate(src, workers, batch, repeats)
    return out


def run_child(python: str, job: dict) -> dict:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([python, "-m", "benchmarks.ffcv_compare", "--child", json.dumps(job)], cwd=root,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the FFCV half failed (exit {proc.returncode}); its errors are above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- our half, in the project's environment -------------------------------------------------------
def ours(src: Path, work: Path, workers: int, batch: int, repeats: int) -> dict:
    from convert.imagenet_to_shards import convert
    from pipeline import create_loader

    def write():
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            convert(src, Path(tmp) / "shards", splits=["train"], max_side=256, quality=QUALITY, workers=workers,
                    progress=False)
        return sum(1 for _ in (src / "train").rglob("*") if _.is_file())

    out = {"reference": reference_rate(src, workers, batch, repeats),
           "writer_256": timed(write, repeats=repeats, warmup=1)["median"], "loaders": {}}
    for label, max_side in (("full", None), ("max512", 512), ("max256", 256)):
        shards = work / f"ours_{label}"
        if not (shards / "manifest.json").exists():
            shutil.rmtree(shards, ignore_errors=True)
            convert(src, shards, splits=["train"], shard_size_mb=16, max_side=max_side, quality=QUALITY,
                    workers=workers, progress=False)
        ld = create_loader(shards, batch_size=batch, image_size=224, device="cpu", workers=workers,
                           normalize=False)
        out["loaders"][label] = epoch_rate(lambda: ld, repeats)["median"]
        ld.close()
    out["reference_after"] = reference_rate(src, workers, batch, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.ffcv_compare", description=__doc__.split("\n")[0])
    p.add_argument("--ffcv-python", type=Path, help="the interpreter of a virtual environment with ffcv installed")
    p.add_argument("--src", type=Path, default=None, help="an ImageFolder with train/ (default: the photo set)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the FFCV half's job, as JSON
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.ffcv_python is None:
        p.error("--ffcv-python is required (the python of a virtual environment with ffcv installed)")
    if not (a.ffcv_python.is_file() and os.access(a.ffcv_python, os.X_OK)):
        p.error(f"--ffcv-python: {a.ffcv_python} is not an executable file")
    check = subprocess.run([str(a.ffcv_python), "-c", "import ffcv"], capture_output=True, text=True)
    if check.returncode != 0:
        p.error(f"--ffcv-python: {a.ffcv_python} cannot import ffcv: {check.stderr.strip().splitlines()[-1:]}")
    if a.src is not None and not (a.src / "train").is_dir():
        p.error(f"--src: {a.src} has no train/ folder")
    machine = print_machine()

    src = a.src or imagenet_like(a.classes, a.per_class)
    work = DEFAULT_CACHE / f"ffcv_compare_{src.name}"
    work.mkdir(parents=True, exist_ok=True)
    n = sum(1 for f in (src / "train").rglob("*") if f.is_file())
    print(f"{n} train images from {src.name}; {a.workers} workers, batch {a.batch_size}, "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    t = time.perf_counter()
    mine = ours(src, work, a.workers, a.batch_size, a.repeats)
    theirs = run_child(str(a.ffcv_python), {"src": str(src), "work": str(work), "workers": a.workers,
                                            "batch": a.batch_size, "repeats": a.repeats})
    # Each side's ratio uses the mean of the reference runs before and after it, in its process.
    ref_ours = (mine["reference"] + mine["reference_after"]) / 2
    ref_ffcv = (theirs["reference"] + theirs["reference_after"]) / 2
    rows = [{"name": "reference (pytorch/examples), our process", "img_s": ref_ours, "x_ref": 1.0},
            {"name": "reference (pytorch/examples), FFCV's process", "img_s": ref_ffcv, "x_ref": 1.0}]
    names = {"full": "ours, full-size shards", "max512": "ours, --max-side 512", "max256": "ours, --max-side 256"}
    rows += [{"name": names[k], "img_s": v, "x_ref": v / ref_ours} for k, v in mine["loaders"].items()]
    rows += [{"name": f"FFCV {k.replace('_', ', max_resolution=')}", "img_s": v, "x_ref": v / ref_ffcv}
             for k, v in theirs["loaders"].items()]
    for size in (512, 256):
        o, f = mine["loaders"][f"max{size}"], theirs["loaders"][f"jpg_{size}"]
        rows.append({"name": f"ours / FFCV jpg at {size} (ratio of x reference)",
                     "x_ref": (o / ref_ours) / (f / ref_ffcv)})
    print(table(rows, [("name", "loader (RandomResizedCrop 224 + flip, uint8)", "s"), ("img_s", "img/s", ".0f"),
                       ("x_ref", "x reference", ".2f")]))
    writers = [{"name": "ours: convert --max-side 256", "img_s": mine["writer_256"]}]
    writers += [{"name": f"FFCV DatasetWriter {k.replace('_', ', max_resolution=')}", "img_s": v}
                for k, v in theirs["writers"].items()]
    print(table(writers, [("name", f"writer ({a.workers} workers, quality {QUALITY})", "s"),
                          ("img_s", "img/s", ".0f")]))
    print(f"ours / FFCV writer at 256: {mine['writer_256'] / theirs['writers']['jpg_256']:.2f}; "
          f"{time.perf_counter() - t:.0f} s in all")
    path = write_json("ffcv_compare", {"ours": mine, "ffcv": theirs, "rows": rows, "writers": writers, "images": n,
                                       "command": "python -m benchmarks.ffcv_compare " + " ".join(argv)},
                      machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
