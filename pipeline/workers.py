"""Decode workers: processes (or threads) that fill shared host batch slots.

A task is (token, seq, slot, epoch, sample ids, raw bytes or None); a worker decodes the batch
straight into slot `slot` of the shared ring and answers (token, seq, slot, stats, error): every
task is answered exactly once, failed or not. Only ids and small results cross the process
boundary; pixels never do.

The main process never blocks on a dead worker: it waits on the result queue with a timeout
and checks every worker's exit code in between, so a worker killed by the OOM killer or a
segfault raises a clear error naming it instead of hanging.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import traceback

import torch

from .decode import BatchDecoder


class WorkerError(RuntimeError):
    pass


def _serve(decoder: BatchDecoder, images: torch.Tensor, labels: torch.Tensor, tasks, results) -> None:
    img_np, lab_np = images.numpy(), labels.numpy()
    while True:
        task = tasks.get()
        if task is None:
            break
        token, seq, slot, epoch, ids, raw = task
        try:
            stats = decoder.decode_batch(epoch, ids, img_np[slot], lab_np[slot], raw)
            results.put((token, seq, slot, stats, None))
        except Exception as e:  # noqa: BLE001 - answered to the main process, which raises it
            results.put((token, seq, slot, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _process_main(decoder, images, labels, tasks, results) -> None:
    # Ctrl-C goes to the main process, which shuts the workers down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        _serve(decoder, images, labels, tasks, results)
    finally:
        decoder.close()  # this process's shard maps (threads share their owner's, who closes them)


class WorkerPool:
    def __init__(self, decoder: BatchDecoder, images: torch.Tensor, labels: torch.Tensor, workers: int,
                 mode: str = "process", start_method: str | None = None):
        self.mode = mode
        self.workers = []
        if mode == "process":
            import torch.multiprocessing as mp

            ctx = mp.get_context(start_method or ("fork" if os.name == "posix" else "spawn"))
            if ctx.get_start_method() == "forkserver":
                # The server process imports what the workers need once; each worker forks from it.
                ctx.set_forkserver_preload(["pipeline.workers", "pipeline.decode", "kernels.resize"])
            self.tasks, self.results = ctx.SimpleQueue(), ctx.Queue()
            for i in range(workers):
                p = ctx.Process(target=_process_main, args=(decoder, images, labels, self.tasks, self.results),
                                name=f"loader-worker-{i}", daemon=True)
                p.start()
                self.workers.append(p)
        elif mode == "thread":
            self.tasks, self.results = queue.SimpleQueue(), queue.SimpleQueue()
            for i in range(workers):
                # One decoder per thread (its own scratch buffer), one shared sample reader.
                t = threading.Thread(target=_serve, args=(decoder.for_thread(), images, labels, self.tasks,
                                                          self.results),
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
