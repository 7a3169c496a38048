"""Every hand-written piece against the library call it replaces, side by side, one core:

- ROI JPEG decode of a RandomResizedCrop region (kernels/_jpeg.c) vs Pillow's full decode
  and crop;
- crop + antialiased resize + flip into a batch slot (numba, and each SIMD path of
  kernels._resize this CPU runs) vs Pillow's resize with a box;
- shard writing (pipeline/shard_format.py's ShardWriter) vs the standard library's tarfile.

    python -m benchmarks.kernels [--images 300]
"""
from __future__ import annotations

import argparse
import io
import tarfile

import numpy as np

from .common import imagenet_like, table, timed, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    a = p.parse_args(argv)

    from PIL import Image

    from kernels import _jpeg
    from kernels.resize import SIMD_PATHS, resize_crop_into, resize_crop_reference
    from pipeline.augment import train_params
    from pipeline.decode import dct_denominator

    src = imagenet_like(20, 60)
    files = sorted((src / "train").rglob("*.JPEG"))[: a.images]
    datas = [f.read_bytes() for f in files]
    sizes = np.array([_jpeg.header(d)[:2] for d in datas])
    boxes, flips = train_params(49, 0, np.arange(len(datas)), sizes[:, 0], sizes[:, 1])
    scratch = np.empty(1 << 23, np.uint8)
    n = len(datas)
    rows = []

    def pil_decode_crop():
        for d, (x, y, w, h) in zip(datas, boxes):
            Image.open(io.BytesIO(d)).crop((int(x), int(y), int(x + w), int(y + h))).load()
        return n

    def roi_decode(fast: bool):
        def run():
            for d, (x, y, w, h) in zip(datas, boxes):
                dd = dct_denominator(w, h, 224)
                _jpeg.decode_region(d, int(x), int(y), int(np.ceil(x + w)) - int(x), int(np.ceil(y + h)) - int(y),
                                    dd, scratch, fast)
            return n
        return run

    ref = timed(pil_decode_crop)["median"]
    rows.append({"name": "decode crop: Pillow full decode + crop", "img_s": ref, "vs_ref": 1.0})
    for fast in (False, True):
        r = timed(roi_decode(fast))["median"]
        rows.append({"name": f"decode crop: ours ROI + DCT scaling{', fast IDCT' if fast else ''}", "img_s": r,
                     "vs_ref": r / ref})

    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas[:100]]
    out = np.empty((224, 224, 3), np.uint8)

    def resize(fn, **kw):
        def run():
            for img, box, f in zip(decoded, boxes, flips):
                fn(img, tuple(box), out, bool(f), **kw)
            return len(decoded)
        return run

    ref = timed(resize(resize_crop_reference))["median"]
    rows.append({"name": "crop-resize-flip: Pillow resize(box) + transpose", "img_s": ref, "vs_ref": 1.0})
    for path in ("numba",) + SIMD_PATHS:  # benchmarks.resize has them side by side, and vs decode
        r = timed(resize(resize_crop_into, path=path))["median"]
        rows.append({"name": f"crop-resize-flip: ours {path}, into the slot", "img_s": r, "vs_ref": r / ref})

    from pipeline.shard_format import JPEG_EXT, LABEL_EXT, META_EXT, ShardWriter

    out_dir = src.parent / "kernel-bench"
    out_dir.mkdir(exist_ok=True)
    members = [{JPEG_EXT: d, LABEL_EXT: b"1", META_EXT: b"{}"} for d in datas]

    def std_tar():
        # The same work as ours: the archive, its sha256 and an fsync (the index is left out).
        import hashlib
        import os

        with open(out_dir / "std.tar", "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i, m in enumerate(members):
                    for ext, data in m.items():
                        ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                        ti.size = len(data)
                        tar.addfile(ti, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        hashlib.sha256((out_dir / "std.tar").read_bytes()).hexdigest()
        return n

    def ours_tar():
        with ShardWriter(out_dir / "ours.tar") as w:
            for i, m in enumerate(members):
                w.write(f"{i:08d}", m)
            w.close()  # includes the sha256 and an fsync, which tarfile's run does not do
        return n

    ref = timed(std_tar)["median"]
    rows.append({"name": "shard write: tarfile + sha256 + fsync", "img_s": ref, "vs_ref": 1.0})
    r = timed(ours_tar)["median"]
    rows.append({"name": "shard write: ours (+ DALI index)", "img_s": r, "vs_ref": r / ref})

    print(table(rows, [("name", "piece", "s"), ("img_s", "items/s", ".0f"), ("vs_ref", "x library", ".2f")]))
    path = write_json("kernels", {"rows": rows, "images": n,
                                  "command": "python -m benchmarks.kernels " + " ".join(argv or [])})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
