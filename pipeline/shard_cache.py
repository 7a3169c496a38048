"""A node-local cache of whole shards from object storage, shared by every rank and worker on a node.

A shard is downloaded once per node, to a temporary name in the cache folder, checked against the
manifest's size and sha256 (size only where the manifest records no sha256), and renamed into place;
only then is a stamp written beside it, which records what was verified (size, sha256, the file's
inode and mtime). A reader trusts a cached file only when its stamp matches the file as it is now:
a partial download never has the final name, and a file changed after its check (truncated,
overwritten, replaced) or never checked (a process killed between the rename and the stamp) is
checked again, deleted if wrong, and fetched again; it is never decoded. A bit flipped in place
without changing size, inode or mtime is not detected.

One process downloads a shard at a time: each shard has a lock file, held with fcntl.flock while it
is fetched, checked or evicted. The kernel drops a lock when its holder dies, even by SIGKILL, so a
dead process's claim never blocks anyone; the `.partial` file it leaves is overwritten by the next
download and swept when the cache opens.

The cache is bounded by `limit` bytes of shards: to make room, least recently used shards (their
access time, set on every use) are evicted, but never one the caller says it still needs. A shard
that cannot be made room for is not cached (its samples are read by range requests). Downloads in
flight may pass the limit by their size.

The cache deletes only files it created: names of its own pattern (`shard-<hash>.tar`, `.ok`,
`.lock`, `.shard-<hash>.tar.partial`) inside its folder. A failed download (network, permission,
throttling, a full disk) is logged and leaves the cache as it was: it is never taken for damage.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from . import objstore
from .shard_format import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

PREFIX = "shard-"
# Every name the cache creates, and so the only names it ever deletes.
OWN_NAME = re.compile(r"^\.?shard-[0-9a-f]{24}\.(tar|ok|lock|tar\.partial|ok\.partial|reserve)$")
DIR_LOCK = "cache.lock"  # held while room is made, so two processes do not both evict for one slot


# What `ShardCache.fill` did.
CACHED, BUSY, NO_ROOM, FAILED = "cached", "busy", "no room", "failed"


class ShardMismatch(ValueError):
    """A download, or a cached file, that is not the shard the manifest describes."""


def parse_size(text) -> int | None:
    """Bytes from `text`: an int, or a number with a unit (`500M`, `1.5G`, `2T`, `200GiB`); `None`,
    "" or "0": no limit. ValueError names a bad one."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text) or None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cache size {text!r}: expected bytes or a number with K, M, G or T")
    n = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(n) or None


