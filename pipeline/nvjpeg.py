"""The `nvjpeg` backend: decode and augment on the device, with torchvision's batched nvJPEG
decode and one batched crop-resize-normalize kernel (kernels/batch_resize.py).

Host threads only read each batch's JPEG bytes (mmap slices, range reads from an object store,
or the http stream) into a pinned buffer, read the headers, and draw each sample's crop and flip
from the same counter-based RNG as the CPU backend, so the augmentation distribution is the same. The device
work runs in a thread of its own (torchvision's decode blocks its caller until the batch is
decoded) on one side stream created with the loader; the consumer's stream waits on an event
recorded after each batch, and the outputs are marked with `record_stream`.

torchvision fails a whole batch when one JPEG is corrupt; the batch is then decoded image by
image. An image the device decoder refuses is decoded on the CPU with the strict check
(`decode_strict`): if that fails too, the data is damaged and the sample is replaced
deterministically by another of its batch (the CPU backend's rule) and counted in `stats`; if it
succeeds (a CMYK file, say), its CPU pixels are used. Out-of-memory and CUDA errors always raise.

With device="cpu" the same code runs on torchvision's CPU decode_jpeg and the kernel's
reference implementation; that is how it is tested without a GPU.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kernels.batch_resize import batch_crop_resize
from kernels.normalize import affine_constants

from .contract import LoaderConfig
from .decode import decode_strict, stand_ins
from .planned import PlannedLoader
from .remote import RemoteReader
from .samples import CorruptSample, SampleReader, is_jpeg
from .source import SampleTable


def pad_for_box(image: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """Zero-pad a CHW image where `box` (left, top, w, h) leaves it (a padded crop), shifting the
    box in place to match: the kernel, like Pillow, clamps at the image's edge instead."""
    h, w = image.shape[1:]
    pad = math.ceil(max(-box[0], -box[1], box[0] + box[2] - w, box[1] + box[3] - h, 0))
    if not pad:
        return image
    box[:2] += pad
    return torch.nn.functional.pad(image, (pad, pad, pad, pad))


def is_device_fault(error: BaseException) -> bool:
    """Errors of the device itself, never of one image's bytes."""
    msg = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA error" in msg or "out of memory" in msg


@dataclass
class HostBatch:
    ids: list[int]
    data: list[torch.Tensor]   # JPEG bytes per sample (views of one pinned buffer)
    labels: np.ndarray
    bad: dict[int, str]        # sample id -> why it could not be read
    read_s: float


