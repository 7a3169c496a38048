"""Our CPU loader and converter against FFCV, side by side in one run, on the same photos.

    python -m benchmarks.ffcv_compare --ffcv-python VENV/bin/python [--classes 10 --per-class 100]

FFCV pins its own numba/opencv stack, so it lives in its own virtual environment (Python 3.11,
after the system packages libopencv-dev libturbojpeg0-dev pkg-config:
`python3.11 -m venv --system-site-packages V && V/bin/pip install ffcv==1.0.2`; the system site
gives FFCV's process the project's torch, torchvision and Pillow, so the reference runs on the
same stack in both processes). This module runs in the project's
environment and starts that interpreter for the FFCV half (`--child`); only this file, the stdlib,
numpy, torch, torchvision and ffcv are imported there.

Every loader: 2 workers, batch 64, RandomResizedCrop 224 + horizontal flip, uint8 out (ours and
FFCV; the pytorch/examples reference normalizes, as it does in its training script). Each loader
is given as a ratio to the reference measured before and after it in its own process, so a
machine busy with other jobs moves both sides of a ratio together; the two loaders are compared
both ways: as the ratio of those ratios and as the ratio of absolute img/s.

The two processes may run the reference on different stacks: an FFCV environment with its own
torch and Pillow (stock Pillow against a pillow-simd in the project's, say) runs the reference,
mostly Pillow's decode and resize, at another speed (15-25 % slower in an earlier setup that
installed its own torch and torchvision there), which moves the ratio reading away from the
absolute one. So each process also measures the reference's per-sample work (decode,
RandomResizedCrop, flip, ToTensor, Normalize) on one thread by CPU time, which a busy machine
moves far less than wall-clock rates, and where the two stacks' versions differ, FFCV's
reference is divided by the ratio of the two (the stack factor) before it divides FFCV's loaders.
Where the versions are the same the factor is 1: the measured CPU-time ratio then only shows the
busy machine's noise (0.93-1.19 in runs on a shared 2-core machine). Both stacks (versions,
threads) are kept in the JSON, with a warning when they differ.
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


def reference_transform():
    """pytorch/examples' train transform."""
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def reference_rate(src: Path, workers: int, batch: int, repeats: int) -> float:
    """pytorch/examples' loader: ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize + DataLoader."""
    import torch
    from torchvision import datasets

    tf = reference_transform()
    dl = torch.utils.data.DataLoader(datasets.ImageFolder(str(src / "train"), tf), batch_size=batch, shuffle=True,
                                     num_workers=workers, persistent_workers=True, drop_last=True)
    rate = epoch_rate(lambda: dl, repeats)["median"]
    dl = None  # its persistent workers stop here
    return rate


def stack() -> dict:
    """What the reference's speed depends on, in this process: library versions and threads."""
    import numpy
    import PIL
    import torch
    import torchvision
    from PIL import features

    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "Pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "torch_threads": torch.get_num_threads()}
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:  # imported by FFCV
        info["opencv_threads"] = cv2.getNumThreads()
    return info