class ShardCache:
    """The cached copies of a table's shards: `urls[s]`, of `sizes[s]` bytes and sha256 `sha256s[s]`
    (None: not recorded), in folder `root`, at most `limit` bytes (None: no bound). Picklable: a
    worker process opens the same folder."""

    def __init__(self, root: str | os.PathLike, limit: int | None, urls: list[str], sizes, sha256s=None,
                 wait: bool = False):
        self.root = Path(root)
        self.limit = limit
        self.wait = wait  # a reader of a shard not yet cached waits for it (else: range requests)
        self._filler: CacheFiller | None = None
        self.urls = list(urls)
        self.sizes = [int(n) for n in sizes]
        self.sha256s = list(sha256s) if sha256s is not None else [None] * len(self.urls)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cache folder {self.root}: cannot be created ({e.strerror})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"cache folder {self.root}: not writable")
        if not all(self.sha256s):
            log.warning("cache %s: the manifest records no sha256 for some shards; they are checked by size only",
                        self.root)
        self._sweep_partials()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_filler"] = None  # the filler's threads stay in the loader's process
        return state

    def follow(self, batch_shards, position=None) -> None:
        """Fill the cache from background threads with the shards a plan reads (`batch_shards[j]`:
        batch j's), in the order of their first need, replacing any earlier fill (see CacheFiller)."""
        self.stop()
        self._filler = CacheFiller(self, batch_shards, position)

    def stop(self) -> None:
        """Stop filling (a download under way finishes; none starts)."""
        if self._filler is not None:
            self._filler.stop()
            self._filler = None

    # -- names ------------------------------------------------------------------------------------
    def name(self, s: int) -> str:
        """The cached file's name: a hash of the shard's URL (two datasets never share one)."""
        return PREFIX + hashlib.sha256(self.urls[s].encode()).hexdigest()[:24] + ".tar"

    def path(self, s: int) -> Path:
        return self.root / self.name(s)

    def _stamp(self, s: int) -> Path:
        return self.root / (self.name(s)[:-4] + ".ok")

    def _lock_path(self, s: int) -> Path:
        return self.root / (self.name(s)[:-4] + ".lock")

    # -- reading ----------------------------------------------------------------------------------
    def local(self, s: int) -> Path | None:
        """The cached copy of shard `s` if it is there and verified as it is now, else None. A copy
        whose stamp does not match (changed since its check, or never checked) is checked now (and
        deleted if wrong) unless another process holds it, in which case this says None."""
        path = self.path(s)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if self._stamp_matches(s, st):
            return path
        with self._locked(s, block=False) as held:
            if held:
                return path if self._verify_in_place(s) else None
        return None

    def touch(self, s: int) -> None:
        """Mark shard `s` used now (its access time orders eviction); its mtime is left alone."""
        path = self.path(s)
        try:
            st = path.stat()
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except OSError:
            pass  # evicted meanwhile: nothing to mark

    def used_bytes(self) -> int:
        """Bytes of cached shards (complete files) in the folder, this table's or not."""
        total = 0
        for entry in self._own_entries():
            if entry.name.endswith(".tar") and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    # -- filling ----------------------------------------------------------------------------------
    def ensure(self, s: int, keep=None, block: bool = False) -> bool:
        """Make shard `s` cached: download it unless it is there and verified. Returns whether it
        is cached now. Another process downloading it: False at once, or, with `block`, wait for it.
        To make room, evicts least recently used shards, but none of `keep` (shard ids of this
        table; None: evicts nothing); without room, it does not download. A failed download is
        logged, never raised."""
        return self.fill(s, keep, block) == CACHED

    def fill(self, s: int, keep=None, block: bool = False) -> str:
        """`ensure`, saying what happened: CACHED, BUSY (another process holds the shard), NO_ROOM
        or FAILED (the download failed, or the shard is not the manifest's)."""
        if self._stamp_matches(s):
            self.touch(s)
            return CACHED
        with self._locked(s, block=block) as held:
            if not held:
                return BUSY
            if self.path(s).exists() and self._verify_in_place(s):
                self.touch(s)
                return CACHED
            if not self._make_room(s, keep):
                return NO_ROOM
            try:
                objstore.get_file(self.urls[s], self.path(s), check=lambda tmp: self._check(s, tmp, fsync=True))
            except (objstore.ObjectStoreError, OSError) as e:
                # The bucket holds the record: a fetch that failed changes nothing here.
                log.warning("cache: shard %s not cached (%s); its samples are read by range requests",
                            self.urls[s], objstore.describe(e))
                return FAILED
            finally:
                # Under the folder's lock: a room count lists the folder and then reads the
                # reservations, and this download's file may have landed after the listing.
                with self._dir_lock(), contextlib.suppress(FileNotFoundError):
                    self._reservation(s).unlink()
            self._write_stamp(s)
            return CACHED

    # -- checks -----------------------------------------------------------------------------------
    def _check(self, s: int, path, fsync: bool = False) -> None:
        """ShardMismatch unless the file at `path` has shard `s`'s size and sha256."""
        have = os.path.getsize(path)
        if have != self.sizes[s]:
            raise ShardMismatch(f"{self.urls[s]}: {have} bytes, the manifest says {self.sizes[s]}")
        want = self.sha256s[s]
        if want and sha256_file(path) != want:
            raise ShardMismatch(f"{self.urls[s]}: its sha256 differs from the manifest's")
        if fsync:  # the bytes reach the disk before the name does
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _verify_in_place(self, s: int) -> bool:
        """(Lock held.) Check the file under the final name; stamp it if right, delete it if wrong."""
        path = self.path(s)
        try:
            self._check(s, path)
        except FileNotFoundError:
            return False
        except ShardMismatch as e:
            log.warning("cache: %s is damaged (%s); deleted, it is fetched again", path, e)
            self._delete(s)
            return False
        self._write_stamp(s)
        return True

    def _stamp_matches(self, s: int, st: os.stat_result | None = None) -> bool:
        try:
            st = st or self.path(s).stat()
            stamp = json.loads(self._stamp(s).read_bytes())
        except (OSError, ValueError):
            return False
        return stamp == self._stamp_of(s, st)

    def _stamp_of(self, s: int, st: os.stat_result) -> dict:
        return {"url": self.urls[s], "bytes": self.sizes[s], "sha256": self.sha256s[s], "size": st.st_size,
                "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}

    def _write_stamp(self, s: int) -> None:
        atomic_write_bytes(self._stamp(s), json.dumps(self._stamp_of(s, self.path(s).stat())).encode())

    # -- room -------------------------------------------------------------------------------------
    def _reservation(self, s: int) -> Path:
        return self.root / ("." + self.name(s)[:-4] + ".reserve")

    def _make_room(self, s: int, keep) -> bool:
        """(Shard `s`'s lock held.) Evict least recently used shards (never those of `keep`) until
        shard `s` fits beside the cached ones and the downloads in flight; then reserve its room
        (a file naming its size, deleted when its download ends)."""
        if self.limit is None:
            return True
        need = self.sizes[s]
        if need > self.limit:
            return False
        kept = None if keep is None else {self.name(k) for k in keep}
        with self._dir_lock():
            entries, reserved = [], 0
            for entry in self._own_entries():
                if entry.name.endswith(".tar") and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        entries.append((st.st_atime_ns, entry.name, st.st_size))
                elif entry.name.endswith(".reserve"):
                    reserved += self._reserved(entry.name)
            used = sum(e[2] for e in entries) + reserved
            for _, name, size in sorted(entries):
                if used + need <= self.limit:
                    break
                if kept is None or name in kept or not self._evict(name):
                    continue
                used -= size
            if used + need > self.limit:
                return False
            self._reservation(s).write_text(str(need))
            return True

    def _reserved(self, name: str) -> int:
        """The bytes a reservation holds while its download runs (its shard's lock is held); a dead
        process's is deleted."""
        lock = self.root / (name[1:-len(".reserve")] + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return int((self.root / name).read_text() or 0)
                except (OSError, ValueError):
                    return 0
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)  # its downloader died
            return 0
        finally:
            os.close(fd)

    def _evict(self, name: str) -> bool:
        """Delete a cached shard of this folder unless another process holds its lock."""
        lock = self.root / (name[:-4] + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            for victim in (name[:-4] + ".ok", name):  # the stamp first: a tar without one is rechecked
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / victim)
            log.info("cache: evicted %s", name)
            return True
        finally:
            os.close(fd)

    def _delete(self, s: int) -> None:
        for p in (self._stamp(s), self.path(s)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- locks and housekeeping -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, s: int, block: bool):
        """Hold shard `s`'s lock; yields whether it is held (False: another process has it)."""
        fd = os.open(self._lock_path(s), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    @contextlib.contextmanager
    def _dir_lock(self):
        fd = os.open(self.root / DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _own_entries(self):
        try:
            with os.scandir(self.root) as it:
                return [e for e in it if OWN_NAME.match(e.name)]
        except FileNotFoundError:
            return []

    def _sweep_partials(self) -> None:
        """Delete downloads left by a process that died mid-way (their lock is free)."""
        for entry in self._own_entries():
            if not entry.name.endswith(".tar.partial"):
                continue
            lock = self.root / (entry.name[1:-len(".tar.partial")] + ".lock")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being downloaded now
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            finally:
                os.close(fd)


class CacheFiller:
    """Downloads the shards a plan reads into a cache, in the order of their first need, `threads`
    at a time, from this process. `batch_shards[j]` holds the shards batch j (counted from the
    iteration's start) reads; `position()`, the batches the loader has yielded so far.

    Under a limit, shard s (needed from batch f to batch l) may take the room of a cached shard only
    if that one is not needed again before batch l: a full permutation, which needs every shard
    in every stretch, then fills the cache once and holds it (no thrashing: the rest is read by
    range), while a block shuffle's next block replaces the blocks done with. A shard that finds no
    room waits until the plan has moved on, or is dropped once the plan has passed it."""

    POLL_S = 0.02

    def __init__(self, cache: ShardCache, batch_shards, position=None, threads: int = 4):
        self.needs = need_batches(batch_shards)
        self.order = list(self.needs)
        self.cache = cache
        self.position = position or (lambda: 0)
        self._next = iter(self.order)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, name=f"shard-cache-{i}", daemon=True)
                        for i in range(min(threads, len(self.order)))]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                s = next(self._next, None)
            if s is None:
                return
            while not self._stopped.is_set():
                pos = self.position()
                last = int(self.needs[s][-1])
                if last < pos:
                    break  # the plan has passed it
                # Without a limit nothing is evicted: skip working out what the plan still needs.
                keep = self.needed_by(pos, last) if self.cache.limit is not None else None
                if self.cache.fill(s, keep=keep) != NO_ROOM:
                    break
                self._stopped.wait(self.POLL_S)

    def needed_by(self, pos: int, last: int) -> set[int]:
        """The shards the plan reads in batches pos..last."""
        keep = set()
        for t, batches in self.needs.items():
            k = int(np.searchsorted(batches, pos))
            if k < len(batches) and batches[k] <= last:
                keep.add(t)
        return keep

    def stop(self) -> None:
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> None:
        """Until every thread has finished (tests and benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def need_batches(batch_shards) -> dict[int, np.ndarray]:
    """{shard: the batches that read it, ascending} of a plan (`batch_shards[j]`: the shards batch j
    reads), in the order of first need."""
    needs: dict[int, list[int]] = {}
    for j, shards in enumerate(batch_shards):
        for s in dict.fromkeys(np.asarray(shards).tolist()):
            needs.setdefault(s, []).append(j)
    return {s: np.asarray(b, np.int64) for s, b in needs.items()}
