"""The SIMD resize (kernels._resize) against the numba kernel it replaces, side by side in one
process on one core, on real-photo content (`benchmarks.photos`):

- the resize alone, on decoded images of the full-size and the `--max-side 256` shards
  (RandomResizedCrop 224 boxes and flips, as the loader draws them), per resize path;
- decode + resize, the cpu backend's whole per-sample work (BatchDecoder with the train
  settings), per shard kind and resize path, against the pre-index kernel: full-size shards
  without the restart index (whole-file ROI decode) and the numba resize.

    python -m benchmarks.resize [--classes 10 --per-class 100 --repeats 7]

The variants run in turns on the same images and boxes, so a shared machine's load hits all
alike; each figure is a median over --repeats. Rates are given by wall clock and by this
thread's CPU time, which leaves out the time it waited for a core (the steadier figure on a
busy machine). The `avx2` path on an AVX-512 CPU is the AVX2 machine's code, not its speed.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

from .common import interleaved, print_machine, table, write_json

BASELINE = ("full-noindex", "numba")  # the pre-index kernel


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.resize", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--resize-images", type=int, default=300, help="images for the resize-alone rows")
    a = p.parse_args(argv)
    machine = print_machine()
    if min(a.classes, a.per_class, a.repeats, a.resize_images) < 1:
        p.error("--classes, --per-class, --repeats and --resize-images must be >= 1")

    from PIL import Image

    from kernels.resize import PATH_ENV, SIMD_PATHS, resize_crop_into
    from pipeline.augment import Transform
    from pipeline.decode import BatchDecoder
    from pipeline.samples import SampleReader
    from pipeline.source import open_split

    from .loader import resolve_data

    _, shards = resolve_data(argparse.Namespace(shards=None, src=None, classes=a.classes, per_class=a.per_class),
                             "photos")
    paths = ("numba",) + SIMD_PATHS
    print(f"resize paths: {', '.join(paths)}; {os.cpu_count()} cpus", flush=True)
    transform = Transform(224, train=True)
    rows = []

    # -- the resize alone ---------------------------------------------------------------------------
    for kind in ("full", "max256"):
        reader = SampleReader(open_split(shards[kind], "train"))
        n = min(a.resize_images, len(reader.table))
        images = [np.asarray(Image.open(io.BytesIO(bytes(reader.bytes(i)))).convert("RGB")) for i in range(n)]
        sizes = np.array([[im.shape[1], im.shape[0]] for im in images])
        boxes, flips = transform.params(49, 0, np.arange(n), sizes)
        out = np.empty((224, 224, 3), np.uint8)
        reader.close()

        def resize(path, images=images, boxes=boxes, flips=flips, out=out):
            return lambda: [resize_crop_into(im, tuple(b), out, bool(f), path=path)
                            for im, b, f in zip(images, boxes, flips)]

        fns = {path: resize(path) for path in paths}
        wall = interleaved(fns, n, a.repeats)
        cpu = interleaved(fns, n, a.repeats, clock=time.thread_time)
        for path in paths:
            rows.append({"name": f"resize alone, {kind} images, {path}", "kind": kind, "path": path, "what": "resize",
                         "img_s": wall[path], "cpu_img_s": cpu[path], "x_numba": cpu[path] / cpu["numba"],
                         "ms": 1e3 / cpu[path]})

    # -- decode + resize ----------------------------------------------------------------------------
    decoders = {}
    for kind in ("full-noindex", "full", "max256"):
        reader = SampleReader(open_split(shards[kind], "train"))
        decoders[kind] = BatchDecoder(reader, transform, seed=49, fast_dct=True, dct_scaling=True)
    n = min(len(d.samples.table) for d in decoders.values())
    images = np.empty((n, 224, 224, 3), np.uint8)
    labels = np.empty(n, np.int64)

    def decode(kind, path):
        def run():
            old = os.environ.get(PATH_ENV)
            os.environ[PATH_ENV] = path  # resize_crop_into reads it per call
            try:
                decoders[kind].decode_batch(0, np.arange(n), images, labels)
            finally:
                if old is None:
                    os.environ.pop(PATH_ENV, None)
                else:
                    os.environ[PATH_ENV] = old
        return run

    # The pre-index kernel, then the same shards with the best SIMD resize (the resize's share
    # alone), then the indexed and the 256 px shards with every path.
    variants = [BASELINE] + [("full-noindex", p) for p in SIMD_PATHS[:1]]
    variants += [(kind, path) for kind in ("full", "max256") for path in paths]
    fns = {v: decode(*v) for v in variants}
    wall = interleaved(fns, n, a.repeats)
    cpu = interleaved(fns, n, a.repeats, clock=time.thread_time)
    for kind, path in variants:
        same_kind_numba = cpu.get((kind, "numba"))
        rows.append({"name": f"decode + resize, {kind} shards, {path}", "kind": kind, "path": path,
                     "what": "decode+resize", "img_s": wall[(kind, path)], "cpu_img_s": cpu[(kind, path)],
                     "x_numba": cpu[(kind, path)] / same_kind_numba if same_kind_numba else None,
                     "x_preindex": cpu[(kind, path)] / cpu[BASELINE],
                     "x_preindex_wall": wall[(kind, path)] / wall[BASELINE], "ms": 1e3 / cpu[(kind, path)]})
    for d in decoders.values():
        d.close()

    print(table(rows, [("name", "one core, RandomResizedCrop 224 + flip", "s"), ("img_s", "img/s wall", ".0f"),
                       ("cpu_img_s", "img/s CPU", ".0f"), ("ms", "ms CPU", ".3f"), ("x_numba", "x numba", ".2f"),
                       ("x_preindex", "x pre-index (CPU)", ".2f"), ("x_preindex_wall", "(wall)", ".2f")]))
    path = write_json("resize", {"rows": rows, "images_decode": n, "paths": list(paths), "baseline": list(BASELINE),
                                 "command": "python -m benchmarks.resize " + " ".join(argv)}, machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
