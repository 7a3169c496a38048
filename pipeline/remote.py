"""Streaming reader for shards served over http(s).

A thread streams the rank's shards in the epoch's shard order and cuts samples out of the byte
stream at the offsets of each shard's index. It reads ahead only as far as the batches about to
be dispatched need (the plan says exactly how far), so memory stays bounded by the shuffle
buffer plus the batches in flight. The byte stream itself retries and resumes mid-shard.
"""
from __future__ import annotations

import threading

import numpy as np

from .http import http_stream
from .shard_format import decode_label
from .source import SampleTable


class ReaderStopped(RuntimeError):
    """The stream was stopped while a batch was still awaited."""


class RemoteReader:
    def __init__(self, table: SampleTable, shard_order: list[int], batches: list[np.ndarray], start_batch: int,
                 lookahead: int):
        self.table = table
        starts = table.shard_starts
        # Stream position of each sample id on this rank, in the order the shards are read.
        parts = [np.arange(starts[s], starts[s + 1]) for s in shard_order]
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        where = np.full(len(table), -1, np.int64)
        where[stream] = np.arange(len(stream))
        needed = batches[start_batch:]
        self.needed = set(int(i) for b in needed for i in b)
        # How far the stream must be read before batch k (relative to start) can be dispatched.
        reach = [int(where[b].max()) + 1 if len(b) else 0 for b in needed]
        self.reach = np.maximum.accumulate(reach) if reach else np.zeros(0, np.int64)
        self.lookahead = lookahead
        self.shard_order = shard_order
        self.starts = starts
        self.dispatched = 0
        self.items: dict[int, tuple[bytes, int]] = {}
        self.error: BaseException | None = None
        self.done = False
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="shard-reader", daemon=True)
        self.thread.start()

    def _allowed(self) -> int:
        if len(self.reach) == 0:
            return 0
        return int(self.reach[min(self.dispatched + self.lookahead, len(self.reach) - 1)])

    def _run(self) -> None:
        try:
            pos = 0
            for s in self.shard_order:
                first, last = int(self.starts[s]), int(self.starts[s + 1])
                if not any(i in self.needed for i in range(first, last)):
                    pos += last - first
                    continue  # a resumed epoch skips whole shards it no longer needs
                pos = self._read_shard(s, first, last, pos)
                if self.stopped:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            with self.cv:
                self.error = e
                self.cv.notify_all()
            return
        with self.cv:
            self.done = True
            self.cv.notify_all()

    def _read_shard(self, s: int, first: int, last: int, pos: int) -> int:
        t = self.table
        ids = range(first, last)
        spans = [(int(t.offset[i]), int(t.size[i]), int(t.cls_offset[i][0]), int(t.cls_offset[i][1])) for i in ids]
        buf = bytearray()
        base = 0  # stream offset of buf[0]
        k = 0
        for chunk in http_stream(t.urls[s]):
            buf += chunk
            while k < len(spans):
                off, n, coff, cn = spans[k]
                end = max(off + n, coff + cn)
                if base + len(buf) < end:
                    break
                sid = first + k
                with self.cv:
                    while not self.stopped and pos >= self._allowed():
                        self.cv.wait(0.5)
                    if self.stopped:
                        return pos
                    if sid in self.needed:
                        label = int(t.label[sid])
                        if label < 0 and coff >= 0:  # no label table: the .cls member, from the stream
                            label = decode_label(buf[coff - base:coff - base + cn])
                        self.items[sid] = (bytes(buf[off - base:off + n - base]), label)
                        self.cv.notify_all()
                pos += 1
                k += 1
                del buf[:end - base]
                base = end
            if k == len(spans):
                break
        if k < len(spans):
            raise OSError(f"shard {t.urls[s]} ended after {k} of {len(spans)} samples")
        return pos

    def take(self, ids: np.ndarray, block: bool = True, poll_s: float = 1.0) -> dict[int, tuple[bytes, int]] | None:
        """Remove and return the bytes and labels of `ids` (the next batch to dispatch); wait for
        them when `block`, else return None if they have not all arrived."""
        want = [int(i) for i in ids]
        with self.cv:
            while True:
                if self.error is not None:
                    raise self.error
                if self.stopped:
                    raise ReaderStopped("the shard stream was stopped")
                if all(i in self.items for i in want):
                    out = {i: self.items.pop(i) for i in want}
                    self.dispatched += 1
                    self.cv.notify_all()
                    return out
                if self.done:
                    missing = [i for i in want if i not in self.items]
                    raise OSError(f"remote stream ended without samples {missing[:5]}")
                if not block:
                    return None
                self.cv.wait(poll_s)

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
