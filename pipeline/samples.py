"""Read samples: their bytes, image sizes and labels, for every backend.

Local shards are read through mmap: a sample's bytes are a view of the mapped shard, with no
copy. Each map holds a file descriptor, so the maps a process keeps open form a bounded LRU
(`max_open`): ImageNet has ~550 train shards, and a map per shard per worker would pass the
common 1,024-descriptor limit. One reader may serve several threads: the cache is locked.
Shards in object storage are read here too, by range requests at the index's offsets: a batch's
ranges in one concurrent read (`fetch`), in the process that decodes them. Streamed (http) shards
arrive as `raw` dicts (id -> (bytes, label)) cut from the stream; `fetch` returns the same shape.
"""
from __future__ import annotations

import io
import mmap
import os
import threading
from collections import OrderedDict

import numpy as np

from . import objstore
from .shard_format import ShardError
from .source import SampleTable

try:  # the ROI decoder is an optional compiled extension (see setup.py)
    from kernels import _jpeg
except ImportError:  # pragma: no cover - exercised where libjpeg-turbo headers are missing
    _jpeg = None

JPEG_MAGIC = b"\xff\xd8"
if _jpeg is not None:
    CorruptJPEG, UnsupportedJPEG = _jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG
else:  # without the extension nothing raises them
    CorruptJPEG = UnsupportedJPEG = type("ExtensionNotBuilt", (Exception,), {})


class CorruptSample(Exception):
    """The sample's bytes are damaged: an error in the data, which the loader replaces."""


def is_jpeg(data) -> bool:
    return bytes(data[:2]) == JPEG_MAGIC


def pil_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for bytes it cannot decode (damaged data, not a bug of ours)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def image_size(data) -> tuple[int, int]:
    """(width, height) from the image header; CorruptSample if it cannot be read."""
    if _jpeg is not None and is_jpeg(data):
        try:
            w, h, _, _ = _jpeg.header(data)
            return w, h
        except CorruptJPEG as e:
            raise CorruptSample(f"bad header: {e}") from None
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).size
    except pil_errors() as e:
        raise CorruptSample(f"bad header: {e}") from None


