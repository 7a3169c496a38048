"""Restart-indexed shard JPEGs, side by side in one run: byte overhead, conversion cost, single-core
decode + resize, and the 2-worker loader against the pytorch/examples reference.

    python -m benchmarks.restart_index [--images 400 --intervals 0 8 4 2 1 --repeats 5 --loader]

The images are the benchmarks' real-photo set (`benchmarks.photos`, as `benchmarks.loader` and
`benchmarks.convert` use): ImageNet-like crops of scikit-image's bundled photographs with camera
noise and ImageNet's mix of quality and chroma subsampling; the few files the transcode does not
take (CMYK) are left out. Every ratio compares
two paths in the same process on the same images and crop boxes (RandomResizedCrop 224, the
loader's own draws); rates are medians of repeats after a warm-up. Interval 0 is one MCU row.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from .common import imagenet_like, interleaved, print_machine, table, write_json

def _transcodes(_jpeg, data: bytes) -> bool:
    try:
        _jpeg.add_restarts(data, 2)
        return True
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG, ValueError):
        return False


def median_rate(fn, n: int, repeats: int) -> float:
    return interleaved({"fn": fn}, n, repeats)["fn"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restart_index", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--intervals", type=int, nargs="+", default=[0, 8, 4, 2, 1], help="target MCUs (0: one row)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loader", action="store_true", help="also the 2-worker loaders against the reference")
    p.add_argument("--loader-intervals", type=int, nargs="+", default=[4, 2, 0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    machine = print_machine()

    import pipeline.decode as decode_mod
    from kernels import _jpeg
    from convert.images import prepare_image
    from pipeline.augment import Transform
    from pipeline.shard_format import RESTART_INTERVAL_MCUS

    # The benchmarks' real-photo set (benchmarks.photos), as the loader's and the converter's.
    src = imagenet_like(classes=10, per_class=max(1, a.images // 10))
    datas = [f.read_bytes() for f in sorted((src / "train").rglob("*.JPEG"))]
    transcodable = [d for d in datas if _transcodes(_jpeg, d)]  # the grey and CMYK files are kept as they are
    print(f"{len(datas) - len(transcodable)} of {len(datas)} files the transcode does not take (CMYK, ...): left out")
    datas = transcodable
    n = len(datas)
    mean_kb = sum(map(len, datas)) / n / 1e3
    sizes = np.array([_jpeg.header(d)[:2] for d in datas])
    print(f"{n} real-photo JPEGs, mean {sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px, {mean_kb:.0f} KB")

    # -- bytes and conversion cost --------------------------------------------------------------
    rows = []
    variants = {}
    for target in a.intervals:
        outs = [_jpeg.add_restarts(d, target) for d in datas]
        variants[target] = [o[0] for o in outs]
        total = sum(len(o[0]) for o in outs)
        rows.append({"name": f"interval {target or 'row'}", "interval": statistics.median(o[1] for o in outs),
                     "bytes": total / sum(map(len, datas)) - 1})
    row = variants.get(0)
    for r, target in zip(rows, a.intervals):
        if row is not None:  # the markers' own cost: against the same (standard) Huffman tables
            r["vs_row"] = sum(map(len, variants[target])) / sum(map(len, row)) - 1
    # Huffman tables optimised for each image (libjpeg's gathering pass) against the standard ones
    # the transcode writes: bytes, and the transcode's own rate side by side.
    d = RESTART_INTERVAL_MCUS
    optimised = sum(len(_jpeg.add_restarts(x, d, optimize=True)[0]) for x in datas)
    standard = sum(len(_jpeg.add_restarts(x, d)[0]) for x in datas)
    tables = interleaved({"standard": lambda: [_jpeg.add_restarts(x, d) for x in datas],
                          "optimised": lambda: [_jpeg.add_restarts(x, d, optimize=True) for x in datas]},
                         n, a.repeats)
    tables.update(interval=d, bytes_standard=standard / sum(map(len, datas)) - 1,
                  bytes_optimised=optimised / sum(map(len, datas)) - 1)
    conv = interleaved({"off": lambda: [prepare_image(d) for d in datas],
                        "on": lambda: [prepare_image(d, restart_interval=RESTART_INTERVAL_MCUS) for d in datas]},
                       n, a.repeats)
    print(table(rows, [("name", "restart interval", "s"), ("interval", "median MCUs", ".0f"),
                       ("bytes", "bytes vs source", "+.2%"), ("vs_row", "bytes vs 1-row interval", "+.2%")]))
    print(f"conversion (validate + prepare), 1 core: passthrough {conv['off']:.0f} img/s, "
          f"with restart index {conv['on']:.0f} img/s ({conv['on'] / conv['off']:.2f}x)")
    print(f"transcode at interval {d}, 1 core: standard Huffman tables {tables['standard']:.0f} img/s "
          f"({tables['bytes_standard']:+.2%} bytes vs source), optimised {tables['optimised']:.0f} img/s "
          f"({tables['bytes_optimised']:+.2%}; {tables['optimised'] / tables['standard']:.2f}x the rate)")

    # -- single-core decode + resize -----------------------------------------------------------------
    tf = Transform(224, train=True)
    boxes, flips = tf.params(49, 0, np.arange(n), sizes)
    out = np.empty((224, 224, 3), np.uint8)
    dec = decode_mod.BatchDecoder(None, tf, seed=49, fast_dct=True)

    def run(items, fn):
        def go():
            decode_mod.use_restart_index = fn
            for i, d in enumerate(items):
                dec.decode_into(d, boxes[i], flips[i], out, sizes[i])
        return go

    fns = {"today": run(datas, False)}
    for target in a.intervals:
        fns[f"indexed {target or 'row'}"] = run(variants[target], True)
    rates = interleaved(fns, n, a.repeats)
    decode_mod.use_restart_index = True
    drows = [{"name": k, "img_s": v, "ratio": v / rates["today"]} for k, v in rates.items()]
    print(table(drows, [("name", "decode + resize, 1 core", "s"), ("img_s", "img/s", ".0f"),
                        ("ratio", "x today", ".2f")]))

    # Pixels: the loader's output from the indexed file against today's path on the original.
    worst = {}
    ref, got = np.empty_like(out), np.empty_like(out)
    for target in a.intervals:
        m = 0
        for i in range(n):
            decode_mod.use_restart_index = False
            dec.decode_into(datas[i], boxes[i], flips[i], ref, sizes[i])
            decode_mod.use_restart_index = True
            dec.decode_into(variants[target][i], boxes[i], flips[i], got, sizes[i])
            m = max(m, int(np.abs(ref.astype(int) - got).max()))
        worst[target] = m
    # The marker scan each indexed decode does (no offset table is stored; see shard_format).
    some = variants.get(RESTART_INTERVAL_MCUS, next(iter(variants.values())))
    scan = median_rate(lambda: [_jpeg.restart_layout(d) for d in some], n, a.repeats)
    print(f"marker scan of the whole file: {1e6 / scan:.1f} us per image, {rates['today'] / scan:.2%} of today's "
          "decode + resize")
    print("max |indexed - today| of the loader's 224 x 224 output:",
          ", ".join(f"interval {k or 'row'}: {v}" for k, v in worst.items()))

    payload = {"images": n, "mean_kb": mean_kb, "bytes": rows, "conversion": conv, "huffman_tables": tables,
               "decode": drows,
               "max_pixel_difference": worst, "scan_us": 1e6 / scan}
    if a.loader:
        payload["loader"] = loader_rows(src, a)
    path = write_json("restart_index", payload, machine=machine)
    print(f"wrote {path}")
    return 0


def loader_rows(src: Path, a) -> list[dict]:
    """Reference (ImageFolder + DataLoader) and our cpu loader on shards with and without the index."""
    from convert.imagenet_to_shards import convert
    from pipeline import create_loader

    from .loader import reference_loader

    shards = {}
    for target in [None, *a.loader_intervals]:
        out = src.parent / f"{src.name}_shards_{'none' if target is None else target}"
        if not (out / "manifest.json").exists():
            t = time.perf_counter()
            convert(src, out, splits=["train"], shard_size_mb=8, progress=False, workers=a.workers,
                    restart_interval=target)
            print(f"converted {out.name} in {time.perf_counter() - t:.1f} s")
        shards[target] = out
    rows = []
    dl = reference_loader(src, a.workers, a.batch_size)
    loaders = {"reference": lambda: dl}
    ours = {}
    for target, path in shards.items():
        ours[target] = create_loader(path, batch_size=a.batch_size, image_size=224, device="cpu", workers=a.workers,
                                     worker_mode="process", normalize=False)  # uint8 for the device
        loaders[f"ours, index {'off' if target is None else (target or 'row')}"] = (lambda ld: lambda: ld)(ours[target])
    def epoch(make) -> float:
        t, n = time.perf_counter(), 0
        for _, y in make():
            n += len(y)
        return n / (time.perf_counter() - t)

    # In turns, so the shared machine's load hits all alike; medians of full epochs after a warm-up.
    res = {k: [] for k in loaders}
    for make in loaders.values():
        epoch(make)
    for _ in range(a.repeats):
        for k, make in loaders.items():
            res[k].append(epoch(make))
    for ld in ours.values():
        ld.close()
    ref = statistics.median(res["reference"])
    for k, v in res.items():
        rows.append({"name": f"{k}, {a.workers} workers", "img_s": statistics.median(v),
                     "vs_ref": statistics.median(v) / ref})
    print(table(rows, [("name", "loader", "s"), ("img_s", "img/s", ".0f"), ("vs_ref", "x reference", ".2f")]))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