class NvjpegLoader(PlannedLoader):
    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__(table, cfg)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the feeder thread sets it
        self.samples = SampleReader(table, cfg.max_open_shards)  # shared by the read threads (it locks)
        self.scale, self.shift = affine_constants(cfg.mean, cfg.std, self.device)
        if not cfg.normalize:  # identity affine on 0..255, then cast back to uint8 below
            self.scale, self.shift = torch.full_like(self.scale, 1.0), torch.zeros_like(self.shift)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="nvjpeg-read")
        self._pin = self.device.type == "cuda"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.samples.close()

    # -- host side: bytes, headers, parameters --------------------------------------------------
    def _read(self, ids: np.ndarray, raw: dict | None) -> HostBatch:
        t0 = time.perf_counter()
        ids = [int(s) for s in ids]
        # Headers are read here only to catch corrupt samples on the host; the crops are drawn
        # on the decoded images' sizes.
        data, _, bad = self.samples.read_batch(ids, raw)
        blobs = [b"" if sid in bad else data[sid] for sid in ids]
        labels = np.array([self.samples.label(sid, raw) for sid in ids], np.int64)
        total = sum(len(b) for b in blobs)
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=self._pin)
        host = buf.numpy()
        views, off = [], 0
        for b in blobs:
            n = len(b)
            host[off:off + n] = np.frombuffer(b, np.uint8)  # the one copy: shard -> pinned buffer
            views.append(buf[off:off + n])
            off += n
        return HostBatch(ids, views, labels, bad, time.perf_counter() - t0)

    # -- device side -----------------------------------------------------------------------------
    def _decode(self, hb: HostBatch) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(hb.ids)
        bad = dict(hb.bad)

        def on_cpu(i: int, why: str = "") -> None:
            try:
                pixels = decode_strict(hb.data[i].numpy().tobytes())
            except CorruptSample as e:
                bad[hb.ids[i]] = f"{e}{why}"
                return
            out[i] = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(self.device)  # CHW, as decode_jpeg

        good = []
        for i, sid in enumerate(hb.ids):
            if sid in bad:
                continue
            if is_jpeg(hb.data[i][:2].numpy()):
                good.append(i)
            else:
                on_cpu(i)  # PNG (CIFAR) and other formats: nvJPEG reads only JPEG
        try:
            imgs = decode_jpeg([hb.data[i] for i in good], mode=ImageReadMode.RGB, device=self.device) if good else []
            for i, t in zip(good, imgs):
                out[i] = t
        except RuntimeError as e:
            if is_device_fault(e):
                raise
            for i in good:  # one image failed the batch: find it
                try:
                    out[i] = decode_jpeg(hb.data[i], mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError as e1:
                    if is_device_fault(e1):
                        raise
                    on_cpu(i, f" (nvjpeg: {str(e1).splitlines()[0]})")
        return out, bad

    def _assemble(self, epoch: int, hb: HostBatch):
        decoded, bad = self._decode(hb)
        ids = hb.ids
        pos = {sid: i for i, sid in enumerate(ids)}
        images, labels = list(decoded), hb.labels.copy()
        corrupt = []
        for i, sid in enumerate(ids):
            if sid not in bad:
                continue
            corrupt.append((sid, self.table.key(sid), bad[sid]))
            for src in stand_ins(self.cfg.seed, epoch, sid, ids):
                if src not in bad:
                    j = pos[src]
                    images[i], labels[i] = decoded[j], hb.labels[j]
                    break
            else:
                raise CorruptSample(f"epoch {epoch}: no decodable sample in the batch to replace "
                                    f"{self.table.key(sid)} ({bad[sid]})")
        # Each sample keeps its own RNG draws, applied to the image it actually got.
        transform = self.cfg.transform_at(epoch)
        boxes, flips = transform.params(self.cfg.seed, epoch, ids, np.array([[t.shape[2], t.shape[1]] for t in images]))
        images = [pad_for_box(t, box) for t, box in zip(images, boxes)]
        dtype = self.cfg.dtype if self.cfg.normalize else torch.float32
        x = batch_crop_resize(images, boxes, flips, transform.size, self.scale, self.shift, dtype)
        if not self.cfg.normalize:
            x = x.round().clamp_(0, 255).to(torch.uint8)
        if not self.cfg.channels_last:
            x = x.contiguous()
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        held = sum(t.numel() for t in decoded if t is not None) + x.numel() * x.element_size()
        return x, y, corrupt, held

    def __iter__(self):
        epoch, batches, shard_order, start = self._begin()
        reader = None
        if self.table.streamed:
            reader = RemoteReader(self.table, shard_order, batches, start, lookahead=self.cfg.prefetch + 1)
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.prefetch))
        stop = threading.Event()
        feeder = threading.Thread(target=self._feed, args=(epoch, batches, start, reader, ready, stop),
                                  name="nvjpeg-device", daemon=True)
        feeder.start()
        try:
            while self._position < len(batches):
                t0 = time.perf_counter()
                item = ready.get()
                wait_s = time.perf_counter() - t0
                if isinstance(item, Exception):
                    raise item
                x, y, corrupt, held, event, read_s, device_s = item
                if event is not None:
                    # The batch was made on the loader's stream; the model reads it on this one.
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                self.stats.add_batch(len(y), wait_s, read_s, device_s, corrupt)
                # Held at most: one batch's decoded images, and its output plus those queued.
                out_bytes = x.numel() * x.element_size()
                self.stats.device_bytes = max(self.stats.device_bytes,
                                              held + ready.maxsize * out_bytes)
                self._position += 1
                yield x, y
        finally:
            stop.set()
            feeder.join()
            if reader is not None:
                reader.stop()

    def _feed(self, epoch: int, batches: list, start: int, reader, ready: queue.Queue, stop: threading.Event):
        """The device thread: host batches in order -> decoded, augmented device batches on `ready`.

        torchvision's nvJPEG decode blocks its caller until the batch is decoded, so it runs here
        rather than in the training loop: the loop keeps queueing kernels meanwhile. At most
        `prefetch` finished batches wait on `ready`, which bounds the device memory held.
        """
        if self.stream is not None:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
        depth = max(1, self.cfg.prefetch)
        futures: dict = {}
        nxt = start

        def submit():
            nonlocal nxt
            while nxt < len(batches) and len(futures) < depth:
                raw = reader.take(batches[nxt]) if reader is not None else None
                futures[nxt] = self._pool.submit(self._read, batches[nxt], raw)
                nxt += 1

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for b in range(start, len(batches)):
                submit()
                hb = futures.pop(b).result()
                submit()  # keep the readers busy while the device works on this batch
                t0 = time.perf_counter()
                event = None
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        x, y, corrupt, held = self._assemble(epoch, hb)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    x, y, corrupt, held = self._assemble(epoch, hb)
                # device_s: host time to run the decode and enqueue the kernel (on the CPU: all of it).
                if not put((x, y, corrupt, held, event, hb.read_s, time.perf_counter() - t0)):
                    return
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it in its own thread
            put(e)
        finally:
            for f in futures.values():
                f.cancel()
