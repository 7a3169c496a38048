"""The `resident` backend, for small datasets of one image size (CIFAR): decode the split once,
keep it as one uint8 tensor on the device, and make each batch there with one gather of its
samples' crops and flips (airbench's CIFAR loader does the same on a GPU).

It follows the shared plan and RNG, and replaces a damaged sample by the cpu backend's rule, so
its batches are bitwise those of the cpu backend. It needs a transform that only crops
(`crop="padded"`: CIFAR's RandomCrop with zero padding, CenterCrop at val); a resizing transform
(ImageNet's) is refused when the loader is built.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kernels.normalize import affine_constants, normalize_nhwc

from .contract import LoaderConfig
from .decode import _decode_pil, stand_ins
from .http import http_get
from .planned import PlannedLoader
from .samples import CorruptSample, SampleReader
from .shard_format import decode_label
from .source import SampleTable


class ResidentLoader(PlannedLoader):
    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__(table, cfg)
        if cfg.transform.resizes:
            raise ValueError("backend 'resident' keeps the decoded images as they are, so it needs a transform "
                             "that only crops (crop='padded', CIFAR's); this one resizes (crop='resized')")
        self.device = torch.device(cfg.device)
        self.samples = SampleReader(table, cfg.max_open_shards)
        self.scale, self.shift = affine_constants(cfg.mean, cfg.std, self.device) if cfg.normalize else (None, None)
        self._pixels: torch.Tensor | None = None  # (N, H + 2p, W + 2p, 3) uint8, zero border p
        self._bad: dict[int, str] = {}
        self._pad = 0

    def close(self) -> None:
        self._pixels = None
        self.samples.close()

    # -- the one decode --------------------------------------------------------------------------
    def _load(self) -> None:
        t0 = time.perf_counter()
        n = len(self.table)
        raw = None
        if self.table.streamed:
            raw = self._remote_bytes()
        elif self.table.ranged:
            raw = self.samples.fetch(range(n))  # the whole split in one concurrent read
        with ThreadPoolExecutor(max(1, self.cfg.workers)) as pool:
            decoded = list(pool.map(lambda sid: self._decode_one(sid, raw), range(n)))
        shapes = {a.shape for a in decoded if a is not None}
        if len(shapes) != 1:
            raise ValueError(f"backend 'resident' needs images of one size; split {self.cfg.split!r} has "
                             f"{sorted(shapes)[:4] if shapes else 'no decodable image'}")
        h, w, _ = shapes.pop()
        # The widest reach of a box past the image: the random crop's padding, or a centre crop
        # larger than the image, at the schedule's largest size (one allocation for every epoch).
        size = self.cfg.max_size
        self._pad = p = max(self.cfg.padding if self.cfg.train else 0, (size - min(h, w) + 1) // 2, 0)
        pixels = np.zeros((n, h + 2 * p, w + 2 * p, 3), np.uint8)
        for sid, a in enumerate(decoded):
            if a is not None:
                pixels[sid, p:p + h, p:p + w] = a
        self._size = (w, h)
        self._pixels = torch.from_numpy(pixels).to(self.device)
        self.stats.device_bytes = pixels.nbytes if self.device.type != "cpu" else 0
        self.stats.decode_s += time.perf_counter() - t0

    def _decode_one(self, sid: int, raw: dict | None) -> np.ndarray | None:
        try:
            return _decode_pil(self.samples.bytes(sid, raw), 1)[0]
        except CorruptSample as e:
            self._bad[sid] = str(e)
            return None

    def _remote_bytes(self) -> dict[int, tuple[bytes, int]]:
        """Every sample of a streamed split: each shard fetched whole (a small dataset's few shards)."""
        t, out = self.table, {}
        starts = t.shard_starts
        for s, url in enumerate(t.urls):
            data = http_get(url)
            for sid in range(starts[s], starts[s + 1]):
                off, n = int(t.offset[sid]), int(t.size[sid])
                if t.label[sid] < 0:  # no label table: the .cls member
                    coff, cn = (int(v) for v in t.cls_offset[sid])
                    t.label[sid] = decode_label(data[coff:coff + cn])
                out[sid] = (data[off:off + n], int(t.label[sid]))
        return out

    # -- batches ---------------------------------------------------------------------------------
    def _batch(self, epoch: int, ids: np.ndarray):
        ids = [int(s) for s in ids]
        sizes = np.tile(np.array(self._size, np.int64), (len(ids), 1))
        transform = self.cfg.transform_at(epoch)
        boxes, flips = transform.params(self.cfg.seed, epoch, ids, sizes)
        sources, corrupt = list(ids), []
        for i, sid in enumerate(ids):
            if sid in self._bad:
                corrupt.append((sid, self.table.key(sid), self._bad[sid]))
                src = next((s for s in stand_ins(self.cfg.seed, epoch, sid, ids) if s not in self._bad), None)
                if src is None:
                    raise CorruptSample(f"epoch {epoch}: no decodable sample in the batch to replace "
                                        f"{self.table.key(sid)} ({self._bad[sid]})")
                sources[i] = src  # with the failed sample's own crop and flip, as the cpu backend does
        s, p = transform.size, self._pad
        ar = np.arange(s)
        rows = boxes[:, 1:2].astype(np.int64) + p + ar
        cols = boxes[:, 0:1].astype(np.int64) + p + ar
        cols = np.where(flips[:, None], cols[:, ::-1], cols)
        dev = self.device
        src = torch.from_numpy(np.asarray(sources, np.int64)).to(dev)
        r, c = torch.from_numpy(rows).to(dev), torch.from_numpy(np.ascontiguousarray(cols)).to(dev)
        x = self._pixels[src[:, None, None], r[:, :, None], c[:, None, :]]  # (B, S, S, 3): one gather
        labels = torch.from_numpy(self.table.label[sources]).to(dev)
        dtype = self.cfg.dtype if self.cfg.normalize else torch.uint8
        return normalize_nhwc(x, self.scale, self.shift, dtype, self.cfg.channels_last), labels, corrupt

    def __iter__(self):
        epoch, batches, _, start = self._begin()
        t0 = time.perf_counter()
        if self._pixels is None:
            self._load()
        first_wait = time.perf_counter() - t0
        for b in range(start, len(batches)):
            t1 = time.perf_counter()
            x, y, corrupt = self._batch(epoch, batches[b])
            self.stats.copy_s += time.perf_counter() - t1
            self.stats.add_batch(len(y), first_wait, 0.0, 0.0, corrupt)
            first_wait = 0.0
            self._position = b + 1
            yield x, y
