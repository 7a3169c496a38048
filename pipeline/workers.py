"""Decode workers: processes (or threads) that fill shared host batch slots.

A task is (token, seq, slot, epoch, sample ids, raw bytes or None); a worker decodes the batch
straight into slot `slot` of the shared ring and answers (token, seq, slot, stats, error): every
task is answered exactly once, failed or not. Only ids and small results cross the process
boundary; pixels never do.

The main process never blocks on a dead worker: it waits on the result queue with a timeout
and checks every worker's exit code in between, so a worker killed by the OOM killer or a
segfault raises a clear error naming it instead of hanging. Nor does a worker outlive its
owner: when the owner dies, even by SIGKILL, its workers exit within moments (`_exit_with`).
"""
from __future__ import annotations

import ctypes
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback

import torch

from .decode import BatchDecoder


class WorkerError(RuntimeError):
    pass


def packed(slot, size: int):
    """A host slot (batch, S, S, 3), allocated once for the largest size S, as a contiguous
    (batch, size, size, 3) array over its first elements: a smaller epoch (progressive resizing)
    reuses the slot's memory, and its batch stays one block for the copy to the device. Works on
    numpy arrays and torch tensors alike."""
    if slot.shape[1] == size:
        return slot
    batch = slot.shape[0]
    return slot.reshape(-1)[:batch * size * size * 3].reshape(batch, size, size, 3)


def _serve(decoder: BatchDecoder, images: torch.Tensor, labels: torch.Tensor, tasks, results,
           fetch_ahead: int = 0) -> None:
    img_np, lab_np = images.numpy(), labels.numpy()
    if fetch_ahead > 0 and decoder.samples.table.ranged:
        _serve_ahead(decoder, img_np, lab_np, tasks, results, fetch_ahead)
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        _answer(decoder, img_np, lab_np, task, results)