def reference_cpu_rate(src: Path, images: int = 300, repeats: int = 3) -> float:
    """Images per CPU-second of the reference's per-sample work on one thread (as in its
    DataLoader workers), on this process's stack: what the stack changes, not the machine's load."""
    import io

    import torch
    from PIL import Image

    files = sorted(f for f in (src / "train").rglob("*") if f.is_file())[:images]
    datas = [f.read_bytes() for f in files]
    tf = reference_transform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run one thread each
    try:
        def run():
            for d in datas:
                tf(Image.open(io.BytesIO(d)).convert("RGB"))
        return timed(lambda: run() or len(datas), repeats=repeats, clock=time.thread_time)["median"]
    finally:
        torch.set_num_threads(threads)


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
    out = {"stack": stack(), "reference_cpu": reference_cpu_rate(src),
           "reference": reference_rate(src, workers, batch, repeats), "writers": {}, "loaders": {},
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
    from kernels.resize import resize_path
    from pipeline import create_loader

    def write():
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            convert(src, Path(tmp) / "shards", splits=["train"], max_side=256, quality=QUALITY, workers=workers,
                    progress=False)
        return sum(1 for _ in (src / "train").rglob("*") if _.is_file())

    out = {"stack": stack(), "resize_path": resize_path(), "reference_cpu": reference_cpu_rate(src),
           "reference": reference_rate(src, workers, batch, repeats),
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


def ffcv_reference(mine: dict, theirs: dict) -> tuple[float, float, float, dict]:
    """FFCV's reference in our stack's terms: (reference, stack factor applied, stack factor
    measured, the versions that differ). Each side's reference is the mean of its runs before
    and after its loaders, in its own process; where the versions differ it is divided by the
    measured ratio of the per-sample CPU rates. The same versions run the reference at the same
    speed (its workers set their own threads), so there the factor is 1 and the measured one only
    shows the busy machine's noise."""
    versions = [k for k in mine["stack"] if not k.endswith("_threads")]
    differ = {k: (mine["stack"][k], theirs["stack"].get(k)) for k in versions
              if mine["stack"][k] != theirs["stack"].get(k)}
    measured = theirs["reference_cpu"] / ((mine["reference_cpu"] + mine["reference_cpu_after"]) / 2)
    factor = measured if differ else 1.0
    return (theirs["reference"] + theirs["reference_after"]) / 2 / factor, factor, measured, differ


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
    mine["reference_cpu_after"] = reference_cpu_rate(src)  # in turns with the child's
    ref_ours = (mine["reference"] + mine["reference_after"]) / 2
    ref_ffcv_own = (theirs["reference"] + theirs["reference_after"]) / 2
    ref_ffcv, stack_factor, measured, differ = ffcv_reference(mine, theirs)
    if differ:
        print(f"warning: the two processes' stacks differ ({differ}): FFCV's reference is divided by "
              f"{measured:.2f}, its per-sample CPU rate over ours", flush=True)
    rows = [{"name": "reference (pytorch/examples), our process", "img_s": ref_ours, "x_ref": 1.0},
            {"name": "reference, FFCV's process", "img_s": ref_ffcv_own, "x_ref": 1.0},
            {"name": f"... in our stack's terms (stack factor {stack_factor:.2f})",
             "img_s": ref_ffcv, "x_ref": 1.0}]
    names = {"full": "ours, full-size shards", "max512": "ours, --max-side 512", "max256": "ours, --max-side 256"}
    rows += [{"name": names[k], "img_s": v, "x_ref": v / ref_ours} for k, v in mine["loaders"].items()]
    rows += [{"name": f"FFCV {k.replace('_', ', max_resolution=')}", "img_s": v, "x_ref": v / ref_ffcv}
             for k, v in theirs["loaders"].items()]
    for size in (512, 256):
        o, f = mine["loaders"][f"max{size}"], theirs["loaders"][f"jpg_{size}"]
        rows.append({"name": f"ours / FFCV jpg at {size}: ratio of x reference", "x_ref": (o / ref_ours) / (f / ref_ffcv)})
        rows.append({"name": f"ours / FFCV jpg at {size}: absolute img/s", "x_ref": o / f})
    print(table(rows, [("name", "loader (RandomResizedCrop 224 + flip, uint8)", "s"), ("img_s", "img/s", ".0f"),
                       ("x_ref", "x reference", ".2f")]))
    writers = [{"name": "ours: convert --max-side 256", "img_s": mine["writer_256"]}]
    writers += [{"name": f"FFCV DatasetWriter {k.replace('_', ', max_resolution=')}", "img_s": v}
                for k, v in theirs["writers"].items()]
    print(table(writers, [("name", f"writer ({a.workers} workers, quality {QUALITY})", "s"),
                          ("img_s", "img/s", ".0f")]))
    print(f"ours / FFCV writer at 256: {mine['writer_256'] / theirs['writers']['jpg_256']:.2f}; "
          f"{time.perf_counter() - t:.0f} s in all")
    path = write_json("ffcv_compare", {"ours": mine, "ffcv": theirs, "stack_factor": stack_factor,
                                       "stack_factor_measured": measured, "stack_differs": differ, "rows": rows,
                                       "writers": writers, "images": n,
                                       "command": "python -m benchmarks.ffcv_compare " + " ".join(argv)},
                      machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
