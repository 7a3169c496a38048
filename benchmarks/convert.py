"""Conversion throughput: ours at 1 and 2 workers against a plain webdataset writer and the
validation-decode ceiling, on generated ImageNet-like JPEGs or your own ImageFolder.

    python -m benchmarks.convert [--classes 20 --per-class 50 --repeats 3]
    python -m benchmarks.convert --src DIR --shard-size-mb 256   # DIR holds train/<class>/*.JPEG

Rates are medians over repeats after a warm-up run (which also warms the page cache); the runs
take turns, one of each per round, so the ratios to the reference hold on a shared machine.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from .common import imagenet_like, print_machine, table, timed, timed_in_turns, write_json


def _sources(root: Path) -> list[Path]:
    return sorted((root / "train").rglob("*.JPEG"))


def decode_rate(datas: list[bytes], mode: str) -> float:
    """Single-core images/s of one validation style over in-memory JPEGs."""
    def once():
        for b in datas:
            im = Image.open(io.BytesIO(b))
            if mode == "scaled":
                im.draft("L", (math.ceil(im.width / 8), math.ceil(im.height / 8)))
            im.load()
        return len(datas)
    return timed(once, repeats=3)["median"]


def reference_convert(files: list[Path], labels: dict[str, int], out: Path) -> int:
    """What a plain script does: webdataset's TarWriter, a full PIL decode to validate, one process."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(str(out / "ref-%06d.tar"), maxsize=int(256e6), verbose=0) as sink:
        for i, f in enumerate(files):
            data = f.read_bytes()
            try:
                Image.open(io.BytesIO(data)).convert("RGB")
            except OSError:
                continue
            sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": labels[f.parent.name]})
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--src", type=Path, help="an ImageFolder with train/ to convert instead of generated images")
    p.add_argument("--shard-size-mb", type=float, default=256,
                   help="shard size of our runs (default 256, the converter's default)")
    a = p.parse_args(argv)
    machine = print_machine()

    from convert.imagenet_to_shards import convert
    from pipeline.shard_format import RESTART_INTERVAL_MCUS

    src = a.src if a.src is not None else imagenet_like(a.classes, a.per_class)
    files = _sources(src)
    n_files = len(files)
    mb_in = sum(f.stat().st_size for f in files) / 1e6
    datas = [f.read_bytes() for f in files[:300]]
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    labels = {c: i for i, c in enumerate(classes)}
    cores = len(os.sched_getaffinity(0))
    print(f"dataset: {n_files} train JPEGs, {mb_in / n_files * 1e3:.0f} KB mean, {cores} cores")

    full = decode_rate(datas, "full")
    scaled = decode_rate(datas, "scaled")
    rows = [
        {"name": "decode only: full PIL decode, 1 core", "img_s": full},
        {"name": "decode only: DCT-1/8 validation, 1 core", "img_s": scaled},
        {"name": f"decode ceiling: DCT-1/8 x {cores} cores", "img_s": scaled * cores},
    ]

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    # Images, not shards, are the unit of parallelism, so the default size (often one shard
    # after --max-side) must still use every worker.
    shard_mb = a.shard_size_mb
    try:
        def ref():
            shutil.rmtree(tmp / "ref", ignore_errors=True)
            return reference_convert(files, labels, tmp / "ref")

        def ours(max_side, restarts, workers):
            def run():
                shutil.rmtree(tmp / "ours", ignore_errors=True)
                m, _ = convert(src, tmp / "ours", splits=["train"], shard_size_mb=shard_mb, max_side=max_side,
                               workers=workers, progress=False, restart_interval=restarts)
                return m["splits"]["train"]["samples"]
            return run

        runs = (("full size, restart index (default)", None, RESTART_INTERVAL_MCUS),
                ("full size, --no-restart-index (passthrough)", None, None),
                ("--max-side 500", 500, RESTART_INTERVAL_MCUS), ("--max-side 256", 256, RESTART_INTERVAL_MCUS))
        fns = {"reference": ref}
        for label, max_side, restarts in runs:
            for workers in (1, 2):
                fns[(label, max_side, restarts, workers)] = ours(max_side, restarts, workers)
        # In turns (the reference and every run once per round): on a shared machine a load that
        # comes and goes during the benchmark then moves both sides of each ratio together.
        res = timed_in_turns(fns, a.repeats)
        r = res.pop("reference")
        rows.append({"name": "reference: webdataset TarWriter + full decode, 1 process", "img_s": r["median"],
                     "mb_s": mb_in / r["seconds"]})
        ref_rate = r["median"]
        for (label, max_side, restarts, workers), r in res.items():
            rows.append({"name": f"ours: {label}, {workers} worker(s)", "img_s": r["median"],
                         "mb_s": mb_in / r["seconds"], "vs_ref": r["median"] / ref_rate,
                         "vs_ceiling": r["median"] / (scaled * workers) if max_side is None and restarts is None
                         else None})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(table(rows, [("name", "run", "s"), ("img_s", "img/s", ".0f"), ("mb_s", "MB/s in", ".1f"),
                       ("vs_ref", "x reference", ".2f"), ("vs_ceiling", "of ceiling", ".0%")]))
    path = write_json("convert", {"files": n_files, "mb_in": mb_in, "rows": rows,
                                  "command": " ".join(["python -m benchmarks.convert",
                                                                 *(sys.argv[1:] if argv is None else argv)])},
                      machine=machine)
    print(f"wrote {path} ({time.strftime('%Y-%m-%d')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