class SampleReader:
    """Bytes, sizes and labels of samples by id; picklable (maps reopen lazily in the process
    that reads)."""

    def __init__(self, table: SampleTable, max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open}")
        self.table = table
        self.max_open = max_open
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()
        self._inodes: dict[int, int] = {}  # a cached shard's inode when it was mapped
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_lock"], state["_inodes"] = OrderedDict(), None, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def open_maps(self) -> int:
        return len(self._maps)

    def close(self, timeout: float = 10.0) -> None:
        """Unmap every shard. A reader thread that never finished its batch (one abandoned at
        interpreter exit, say) may hold the lock: then the maps are left to the garbage collector
        rather than waited for forever."""
        if self.table.cache is not None:
            self.table.cache.stop()  # the loader's process: its cache filler
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            while self._maps:
                _release(self._maps.popitem()[1])
        finally:
            self._lock.release()

    def fetch(self, ids) -> dict[int, tuple[bytes, int]]:
        """Bytes and labels of samples `ids` of an object store table, read by range requests
        (concurrent, nearby ranges merged), as a `raw` dict; samples of shards in the node-local
        cache are views of its mapped copy instead."""
        t = self.table
        # An index entry past its shard's end is damage, not a range to ask for: left out here, it
        # is reported as a CorruptSample by `bytes`, as on a local copy.
        rows = [int(sid) for sid in ids if t.past_end(sid) is None]
        out = {}
        if t.cache is not None:
            remote = []
            maps = {s: self._cached_map(s) for s in dict.fromkeys(int(t.shard[sid]) for sid in rows)}
            for sid in rows:
                mm = maps[int(t.shard[sid])]
                if mm is None:
                    remote.append(sid)
                else:  # a view of the mapped copy, as for a local shard: no copy
                    off = int(t.offset[sid])
                    out[sid] = (memoryview(mm)[off:off + int(t.size[sid])], int(t.label[sid]))
            rows = remote
        rows = np.asarray(rows, np.int64)
        if len(rows):
            starts = t.offset[rows]
            try:
                blobs = objstore.read_ranges([t.urls[s] for s in t.shard[rows]], starts, starts + t.size[rows])
            except objstore.ObjectStoreError as e:
                raise ShardError(f"shard {e}") from None
            out.update({int(sid): (b, int(t.label[sid])) for sid, b in zip(rows.tolist(), blobs)})
        return out

    def mapped(self, ids) -> bool:
        """Whether every shard of samples `ids` is mapped here from the node-local cache, so that
        `fetch` needs no request (as far as this process knows: an eviction since is found by `fetch`)."""
        t = self.table
        if t.cache is None:
            return False
        with self._lock:
            return all(int(s) in self._maps for s in np.unique(t.shard[np.asarray(ids, np.int64)]))

    def _cached_map(self, s: int) -> mmap.mmap | None:
        """The node-local cached copy of shard `s`, mapped; None while it is not cached (with the
        cache's `wait`, only once its download failed or found no room)."""
        cache = self.table.cache
        with self._lock:
            mm = self._maps.get(s)
            if mm is not None:
                # Evicted (or replaced) since it was mapped: let it go, so its disk space is freed.
                if _inode(cache.path(s)) == self._inodes.get(s):
                    self._maps.move_to_end(s)
                    return mm
                _release(self._maps.pop(s))
        path = cache.local(s)
        if path is None and cache.wait and cache.ensure(s, block=True):
            path = cache.local(s)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                inode = os.fstat(f.fileno()).st_ino
        except (OSError, ValueError):
            return None  # evicted since: read by range
        cache.touch(s)
        with self._lock:
            self._maps[s] = mm
            self._inodes[s] = inode
            while len(self._maps) > self.max_open:
                _release(self._maps.popitem(last=False)[1])
        return mm

    def bytes(self, sid: int, raw: dict | None = None):
        """The image member of sample `sid`: a view of its mapped shard, or from `raw` (streamed),
        or read from the object store."""
        if (why := self.table.past_end(sid)) is not None:
            raise CorruptSample(why)
        if raw is not None:
            return raw[sid][0]
        if self.table.ranged:
            return self.fetch([sid])[sid][0]
        s = int(self.table.shard[sid])
        off, n = int(self.table.offset[sid]), int(self.table.size[sid])
        with self._lock:
            mm = self._maps.get(s)
            if mm is None:
                mm = self._maps[s] = self._open(s)
                while len(self._maps) > self.max_open:
                    _release(self._maps.popitem(last=False)[1])
            else:
                self._maps.move_to_end(s)
            if off + n > len(mm):
                raise CorruptSample(f"member runs past the end of {self.table.urls[s]}")
            return memoryview(mm)[off:off + n]

    def _open(self, s: int) -> mmap.mmap:
        url = self.table.urls[s]
        try:
            with open(url, "rb") as f:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ShardError(f"shard {url}: cannot be read ({e})") from None

    def label(self, sid: int, raw: dict | None = None) -> int:
        return int(raw[sid][1]) if raw is not None else int(self.table.label[sid])

    def read_batch(self, ids: list[int], raw: dict | None) -> tuple[dict, np.ndarray, dict[int, str]]:
        """(bytes by id, (n, 2) sizes as width, height, why each unreadable id failed).

        An unreadable sample keeps a 1 x 1 size, so augmentation parameters can still be drawn."""
        if raw is None and self.table.ranged:
            raw = self.fetch(ids)  # one concurrent read for the batch
        data, bad = {}, {}
        sizes = np.ones((len(ids), 2), np.int64)
        for i, sid in enumerate(ids):
            try:
                data[sid] = self.bytes(sid, raw)
                sizes[i] = image_size(data[sid])
            except CorruptSample as e:
                bad[sid] = str(e)
        return data, sizes, bad


def _inode(path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _release(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a view is still in use: the map closes (and frees its descriptor) when the view dies
