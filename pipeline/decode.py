"""Decode one batch into a host batch slot: ROI JPEG decode, then crop-resize-flip in place.

This is the CPU backend's whole per-sample cost, so it avoids decoding pixels that the crop
throws away: the crop is chosen from the JPEG header before decoding, only the crop's rows and
(iMCU-aligned) columns are decoded, at the largest DCT scale that still covers the output, and
the resize writes straight into the shared batch buffer.
"""
from __future__ import annotations

import io
import logging
import mmap
import time
from dataclasses import dataclass

import numpy as np

from kernels.resize import resize_crop_into

from .augment import train_params, uniforms, val_params
from .source import SampleTable

log = logging.getLogger(__name__)

try:  # the ROI decoder is an optional compiled extension (see setup.py)
    from kernels import _jpeg
except ImportError:  # pragma: no cover - exercised where libjpeg-turbo headers are missing
    _jpeg = None

_JPEG_MAGIC = b"\xff\xd8"
_REPLACE_STREAM = 1
_MAX_REPLACEMENT_TRIES = 16


class CorruptSample(Exception):
    pass


@dataclass
class DecodeConfig:
    image_size: int
    train: bool
    seed: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_resize: int | None = None
    fast_dct: bool = False  # libjpeg's fast IDCT and plain upsampling: ~4 % faster, less exact


def dct_denominator(box_w: float, box_h: float, out: int) -> int:
    """Largest libjpeg scale 1/d whose decoded crop still covers `out` x `out` pixels."""
    for d in (8, 4, 2):
        if box_w / d >= out and box_h / d >= out:
            return d
    return 1