def _answer(decoder: BatchDecoder, img_np, lab_np, task, results, fetched=None) -> None:
    """Decode one task's batch into its slot and answer it, failed or not. `fetched`: a future of
    its samples' bytes (`SampleReader.fetch`), already requested."""
    token, seq, slot, epoch, ids, raw = task
    try:
        wait_s = 0.0
        if fetched is not None:
            t0 = time.perf_counter()
            raw = fetched.result()
            wait_s = time.perf_counter() - t0
        out = packed(img_np[slot], decoder.size_at(epoch))
        stats = decoder.decode_batch(epoch, ids, out, lab_np[slot], raw)
        if fetched is not None:
            stats["read_s"] += wait_s  # the time the bytes kept the decoder waiting
        results.put((token, seq, slot, stats, None))
    except Exception as e:  # noqa: BLE001 - answered to the main process, which raises it
        results.put((token, seq, slot, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _serve_ahead(decoder: BatchDecoder, img_np, lab_np, tasks, results, ahead: int) -> None:
    """_serve for shards in object storage, hiding the requests' latency: while this worker decodes
    one batch, the range requests of up to `ahead` more batches it has taken are in flight. It takes
    a further task only when one is queued (never blocking while it holds one: the consumer may be
    waiting for that batch), so an idle worker still gets the next task first, and none after a
    batch whose shards are all mapped from the node-local cache (it needs no request)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    stopping = False
    with ThreadPoolExecutor(ahead, thread_name_prefix="range-fetch") as pool:
        while True:
            while not stopping and len(pending) <= ahead:
                try:
                    task = tasks.get(block=not pending)
                except queue.Empty:
                    break
                if task is None:
                    stopping = True
                    break
                raw = task[5]
                if raw is None and decoder.samples.mapped(task[4]):
                    # All its shards are in the node-local cache, mapped here: no request to hide. Take
                    # no more ahead, as a local copy's worker, so an idle worker gets the next batch.
                    pending.append((task, None))
                    break
                pending.append((task, None if raw is not None else pool.submit(decoder.samples.fetch, task[4])))
            if not pending:
                return
            task, fetched = pending.popleft()
            _answer(decoder, img_np, lab_np, task, results, fetched)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
OWNER_POLL_S = 0.5  # how often the watchdog checks an owner it cannot wait on


def _exit_with(owner: int, pdeathsig: bool) -> None:
    """Make this worker exit when `owner`, the process whose pool started it, dies, however it dies.

    A worker waits on the task queue forever: once its owner is SIGKILLed (a rank that torchrun's
    agent or the OOM killer ends) it would live on, reparented to init, and each elastic restart
    would leak a set of workers and their memory. On Linux the kernel kills a worker whose parent
    dies (PR_SET_PDEATHSIG; `pdeathsig` is False when the parent is a thread that may end before
    the owner does). That covers fork and spawn, not forkserver: there the parent is the fork
    server, which outlives the owner for as long as any worker holds its liveness pipe, so they
    would keep each other alive. A watchdog thread therefore also waits on the owner itself.
    """
    parent = os.getppid()
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if not process_alive(owner):
        os._exit(1)  # the owner died before the death signal was armed
    threading.Thread(target=_watch_owner, args=(owner, parent), name="owner-watchdog", daemon=True).start()


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _watch_owner(owner: int, parent: int) -> None:
    """Exit the process when the owner exits (a pidfd turns readable then, on Linux >= 5.3; a
    zombie owner counts as dead) or this worker is reparented. Polls where there is no pidfd."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(owner)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pidfd = None  # a kernel without pidfds: poll
    while True:
        if pidfd is not None:
            if select.select([pidfd], [], [], OWNER_POLL_S)[0]:
                os._exit(1)
        else:
            time.sleep(OWNER_POLL_S)
        if os.getppid() != parent or not process_alive(owner):
            os._exit(1)


def _process_main(decoder, images, labels, tasks, results, owner: int | None = None, pdeathsig: bool = False,
                  environ: dict[str, str] | None = None, fetch_ahead: int = 0) -> None:
    if owner is not None:
        _exit_with(owner, pdeathsig)
    if environ is not None:
        # A fork server was started with the environment of its first use; a worker must see its
        # owner's (the object store's endpoint and credential chain, say), as a forked one does.
        os.environ.clear()
        os.environ.update(environ)
    # Ctrl-C goes to the main process, which shuts the workers down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        _serve(decoder, images, labels, tasks, results, fetch_ahead)
    finally:
        decoder.close()  # this process's shard maps (threads share their owner's, who closes them)


class WorkerPool:
    def __init__(self, decoder: BatchDecoder, images: torch.Tensor, labels: torch.Tensor, workers: int,
                 mode: str = "process", start_method: str | None = None, fetch_ahead: int = 0):
        self.mode = mode
        self.workers = []
        if mode == "process":
            import torch.multiprocessing as mp

            ctx = mp.get_context(start_method or ("fork" if os.name == "posix" else "spawn"))
            if ctx.get_start_method() == "forkserver":
                # The server process imports what the workers need once; each worker forks from it.
                ctx.set_forkserver_preload(["pipeline.workers", "pipeline.decode", "kernels.resize"])
            # A Queue, not a SimpleQueue: a worker fetching ahead takes a task only if one is there.
            self.tasks, self.results = ctx.Queue(), ctx.Queue()
            # A forked or spawned worker's parent is this thread, and the kernel's parent-death
            # signal fires when that thread ends: arm it only when the thread lives as long as the
            # process. A fork server's workers are forked by its main thread.
            pdeathsig = ctx.get_start_method() == "forkserver" or threading.current_thread() is threading.main_thread()
            environ = dict(os.environ) if ctx.get_start_method() == "forkserver" else None
            for i in range(workers):
                p = ctx.Process(target=_process_main, args=(decoder, images, labels, self.tasks, self.results,
                                                            os.getpid(), pdeathsig, environ, fetch_ahead),
                                name=f"loader-worker-{i}", daemon=True)
                p.start()
                self.workers.append(p)
        elif mode == "thread":
            self.tasks, self.results = queue.SimpleQueue(), queue.SimpleQueue()
            for i in range(workers):
                # One decoder per thread (its own scratch buffer), one shared sample reader.
                t = threading.Thread(target=_serve, args=(decoder.for_thread(), images, labels, self.tasks,
                                                          self.results, fetch_ahead),
                                     name=f"loader-worker-{i}", daemon=True)
                t.start()
                self.workers.append(t)
        else:
            raise ValueError(f"worker mode {mode!r}: expected 'process' or 'thread'")

    def submit(self, task) -> None:
        self.check_alive()
        self.tasks.put(task)

    def get(self, poll_s: float = 1.0):
        """Next answer (token, seq, slot, stats, error); raises WorkerError if a worker died."""
        while True:
            self.check_alive()  # a dead worker is an error even if others could cover for it
            try:
                return self.results.get(timeout=poll_s)
            except queue.Empty:
                continue

    def alive(self) -> bool:
        try:
            self.check_alive()
            return True
        except WorkerError:
            return False

    def check_alive(self) -> None:
        for w in self.workers:
            code = getattr(w, "exitcode", None)
            if self.mode == "process" and code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise WorkerError(f"loader worker {w.name} (pid {w.pid}) {how}; the loader cannot continue")
            if self.mode == "thread" and not w.is_alive():
                raise WorkerError(f"loader worker {w.name} stopped unexpectedly")

    def close(self) -> None:
        for _ in self.workers:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
        for w in self.workers:
            w.join(timeout=5)
            if self.mode == "process" and w.is_alive():
                w.terminate()
        self.workers = []
