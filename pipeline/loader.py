"""The public loader: `Loader(shards, ...)` picks a backend from the registry and exposes one
contract, whatever the backend:

    len(loader)                      batches per epoch, identical on every rank
    loader.set_epoch(e)
    for images, labels in loader:    images (B, 3, H, W) on `device`, labels int64 on `device`
    loader.state_dict() / loader.load_state_dict(sd)   exact mid-epoch resume
    loader.stats                     counters (samples, corrupt with keys, wait/decode/copy time)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from kernels import resize
from kernels.batch_resize import normalize_nhwc_fused
from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants, normalize_nhwc

from . import plan
from .decode import BatchDecoder, DecodeConfig
from .remote import RemoteReader
from .source import SampleTable
from .stats import LoaderStats
from .workers import WorkerPool

STATE_VERSION = 1


def dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, else from torch.distributed, else from the environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class LoaderConfig:
    split: str = "train"
    batch_size: int = 256
    image_size: int = 224
    device: str = "cuda"
    workers: int = 8
    seed: int = 49
    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True
    normalize: bool = True
    drop_last: bool | None = None  # default: True for train, never for val
    prefetch: int = 2  # batch slots per worker
    worker_mode: str = "process"
    shuffle_buffer: int = 4096  # remote shards only
    val_resize: int | None = None
    # libjpeg's fast integer IDCT and plain chroma upsampling: ~4 % more train throughput here;
    # None means on for train (augmentation dwarfs the error) and off for val (exact pixels).
    fast_dct: bool | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def train(self) -> bool:
        return self.split == "train"


class DeviceStage:
    """Host uint8 batch -> device tensors: copy on a side stream created once, normalize there,
    and make the consumer's stream wait for it (no host sync)."""

    def __init__(self, cfg: LoaderConfig):
        self.device = torch.device(cfg.device)
        self.cfg = cfg
        self.scale, self.shift = affine_constants(cfg.mean, cfg.std, self.device) if cfg.normalize else (None, None)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """Returns (images, labels, event): the host slot may be reused once `event` completed."""
        cfg = self.cfg
        dtype = cfg.dtype if cfg.normalize else torch.uint8
        if self.device.type == "cpu":
            x = normalize_nhwc(images, self.scale, self.shift, dtype, cfg.channels_last)
            if x.data_ptr() == images.data_ptr():
                x = x.clone(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
            return x, labels.clone(), None
        if self.stream is None:  # npu and others: plain async copies on the current stream
            x = images.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            return normalize_nhwc(x, self.scale, self.shift, dtype, cfg.channels_last), y, None
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            if cfg.normalize and cfg.channels_last:
                out = normalize_nhwc_fused(x, self.scale, self.shift, dtype)  # one Triton pass
            else:
                out = normalize_nhwc(x, self.scale, self.shift, dtype, cfg.channels_last)
            event = torch.cuda.Event()
            event.record(self.stream)
        current.wait_stream(self.stream)
        # The tensors were made on the side stream but are used on the consumer's: tell the
        # caching allocator, or their memory could be reused while the model still reads it.
        out.record_stream(current)
        y.record_stream(current)
        return out, y, event


class PlannedLoader:
    """What every shard backend shares: the epoch plan, len, set_epoch and exact-resume state."""

    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        self.table = table
        self.cfg = cfg
        self.epoch = 0
        self._resume_batch = 0
        self._position = 0
        self._plans: dict[int, tuple[list[np.ndarray], list[int] | None]] = {}
        self.stats = LoaderStats()
        if len(self) == 0:
            raise ValueError(f"split {cfg.split!r}: {len(table)} samples give no batch of {cfg.batch_size} "
                             f"on each of {cfg.world_size} rank(s)")

    # -- plan ---------------------------------------------------------------------------
    def _plan(self, epoch: int):
        if epoch not in self._plans:
            c = self.cfg
            drop = c.train if c.drop_last is None else c.drop_last
            if not c.train:
                batches = plan.val_batches(len(self.table), c.rank, c.world_size, c.batch_size)
                mine = np.concatenate(batches) if batches else np.zeros(0, np.int64)
                p = (batches, sorted(set(self.table.shard[mine].tolist())))  # natural order, own shards
            elif self.table.remote:
                p = plan.train_batches_remote(self.table.shard_sizes, c.seed, epoch, c.rank, c.world_size,
                                              c.batch_size, c.shuffle_buffer, drop)
            else:
                p = (plan.train_batches_local(len(self.table), c.seed, epoch, c.rank, c.world_size, c.batch_size,
                                              drop), None)
            self._plans = {epoch: p}
        return self._plans[epoch]

    def __len__(self) -> int:
        return len(self._plan(self.epoch)[0])

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (val: its share of the exactly-once split)."""
        return sum(len(b) for b in self._plan(self.epoch)[0])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_batch = self._position = 0
        self.epoch = epoch

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self._position, "seed": self.cfg.seed,
                "world_size": self.cfg.world_size, "rank": self.cfg.rank, "batch_size": self.cfg.batch_size,
                "samples": len(self.table)}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "world_size", "batch_size", "samples"):
            mine = self.cfg.seed if k == "seed" else (len(self.table) if k == "samples" else getattr(self.cfg, k))
            if sd.get(k) != mine:
                raise ValueError(f"loader state was saved with {k}={sd.get(k)}, this loader has {k}={mine}")
        self.epoch = int(sd["epoch"])
        self._resume_batch = self._position = int(sd["batch"])

    def _begin(self):
        """Start an iteration: (epoch, batches, shard order, first batch)."""
        epoch = self.epoch
        batches, shard_order = self._plan(epoch)
        start, self._resume_batch = self._resume_batch, 0
        self._position = start
        return epoch, batches, shard_order, start

    def close(self) -> None:
        pass

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


class ShardLoader(PlannedLoader):
    """The CPU backend: workers decode into pinned shared host slots; see module docstring."""

    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__(table, cfg)
        self.decoder = BatchDecoder(table, DecodeConfig(cfg.image_size, cfg.train, cfg.seed,
                                                        val_resize=cfg.val_resize,
                                                        fast_dct=cfg.train if cfg.fast_dct is None else cfg.fast_dct))
        self.device_stage = DeviceStage(cfg)
        self.slots = max(2, cfg.prefetch * max(cfg.workers, 1))
        self._pool: WorkerPool | None = None
        self._token = 0
        self._outstanding = 0
        self._images = self._labels = None

    # -- workers ------------------------------------------------------------------------
    def _ensure_pool(self) -> None:
        if self._pool is not None:
            return
        c = self.cfg
        shape = (self.slots, c.batch_size, c.image_size, c.image_size, 3)
        self._images = torch.empty(shape, dtype=torch.uint8).share_memory_()
        self._labels = torch.empty((self.slots, c.batch_size), dtype=torch.int64).share_memory_()
        if self.device_stage.device.type == "cuda":
            # Page-lock the shared slots in place: async copies without a staging buffer.
            for t in (self._images, self._labels):
                torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        self._slot_events: list = [None] * self.slots
        n = max(c.workers, 1)
        resize.warmup()
        self._pool = WorkerPool(self.decoder, self._images, self._labels, n, c.worker_mode)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._images is not None and self.device_stage.device.type == "cuda":
            for t in (self._images, self._labels):
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self._images = self._labels = None

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self):
        epoch, batches, shard_order, start = self._begin()
        self._ensure_pool()
        self._drain_stale()
        self._token += 1
        token = self._token
        reader = None
        if self.table.remote:
            reader = RemoteReader(self.table, shard_order, batches, start, lookahead=self.slots + 1)
        free = list(range(self.slots))
        ready: dict[int, tuple[int, dict]] = {}
        nxt = start
        try:
            while self._position < len(batches):
                while free and nxt < len(batches):
                    slot = free.pop()
                    if self._slot_events[slot] is not None:
                        self._slot_events[slot].synchronize()  # the copy out of this slot is done
                        self._slot_events[slot] = None
                    raw = reader.take(batches[nxt]) if reader is not None else None
                    self._pool.submit((token, nxt, slot, epoch, batches[nxt], raw))
                    self._outstanding += 1
                    nxt += 1
                t0 = time.perf_counter()
                while self._position not in ready:
                    tok, seq, slot, st = self._pool.get()
                    self._outstanding -= 1
                    if tok != token:
                        continue
                    ready[seq] = (slot, st)
                t1 = time.perf_counter()
                slot, st = ready.pop(self._position)
                n = st["n"]
                images, labels, event = self.device_stage(self._images[slot, :n], self._labels[slot, :n])
                self._slot_events[slot] = event
                free.append(slot)
                self.stats.copy_s += time.perf_counter() - t1
                self.stats.add_batch(n, t1 - t0, st["read_s"], st["decode_s"], st["corrupt"])
                self._position += 1
                yield images, labels
        finally:
            if reader is not None:
                reader.stop()

    def _drain_stale(self) -> None:
        """Wait for tasks of an abandoned iteration: they still write into the slots."""
        while self._outstanding > 0:
            self._pool.get()
            self._outstanding -= 1
