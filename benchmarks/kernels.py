"""Every hand-written piece against the library call it replaces, side by side, one core:

- ROI JPEG decode of a RandomResizedCrop region (kernels/_jpeg.c) vs Pillow's full decode
  and crop;
- crop + antialiased resize + flip into a batch slot (numba, and each SIMD path of
  kernels._resize this CPU runs) vs Pillow's resize with a box;
- shard writing (pipeline/shard_format.py's ShardWriter) vs the standard library's tarfile;
- normalizing uint8 crops to fp32 (kernels/normalize.py, one op on the batch) vs torchvision's
  ToTensor + Normalize per image and the collate's stack, on one torch thread.

    python -m benchmarks.kernels [--images 300]

Rates are wall-clock (items/s, x library) and per second of the process's CPU time (items/CPU-s),
which holds still on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile

import numpy as np

from .common import imagenet_like, print_machine, table, timed, write_json


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv  # the JSON's command, also when run from the shell
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    a = p.parse_args(argv)
    machine = print_machine()

    from PIL import Image

    from kernels import _jpeg
    from kernels.resize import SIMD_PATHS, resize_crop_into, resize_crop_reference
    from pipeline.augment import train_params
    from pipeline.decode import dct_denominator

    src = imagenet_like(20, 60)
    files = sorted((src / "train").rglob("*.JPEG"))[: a.images]
    datas = roi_decodable([f.read_bytes() for f in files])
    sizes = np.array([_jpeg.header(d)[:2] for d in datas])
    boxes, flips = train_params(49, 0, np.arange(len(datas)), sizes[:, 0], sizes[:, 1])
    scratch = np.empty(1 << 23, np.uint8)
    n = len(datas)
    rows = []

    def piece(name: str, fn, ref: dict | None = None) -> dict:
        """Time fn and add its row, with its rate as a multiple of the library's row `ref`."""
        t = timed(fn)
        row = {"name": name, "img_s": t["median"], "cpu_img_s": t["cpu_rate"],
               "vs_ref": t["median"] / ref["img_s"] if ref else 1.0}
        rows.append(row)
        return row

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

    ref = piece("decode crop: Pillow full decode + crop", pil_decode_crop)
    for fast in (False, True):
        piece(f"decode crop: ours ROI + DCT scaling{', fast IDCT' if fast else ''}", roi_decode(fast), ref)

    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas[:100]]
    out = np.empty((224, 224, 3), np.uint8)

    def resize(fn, **kw):
        def run():
            for img, box, f in zip(decoded, boxes, flips):
                fn(img, tuple(box), out, bool(f), **kw)
            return len(decoded)
        return run

    ref = piece("crop-resize-flip: Pillow resize(box) + transpose", resize(resize_crop_reference))
    for path in ("numba",) + SIMD_PATHS:  # benchmarks.resize has them side by side, and vs decode
        piece(f"crop-resize-flip: ours {path}, into the slot", resize(resize_crop_into, path=path), ref)

    normalize_rows(decoded, boxes, flips, piece)

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

    ref = piece("shard write: tarfile + sha256 + fsync", std_tar)
    piece("shard write: ours (+ DALI index)", ours_tar, ref)

    print(table(rows, [("name", "piece", "s"), ("img_s", "items/s", ".0f"), ("vs_ref", "x library", ".2f"),
                       ("cpu_img_s", "items/CPU-s", ".0f")]))
    path = write_json("kernels", {"rows": rows, "images": n,
                                  "command": "python -m benchmarks.kernels " + " ".join(argv or [])},
                      machine=machine)
    print(f"wrote {path}")
    return 0


def roi_decodable(datas: list[bytes]) -> list[bytes]:
    """The JPEGs the ROI decoder takes: the photo set's few CMYK files go to the loader's Pillow
    fallback instead (the decoder raises UnsupportedJPEG), so they are no piece of it to time."""
    from kernels import _jpeg

    return [d for d in datas if _jpeg.header(d)[2] != 4]


def normalize_rows(decoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray, piece, batch: int = 64) -> None:
    """The CPU loader's torch step for normalized fp32 batches, against the reference's, on one
    torch thread: the step the ATEN_CPU_CAPABILITY cap reaches (the uint8 path has no torch op)."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants, normalize_nhwc
    from kernels.resize import resize_crop_into

    crops = np.empty((batch, 224, 224, 3), np.uint8)
    for i in range(batch):
        k = i % len(decoded)
        resize_crop_into(decoded[k], tuple(boxes[k]), crops[i], bool(flips[k]))
    images = [Image.fromarray(c) for c in crops]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    scale, shift = affine_constants(IMAGENET_MEAN, IMAGENET_STD, "cpu")
    slot = torch.from_numpy(crops)

    def reference():
        torch.stack([tf(im) for im in images])
        return batch

    def ours():
        normalize_nhwc(slot, scale, shift, torch.float32)
        return batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = piece("normalize to fp32: torchvision ToTensor + Normalize + stack", reference)
        piece("normalize to fp32: ours, one op on the uint8 batch", ours, ref)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
