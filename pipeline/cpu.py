"""The `cpu` backend: worker processes (or threads) decode batches into shared host slots
(page-locked for CUDA), and the consumer's thread hands each slot to the device stage in plan
order.

A task is (token, seq, slot, epoch, sample ids, raw bytes or None); a worker answers with the
slot's timings or an error. The token tells results of an abandoned iteration from the current
one's; every submitted task is answered, so the count of outstanding tasks stays exact and a new
iteration first waits for the old one's tasks (they still write into the slots).
"""
from __future__ import annotations

import time

import torch

from kernels import resize

from .contract import LoaderConfig
from .decode import BatchDecoder
from .device import DeviceStage
from .planned import PlannedLoader
from .remote import RemoteReader
from .samples import SampleReader
from .source import SampleTable
from .workers import WorkerError, WorkerPool, packed


def pick_start_method(requested: str | None) -> str:
    """fork, unless CUDA or a process group is initialised: then the process runs their threads (and the loop's
    side streams, the nvjpeg device thread, ...), whose locks a forked child would inherit held,
    and CUDA itself cannot be used after fork. Workers then start from a forkserver, a clean
    process that forks them."""
    if requested is not None:
        return requested
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    # A process group runs its backend's threads too (gloo's transport and work loops, NCCL's
    # watchdog); a val loader forked beside them under torchrun once hung in the child's
    # after-fork clean-up, so workers start from the forkserver there as well.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return "forkserver" if cuda or distributed else "fork"


class CpuLoader(PlannedLoader):
    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__(table, cfg)
        self.samples = SampleReader(table, cfg.max_open_shards)
        self.decoder = BatchDecoder(self.samples, cfg.transform_at(0), cfg.seed, cfg.use_fast_dct, cfg.use_dct_scaling,
                                    None if cfg.schedule.fixed else cfg.schedule)
        self.device_stage = DeviceStage(cfg)
        self.slots = max(2, cfg.prefetch * max(cfg.workers, 1))
        if table.ranged and cfg.fetch_ahead > 0:  # room for each worker's batches fetched ahead
            self.slots = max(self.slots, (cfg.fetch_ahead + 1) * max(cfg.workers, 1))
        self._pool: WorkerPool | None = None
        self._token = 0
        self._outstanding = 0
        self._images = self._labels = None

    # -- workers ------------------------------------------------------------------------
    def _ensure_pool(self) -> None:
        if self._pool is not None:
            return
        c = self.cfg
        # Sized once for the largest size of the schedule: a smaller epoch uses a prefix of each
        # slot (`packed`), so progressive resizing never reallocates or re-pins host memory.
        shape = (self.slots, c.batch_size, c.max_size, c.max_size, 3)
        self._images = torch.empty(shape, dtype=torch.uint8).share_memory_()
        self._labels = torch.empty((self.slots, c.batch_size), dtype=torch.int64).share_memory_()
        if self.device_stage.pins_host_memory:
            # Page-lock the shared slots in place: async copies without a staging buffer.
            for t in (self._images, self._labels):
                torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        self._slot_events: list = [None] * self.slots
        resize.warmup()
        self._outstanding = 0
        start = pick_start_method(c.start_method) if c.worker_mode == "process" else None
        self._pool = WorkerPool(self.decoder, self._images, self._labels, max(c.workers, 1), c.worker_mode, start,
                                c.fetch_ahead)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._images is not None and self.device_stage.pins_host_memory:
            for t in (self._images, self._labels):
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self._images = self._labels = None
        self.samples.close()

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self):
        self._ensure_pool()  # workers fork before the cache filler's threads start (in _begin)
        epoch, batches, shard_order, start = self._begin()
        self._drain_stale()
        self._token += 1
        token = self._token
        reader = None
        if self.table.streamed:
            reader = RemoteReader(self.table, shard_order, batches, start, lookahead=self.slots + 1)
        size = self.cfg.size_at(epoch)
        free = list(range(self.slots))
        ready: dict[int, tuple[int, dict]] = {}
        nxt = start
        try:
            while self._position < len(batches):
                t0 = time.perf_counter()
                while free and nxt < len(batches):
                    raw = None
                    if reader is not None:
                        # Block on the stream only when no decoded batch is on its way.
                        raw = reader.take(batches[nxt], block=self._outstanding == 0 and not ready)
                        if raw is None:
                            break
                    slot = free.pop()
                    if self._slot_events[slot] is not None:
                        self._slot_events[slot].synchronize()  # the copy out of this slot is done
                        self._slot_events[slot] = None
                    self._pool.submit((token, nxt, slot, epoch, batches[nxt], raw))
                    self._outstanding += 1
                    nxt += 1
                while self._position not in ready:
                    tok, seq, slot, st, error = self._pool.get()
                    self._outstanding -= 1  # every submitted task is answered, error or not
                    if tok != token:
                        continue
                    if error is not None:
                        raise WorkerError(f"loader worker failed on batch {seq} of epoch {epoch}: {error}")
                    ready[seq] = (slot, st)
                t1 = time.perf_counter()
                slot, st = ready.pop(self._position)
                n = st["n"]
                images, labels, event = self.device_stage(packed(self._images[slot], size)[:n], self._labels[slot, :n])
                self._slot_events[slot] = event
                free.append(slot)
                self.stats.copy_s += time.perf_counter() - t1
                self.stats.add_batch(n, t1 - t0, st["read_s"], st["decode_s"], st["corrupt"])
                self._position += 1
                yield images, labels
        except WorkerError:
            if not self._pool.alive():  # a worker died: the next iteration starts a new pool
                self._pool.close()
                self._pool = None
            raise
        finally:
            if reader is not None:
                reader.stop()

    def _drain_stale(self) -> None:
        """Wait for tasks of an abandoned iteration: they still write into the slots."""
        while self._outstanding > 0:
            self._pool.get()
            self._outstanding -= 1