class BatchDecoder:
    """Decodes batches of sample ids; picklable, opens shard files lazily in whichever process
    it runs."""

    def __init__(self, table: SampleTable, cfg: DecodeConfig):
        self.table = table
        self.cfg = cfg
        self._maps: dict[int, mmap.mmap] = {}
        self._scratch = np.empty(1 << 20, np.uint8)
        if _jpeg is None and not getattr(BatchDecoder, "_warned", False):
            BatchDecoder._warned = True
            log.warning("kernels._jpeg is not built: decoding with Pillow (slower); see README")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    # -- bytes ---------------------------------------------------------------------------
    def read_bytes(self, sid: int, raw: dict | None):
        """The image member of sample `sid`: a view of the mapped shard, or from `raw` (remote)."""
        if raw is not None:
            return raw[sid][0]
        s = int(self.table.shard[sid])
        mm = self._maps.get(s)
        if mm is None:
            with open(self.table.urls[s], "rb") as f:
                mm = self._maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        off, n = int(self.table.offset[sid]), int(self.table.size[sid])
        if off + n > len(mm):
            raise CorruptSample(f"member runs past the end of {self.table.urls[s]}")
        return memoryview(mm)[off:off + n]

    def label(self, sid: int, raw: dict | None) -> int:
        return int(raw[sid][1]) if raw is not None else int(self.table.label[sid])

    def read_headers(self, ids: list[int], raw: dict | None) -> tuple[dict, np.ndarray, dict[int, str]]:
        """(bytes by id, (n, 2) header sizes as width, height, why each unreadable id failed).

        An unreadable sample keeps a 1 x 1 size, so crop parameters can still be drawn for it."""
        data, bad = {}, {}
        sizes = np.ones((len(ids), 2), np.int64)
        for i, sid in enumerate(ids):
            try:
                data[sid] = self.read_bytes(sid, raw)
                sizes[i] = self.header_size(data[sid])
            except CorruptSample as e:
                bad[sid] = str(e)
        return data, sizes, bad

    # -- decode --------------------------------------------------------------------------
    def header_size(self, data) -> tuple[int, int]:
        """(width, height) from the image header; CorruptSample if it cannot be read."""
        try:
            if _jpeg is not None and bytes(data[:2]) == _JPEG_MAGIC:
                w, h, _, _ = _jpeg.header(data)
                return w, h
            from PIL import Image

            return Image.open(io.BytesIO(data)).size
        except (ValueError, OSError, SyntaxError) as e:
            raise CorruptSample(f"bad header: {e}") from None

    def _decode_into(self, data, box, flip: bool, out: np.ndarray) -> None:
        x0, y0, bw, bh = box
        d = dct_denominator(bw, bh, self.cfg.image_size)
        if _jpeg is not None and bytes(data[:2]) == _JPEG_MAGIC:
            ix, iy = int(x0), int(y0)
            iw, ih = int(np.ceil(x0 + bw)) - ix, int(np.ceil(y0 + bh)) - iy
            # Room for the crop widened to iMCU edges (at most 2 x 16 px, scaled) on each row.
            need = (iw // d + 40) * (ih // d + 2) * 3
            if self._scratch.size < need:
                self._scratch = np.empty(int(need * 1.25), np.uint8)
            try:
                left, top, width, rows = _jpeg.decode_region(data, ix, iy, max(iw, 1), max(ih, 1), d,
                                                             self._scratch, self.cfg.fast_dct)
            except ValueError as e:
                raise CorruptSample(str(e)) from None
            region = self._scratch[:width * rows * 3].reshape(rows, width, 3)
            box = (x0 / d - left, y0 / d - top, bw / d, bh / d)
        else:
            region, scale = self._decode_pil(data, d)
            box = (x0 * scale, y0 * scale, bw * scale, bh * scale)
        resize_crop_into(region, box, out, flip)

    @staticmethod
    def _decode_pil(data, d: int):
        from PIL import Image

        try:
            im = Image.open(io.BytesIO(data))
            w = im.width
            if d > 1 and im.format == "JPEG":
                im.draft("RGB", (im.width // d, im.height // d))
            arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptSample(str(e)) from None
        return arr, arr.shape[1] / w

    def decode_batch(self, epoch: int, ids: np.ndarray, images: np.ndarray, labels: np.ndarray,
                     raw: dict | None = None) -> dict:
        """Fill images[:len(ids)] (uint8 NHWC) and labels[:len(ids)]; return timings and the
        corrupt samples. A sample that fails to decode is replaced by another sample of the same
        batch, picked by a hash of (seed, epoch, id) and given the failed sample's crop and flip
        draws, so the batch stays full and the output is the same for any worker count."""
        t0 = time.perf_counter()
        ids = [int(s) for s in ids]
        pos = {sid: i for i, sid in enumerate(ids)}
        data, sizes, bad = self.read_headers(ids, raw)
        boxes, flips = self.params(epoch, ids, sizes)
        t_read = time.perf_counter()
        corrupt = []
        for i, sid in enumerate(ids):
            if sid not in bad:
                try:
                    self._decode_into(data[sid], boxes[i], flips[i], images[i])
                    labels[i] = self.label(sid, raw)
                    continue
                except CorruptSample as e:
                    bad[sid] = str(e)
            corrupt.append((sid, self.table.key(sid), bad[sid]))
            for src in stand_ins(self.cfg.seed, epoch, sid, ids):
                if src in bad:
                    continue
                b, f = self.params(epoch, [sid], sizes[pos[src]][None])
                try:
                    self._decode_into(data[src], b[0], f[0], images[i])
                    labels[i] = self.label(src, raw)
                    break
                except CorruptSample as e:
                    bad[src] = str(e)  # reported when its own turn comes
            else:
                raise RuntimeError(f"epoch {epoch}: no decodable sample in the batch to replace "
                                   f"{self.table.key(sid)} ({bad[sid]})")
        return {"read_s": t_read - t0, "decode_s": time.perf_counter() - t_read, "corrupt": corrupt,
                "n": len(ids)}

    def params(self, epoch: int, ids, sizes: np.ndarray):
        """Crop boxes and flips for samples `ids` (their RNG keys) on images of `sizes` (w, h)."""
        if self.cfg.train:
            return train_params(self.cfg.seed, epoch, np.asarray(ids), sizes[:, 0], sizes[:, 1],
                                self.cfg.scale, self.cfg.ratio)
        return (val_params(sizes[:, 0], sizes[:, 1], self.cfg.image_size, self.cfg.val_resize),
                np.zeros(len(ids), bool))


def stand_ins(seed: int, epoch: int, sid: int, ids: list[int]):
    """Candidate stand-ins for a corrupt sample `sid`, in order: samples of the same batch picked
    by a hash of (seed, epoch, sid), so every backend and worker count picks the same ones."""
    u = uniforms(seed, epoch, np.array([sid]), _MAX_REPLACEMENT_TRIES, stream=_REPLACE_STREAM)[0]
    for v in u:
        yield int(ids[int(v * len(ids))])
