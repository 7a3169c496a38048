"""The cpu backend's per-batch work: decode each sample's box and resize it into a batch slot.

This is the CPU backend's whole per-sample cost, so it avoids decoding pixels that the crop
throws away: the box is drawn from the JPEG header before decoding, only the box's rows and
(iMCU-aligned) columns are decoded (`kernels/_jpeg.c`; from a shard JPEG with restart markers, only the
restart intervals that cover them), at the largest DCT scale that still
covers the output when DCT scaling is on (train, by default), and the resize writes straight
into the shared batch buffer. PNGs (CIFAR), and JPEGs the fast path cannot turn into RGB (CMYK,
YCCK), go through Pillow.

Only errors in the data are replaced (`CorruptSample`); a bad argument, an exhausted resource or
a bug raises.
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import replace

import numpy as np

from kernels.resize import resize_crop_into

from .augment import Transform, uniforms
from .resolution import ResolutionSchedule
from .samples import CorruptJPEG, CorruptSample, SampleReader, UnsupportedJPEG, _jpeg, is_jpeg, pil_errors

log = logging.getLogger(__name__)

# Shard JPEGs with restart markers (the converter's default) are decoded from only the restart
# intervals that cover the box; any other JPEG takes the whole-file region decode inside it.
# False: always the whole-file decode (benchmarks and tests compare the two).
use_restart_index = True

_REPLACE_STREAM = 1
_MAX_REPLACEMENT_TRIES = 16


def dct_denominator(box_w: float, box_h: float, out: int) -> int:
    """Largest libjpeg scale 1/d whose decoded crop still covers `out` x `out` pixels."""
    for d in (8, 4, 2):
        if box_w / d >= out and box_h / d >= out:
            return d
    return 1


def decode_margin(box_w: float, box_h: float, out_w: int, out_h: int, d: int) -> int:
    """Source pixels to decode beyond each side of the box.

    The resize filter reads up to max(box / out, d) source pixels past the box's edge (its
    support, in source pixels). Decoding them too gives pixels near the edge the neighbours a full
    decode gives them; two more decoded pixels keep the one column a cropped decode gets wrong (at
    its cut, fancy upsampling has no neighbour) outside the filter's reach.
    """
    return int(math.ceil(max(box_w / out_w, box_h / out_h, d))) + 2 * d


def stand_ins(seed: int, epoch: int, sid: int, ids: list[int]):
    """Candidate stand-ins for a corrupt sample `sid`, in order: samples of the same batch picked
    by a hash of (seed, epoch, sid), so every backend and worker count picks the same ones."""
    u = uniforms(seed, epoch, np.array([sid]), _MAX_REPLACEMENT_TRIES, stream=_REPLACE_STREAM)[0]
    for v in u:
        yield int(ids[int(v * len(ids))])


def decode_strict(data) -> np.ndarray:
    """The whole image as (H, W, 3) uint8, decoded on the CPU, or CorruptSample if the bytes are
    damaged: what decides whether an image a device decoder refused is bad data. JPEGs are first
    checked by the extension's strict validation, which (unlike Pillow) refuses corrupt data."""
    if _jpeg is not None and is_jpeg(data):
        try:
            _jpeg.validate(data)
        except CorruptJPEG as e:
            raise CorruptSample(str(e)) from None
        except UnsupportedJPEG:
            pass  # CMYK and the like: Pillow decodes them below
    return _decode_pil(data, 1)[0]


