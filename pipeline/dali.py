"""The `dali` backend: NVIDIA DALI decodes, resizes and normalizes, fed by the project's own plan.

The host side is the other backends': each batch's samples come from the epoch plan (`pipeline
.plan`), their bytes from the shards (`SampleReader`: mapped, streamed or ranged), and each sample's box
and flip from the shared counter-based RNG (`Transform`). DALI gets them through
`fn.external_source` and runs, per sample:

    fn.decoders.image_slice   decode the box plus the resize filter's margin (mixed: nvJPEG, with
                              the hardware decoder taking `hw_decoder_load` of the work); a
                              padded crop (CIFAR) decodes whole, and `fn.slice` fills the part
                              of its box outside the image with zeros
    fn.resize                 antialiased linear resize of the box (a fractional ROI of the slice)
                              to size x size; a ROI given right to left flips the sample. The size
                              is fed with each sample (progressive resizing changes it by epoch
                              without rebuilding the pipeline)
    fn.crop_mirror_normalize  normalize, HWC, which is NCHW in channels_last memory

So DALI's batches hold the same samples, crops and flips as the cpu and nvjpeg backends, the
epoch order, rank split, val exactly-once and resume are the shared plan's, and the resume state
is the shared one (no DALI checkpoint).

Bad data: a sample whose header cannot be read is replaced before DALI sees it. If DALI fails a
batch, the samples in flight are checked on the CPU; the ones that really are damaged are
replaced (and remembered), the pipeline is rebuilt and the batches are fed again; if none is
damaged, DALI's error is raised, since it is not the data's.

With device="cpu" the same pipeline runs on DALI's CPU operators with `device_id=None` (DALI's
CPU-only mode); that is what CI tests.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .contract import LoaderConfig
from .decode import decode_margin, decode_strict, stand_ins
from .planned import PlannedLoader
from .remote import RemoteReader
from .samples import CorruptSample, SampleReader
from .source import SampleTable

PACKAGE = "nvidia-dali-cuda130"
_INPUTS = ("jpegs", "anchor", "shape", "roi_start", "roi_end", "size")
_FLOAT_INPUTS = ("roi_start", "roi_end", "size")


def import_dali():
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise ImportError(f"backend 'dali' needs NVIDIA DALI: pip install {PACKAGE} "
                          f"(or pip install -e '.[dali]')") from None
    return Pipeline, fn, types, feed_ndarray


@dataclass
class HostBatch:
    """What the host feeds DALI for one batch."""

    index: int                       # the batch's position in the epoch
    ids: list[int]                   # planned sample ids
    sources: list[int]               # the sample actually decoded in each place (stand-ins for bad ones)
    inputs: dict[str, list[np.ndarray]]
    labels: np.ndarray
    corrupt: list[tuple[int, str, str]]
    read_s: float
    raw: dict | None = None          # remote bytes, kept to read the batch again after a failure


class DaliLoader(PlannedLoader):
    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__(table, cfg)
        self._Pipeline, self.fn, self.types, self._feed_ndarray = import_dali()
        self.device = torch.device(cfg.device)
        self.samples = SampleReader(table, cfg.max_open_shards)
        self.depth = max(2, cfg.prefetch)
        self._pipe = None
        self._primed = False
        self._known_bad: dict[int, str] = {}  # sample id -> why: found by a failed DALI batch
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="dali-read")
        self.stats.decode_s = None  # DALI decodes inside its own executor, where the host cannot time it

    def close(self) -> None:
        self._pipe = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.samples.close()

    # -- the pipeline ----------------------------------------------------------------------------
    def _build(self):
        fn, types, cfg = self.fn, self.types, self.cfg
        gpu = self.device.type == "cuda"
        pipe = self._Pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                              device_id=(self.device.index or 0) if gpu else None, seed=cfg.seed,
                              prefetch_queue_depth=self.depth, exec_dynamic=True)
        op_device = "gpu" if gpu else "cpu"
        mean = [m * 255 for m in cfg.mean] if cfg.normalize else [0.0, 0.0, 0.0]
        std = [s * 255 for s in cfg.std] if cfg.normalize else [1.0, 1.0, 1.0]
        out_type = types.UINT8
        if cfg.normalize:
            out_type = types.FLOAT16 if cfg.dtype == torch.float16 else types.FLOAT
        with pipe:
            jpegs, anchor, shape, roi_start, roi_end, size = (
                fn.external_source(name=n, dtype=types.UINT8 if n == "jpegs" else
                                   types.FLOAT if n in _FLOAT_INPUTS else types.INT32, ndim=1) for n in _INPUTS)
            decoder = {"device": "mixed", "hw_decoder_load": 0.65,
                       "jpeg_fancy_upsampling": not cfg.use_fast_dct} if gpu else \
                {"device": "cpu", "use_fast_idct": cfg.use_fast_dct}
            box = dict(normalized_anchor=False, normalized_shape=False, axis_names="WH")
            if cfg.transform.resizes:  # decode only the slice: nvJPEG's ROI decode on a GPU
                images = fn.decoders.image_slice(jpegs, anchor, shape, output_type=types.RGB, **box, **decoder)
            else:  # a padded crop leaves the image, which only fn.slice fills (small images: decode whole)
                images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
                images = fn.slice(images, anchor, shape, device=op_device, out_of_bounds_policy="pad", fill_values=0,
                                  **box)
            images = fn.resize(images, device=op_device, size=size, roi_start=roi_start, roi_end=roi_end,
                               antialias=True, interp_type=types.INTERP_LINEAR, subpixel_scale=False)
            images = fn.crop_mirror_normalize(images, device=op_device, dtype=out_type, output_layout="HWC",
                                              mean=mean, std=std)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    # -- host side -------------------------------------------------------------------------------
    def _read(self, epoch: int, index: int, ids: np.ndarray, raw: dict | None) -> HostBatch:
        t0 = time.perf_counter()
        ids = [int(s) for s in ids]
        data, sizes, bad = self.samples.read_batch(ids, raw)
        for sid in ids:
            if sid in self._known_bad:
                bad.setdefault(sid, self._known_bad[sid])
        pos = {sid: i for i, sid in enumerate(ids)}
        transform = self.cfg.transform_at(epoch)
        boxes, flips = transform.params(self.cfg.seed, epoch, ids, sizes)
        sources, corrupt = list(ids), []
        for i, sid in enumerate(ids):
            if sid not in bad:
                continue
            corrupt.append((sid, self.table.key(sid), bad[sid]))
            src = next((s for s in stand_ins(self.cfg.seed, epoch, sid, ids) if s not in bad), None)
            if src is None:
                raise CorruptSample(f"epoch {epoch}: no decodable sample in the batch to replace "
                                    f"{self.table.key(sid)} ({bad[sid]})")
            # The stand-in keeps the failed sample's own draws, applied to its image (cpu's rule).
            sources[i] = src
            boxes[i:i + 1], flips[i:i + 1] = transform.params(self.cfg.seed, epoch, [sid], sizes[pos[src]][None])
        inputs = {k: [] for k in _INPUTS}
        size = transform.size
        out_size = np.array([size, size], np.float32)
        for i, src in enumerate(sources):
            w, h = (int(v) for v in sizes[pos[src]])
            x0, y0, bw, bh = boxes[i]
            if transform.resizes:  # the box and the filter's margin, inside the image
                m = decode_margin(bw, bh, size, size, 1)
                ax, ay = max(int(x0) - m, 0), max(int(y0) - m, 0)
                ex, ey = min(int(math.ceil(x0 + bw)) + m, w), min(int(math.ceil(y0 + bh)) + m, h)
            else:  # a padded crop: exactly the box, zero filled past the image
                ax, ay, ex, ey = int(x0), int(y0), int(x0 + bw), int(y0 + bh)
            start = [y0 - ay, x0 - ax]
            end = [y0 - ay + bh, x0 - ax + bw]
            if flips[i]:  # a ROI given right to left mirrors the sample
                start[1], end[1] = end[1], start[1]
            inputs["jpegs"].append(np.frombuffer(data[src], np.uint8))
            inputs["anchor"].append(np.array([ax, ay], np.int32))
            inputs["shape"].append(np.array([ex - ax, ey - ay], np.int32))
            inputs["roi_start"].append(np.array(start, np.float32))
            inputs["roi_end"].append(np.array(end, np.float32))
            inputs["size"].append(out_size)
        labels = np.array([self.samples.label(s, raw) for s in sources], np.int64)
        return HostBatch(index, ids, sources, inputs, labels, corrupt, time.perf_counter() - t0, raw)

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        epoch, batches, shard_order, start = self._begin()
        reader = None
        if self.table.streamed:
            reader = RemoteReader(self.table, shard_order, batches, start, lookahead=self.depth + 1)
        pending: deque = deque()  # host reads, in batch order
        flight: deque[HostBatch] = deque()  # fed to DALI and scheduled, in order
        nxt = start

        def read_ahead():
            nonlocal nxt
            while nxt < len(batches) and len(pending) < self.depth:
                raw = reader.take(batches[nxt]) if reader is not None else None
                pending.append(self._pool.submit(self._read, epoch, nxt, batches[nxt], raw))
                nxt += 1

        try:
            while self._position < len(batches):
                t0 = time.perf_counter()
                read_ahead()
                self._schedule(pending, flight)
                hb = flight[0]
                try:
                    out = self._pipe.outputs()[0]
                except Exception as e:  # noqa: BLE001 - DALI's errors are plain RuntimeErrors: sorted below
                    self._recover(e, flight, pending)
                    continue
                flight.popleft()
                t1 = time.perf_counter()
                x, y = self._to_torch(out, hb.labels)
                self.stats.copy_s += time.perf_counter() - t1
                self.stats.add_batch(len(y), t1 - t0, hb.read_s, None, hb.corrupt)
                self._position += 1
                yield x, y
        finally:
            if os.getpid() == self._owner_pid:  # a forked child's copy leaves DALI alone (planned._LIVE_LOADERS)
                for f in pending:
                    f.cancel()
                self._settle(flight)
                if reader is not None:
                    reader.stop()

    def _schedule(self, pending: deque, flight: deque) -> None:
        """Feed DALI the host batches that are ready, keeping `depth` batches in flight."""
        if self._pipe is None:
            self._pipe, self._primed = self._build(), False
        if not self._primed:
            # DALI's first run prefetches `depth` iterations, so it needs that many fed first; an
            # epoch with fewer batches left pads with repeats, whose outputs are thrown away.
            while pending and len(flight) < self.depth:
                self._feed(pending.popleft().result(), flight)
            last = flight[-1]
            while len(flight) < self.depth:
                self._feed(last, flight, padding=True)
            self._pipe.schedule_run()
            self._primed = True
            return
        while pending and len(flight) < self.depth:
            self._feed(pending.popleft().result(), flight)
            self._pipe.schedule_run()

    def _feed(self, hb: HostBatch, flight: deque, padding: bool = False) -> None:
        for name in _INPUTS:
            self._pipe.feed_input(name, hb.inputs[name])
        flight.append(HostBatch(-1, [], [], {}, hb.labels, [], 0.0) if padding else hb)

    def _settle(self, flight: deque) -> None:
        """Consume what is still in flight (an abandoned or finished epoch), or drop a broken
        pipeline, so the next iteration starts clean."""
        if self._pipe is None:
            return
        try:
            for _ in range(len(flight)):
                self._pipe.outputs()
        except Exception:  # noqa: BLE001 - a broken pipeline is rebuilt on the next iteration
            self._pipe = None
        flight.clear()

    def _recover(self, error: Exception, flight: deque, pending: deque) -> None:
        """DALI failed a batch: find damaged samples among those in flight, or raise its error."""
        self._pipe = None  # DALI's pipeline is not usable after an error
        found = {}
        for hb in flight:
            for src in hb.sources:
                if src in found or src in self._known_bad:
                    continue
                try:
                    decode_strict(self.samples.bytes(src, hb.raw))
                except CorruptSample as e:
                    found[src] = f"dali: {e}"
        if not found:
            raise error
        self._known_bad.update(found)
        # Read the batches in flight again (their stand-ins now), ahead of those already read.
        epoch = self.epoch
        again = [self._pool.submit(self._read, epoch, hb.index, np.array(hb.ids), hb.raw)
                 for hb in flight if hb.index >= 0]
        flight.clear()
        pending.extendleft(reversed(again))

    def _to_torch(self, out, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        tensor = out.as_tensor()
        dtype = {self.types.UINT8: torch.uint8, self.types.FLOAT16: torch.float16}.get(tensor.dtype, torch.float32)
        x = torch.empty(tuple(tensor.shape()), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._feed_ndarray(tensor, x, cuda_stream=stream)
        x = x.permute(0, 3, 1, 2)  # HWC batch = NCHW in channels_last memory
        want = cfg.dtype if cfg.normalize else torch.uint8
        if x.dtype != want:
            x = x.to(want)
        if not cfg.channels_last:
            x = x.contiguous()
        y = torch.from_numpy(labels).to(self.device, non_blocking=self.device.type == "cuda")
        return x, y