def _decode_pil(data, d: int) -> tuple[np.ndarray, float]:
    """(pixels (H, W, 3) uint8, their scale to the source) through Pillow, at about 1/d for JPEGs."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        w = im.width
        if d > 1 and im.format == "JPEG":
            im.draft("RGB", (im.width // d, im.height // d))
        arr = np.asarray(im.convert("RGB"))
    except pil_errors() as e:
        raise CorruptSample(str(e) or type(e).__name__) from None
    return arr, arr.shape[1] / w


class BatchDecoder:
    """Decodes batches of sample ids into host slots; picklable (one per worker process), and
    `for_thread()` gives each worker thread its own scratch buffer over a shared reader. With a
    `schedule`, epoch e's transform has the schedule's size for e (progressive resizing)."""

    def __init__(self, samples: SampleReader, transform: Transform, seed: int, fast_dct: bool = False,
                 dct_scaling: bool = True, schedule: ResolutionSchedule | None = None):
        self.samples = samples
        self.transform = transform
        self.schedule = schedule
        self.seed = seed
        self.fast_dct = fast_dct
        self.dct_scaling = dct_scaling
        self._scratch = np.empty(1 << 20, np.uint8)
        if _jpeg is None and not getattr(BatchDecoder, "_warned", False):
            BatchDecoder._warned = True
            log.warning("kernels._jpeg is not built: decoding with Pillow (slower); see README")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_scratch"] = np.empty(1 << 20, np.uint8)[:0]  # regrown where it is used
        return state

    def for_thread(self) -> "BatchDecoder":
        return BatchDecoder(self.samples, self.transform, self.seed, self.fast_dct, self.dct_scaling, self.schedule)

    def close(self) -> None:
        self.samples.close()

    def size_at(self, epoch: int) -> int:
        """The output side of epoch `epoch`."""
        return self.transform.size if self.schedule is None else self.schedule.size(epoch)

    def transform_at(self, epoch: int) -> Transform:
        size = self.size_at(epoch)
        return self.transform if size == self.transform.size else replace(self.transform, size=size)

    def params(self, epoch: int, ids, sizes: np.ndarray):
        """Crop boxes and flips for samples `ids` (their RNG keys) on images of `sizes` (w, h)."""
        return self.transform_at(epoch).params(self.seed, epoch, ids, sizes)

    # -- one sample ------------------------------------------------------------------------------
    def decode_into(self, data, box, flip: bool, out: np.ndarray, size) -> None:
        """Decode `box` (left, top, w, h in source pixels) of an image of `size` (width, height),
        resize it into `out` (H, W, 3) uint8 and flip it; where the box leaves the image (a padded
        crop), the output is zero. CorruptSample if the data is damaged."""
        x0, y0, bw, bh = box
        width, height = int(size[0]), int(size[1])
        out_h, out_w = out.shape[:2]
        pad = math.ceil(max(-x0, -y0, x0 + bw - width, y0 + bh - height, 0))
        if pad:
            region = np.pad(_decode_pil(data, 1)[0], ((pad, pad), (pad, pad), (0, 0)))
            resize_crop_into(region, (x0 + pad, y0 + pad, bw, bh), out, flip)
            return
        d = dct_denominator(bw, bh, min(out_h, out_w)) if self.dct_scaling else 1
        region = None
        if _jpeg is not None and is_jpeg(data):
            try:
                region, rbox = self._decode_jpeg(data, box, d, out_w, out_h, width)
            except UnsupportedJPEG:
                region = None  # CMYK, YCCK, ...: Pillow converts them
        if region is None:
            region, scale = _decode_pil(data, d)
            rbox = (x0 * scale, y0 * scale, bw * scale, bh * scale)
        resize_crop_into(region, rbox, out, flip)

    def _decode_jpeg(self, data, box, d: int, out_w: int, out_h: int, width: int):
        x0, y0, bw, bh = box
        m = decode_margin(bw, bh, out_w, out_h, d)
        ix, iy = max(int(x0) - m, 0), max(int(y0) - m, 0)
        iw, ih = int(math.ceil(x0 + bw)) + m - ix, int(math.ceil(y0 + bh)) + m - iy
        # At most every column of the image (the decoder may widen the box to iMCU edges, or to
        # the full width), and the box's rows, at scale 1/d.
        need = (width // d + 2) * (ih // d + 2) * 3
        if self._scratch.size < need:
            self._scratch = np.empty(int(need * 1.25), np.uint8)
        try:
            decode = _jpeg.decode_region_rst if use_restart_index else _jpeg.decode_region
            left, top, rw, rows = decode(data, ix, iy, iw, ih, d, self._scratch, self.fast_dct)
        except CorruptJPEG as e:
            raise CorruptSample(str(e)) from None
        region = self._scratch[:rw * rows * 3].reshape(rows, rw, 3)
        return region, (x0 / d - left, y0 / d - top, bw / d, bh / d)

    # -- one batch -------------------------------------------------------------------------------
    def decode_batch(self, epoch: int, ids: np.ndarray, images: np.ndarray, labels: np.ndarray,
                     raw: dict | None = None) -> dict:
        """Fill images[:len(ids)] (uint8 NHWC) and labels[:len(ids)]; return timings and the
        corrupt samples. A sample that fails to decode is replaced by another sample of the same
        batch, picked by a hash of (seed, epoch, id) and given the failed sample's crop and flip
        draws, so the batch stays full and the output is the same for any worker count."""
        t0 = time.perf_counter()
        ids = [int(s) for s in ids]
        pos = {sid: i for i, sid in enumerate(ids)}
        data, sizes, bad = self.samples.read_batch(ids, raw)
        boxes, flips = self.params(epoch, ids, sizes)
        t_read = time.perf_counter()
        corrupt = []
        for i, sid in enumerate(ids):
            if sid not in bad:
                try:
                    self.decode_into(data[sid], boxes[i], flips[i], images[i], sizes[i])
                    labels[i] = self.samples.label(sid, raw)
                    continue
                except CorruptSample as e:
                    bad[sid] = str(e)
            corrupt.append((sid, self.samples.table.key(sid), bad[sid]))
            for src in stand_ins(self.seed, epoch, sid, ids):
                if src in bad:
                    continue
                j = pos[src]
                b, f = self.params(epoch, [sid], sizes[j][None])
                try:
                    self.decode_into(data[src], b[0], f[0], images[i], sizes[j])
                    labels[i] = self.samples.label(src, raw)
                    break
                except CorruptSample as e:
                    bad[src] = str(e)  # reported when its own turn comes
            else:
                raise CorruptSample(f"epoch {epoch}: no decodable sample in the batch to replace "
                                    f"{self.samples.table.key(sid)} ({bad[sid]})")
        return {"read_s": t_read - t0, "decode_s": time.perf_counter() - t_read, "corrupt": corrupt,
                "n": len(ids)}
