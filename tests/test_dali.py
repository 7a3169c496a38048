"""What only the dali backend has (the shared contract is in test_conformance, its pixels in
test_geometry): its missing-package message, and recovery after DALI fails a batch."""
from __future__ import annotations

import pytest
import torch

from conftest import collect, rewrite_shard
from pipeline import create_loader


def test_dali_missing_package_message(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from pipeline.dali import import_dali

    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        import_dali()
    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        create_loader(None, backend="dali", device="cpu")


def test_a_batch_dali_fails_is_rebuilt_with_stand_ins_and_a_real_error_raises(colour_shards, tmp_path,
                                                                              monkeypatch):
    pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")
    import shutil

    path = tmp_path / "cut"
    shutil.copytree(colour_shards, path)

    def scan_cut_short(members: dict) -> dict:  # header intact: the host reads it, DALI fails the batch
        jpg = members["jpg"]
        return {**members, "jpg": jpg[:jpg.index(b"\xff\xda") + 20]}

    key = rewrite_shard(path, "train", 1, 0, scan_cut_short)
    kw = dict(backend="dali", batch_size=6, image_size=16, device="cpu", workers=2, normalize=False, seed=2)
    loader = create_loader(path, **kw)
    for epoch in range(2):  # the second epoch replaces the known-bad sample before DALI sees it
        loader.set_epoch(epoch)
        got = collect(loader)
        assert [len(y) for _, y in got] == [6] * 10
        assert loader.stats.corrupt_keys == [key] and loader.stats.corrupt == epoch + 1
        cpu = create_loader(path, **{**kw, "backend": "cpu"})
        cpu.set_epoch(epoch)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(got, collect(cpu)))  # the same stand-in

    # A DALI failure with no damaged sample behind it is not the data's: it raises.
    from pipeline import dali

    broken = create_loader(colour_shards, **kw)
    real = dali.DaliLoader._build

    def failing_build(self):
        pipe = real(self)
        pipe.outputs = lambda: (_ for _ in ()).throw(RuntimeError("Critical error in pipeline: device fault"))
        return pipe

    monkeypatch.setattr(dali.DaliLoader, "_build", failing_build)
    with pytest.raises(RuntimeError, match="device fault"):
        collect(broken)
    assert broken.stats.corrupt == 0


def test_a_forked_child_never_finalizes_its_parents_dali_pipeline(colour_shards):
    """A child forked while a DALI loader lives (a ProcessPoolExecutor's worker, a fork-started
    process) has the pipeline's memory but not its threads: closing or collecting the loader there
    must leave DALI alone. Its shutdown there crashed such a child (a convert.synthetic worker,
    forked after a test had dropped a DALI loader without closing it)."""
    pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")
    import gc
    import os
    import signal
    import time

    loader = create_loader(colour_shards, backend="dali", batch_size=6, image_size=16, device="cpu", workers=1,
                           normalize=False, seed=2)
    it = iter(loader)
    next(it)  # the pipeline is built and its threads run
    pid = os.fork()
    if pid == 0:  # the child: what a garbage collection there does to the loader
        code = 1
        try:
            del it, loader
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid, "the child hung closing its parent's DALI loader"
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the child crashed closing its parent's DALI loader"
    loader.close()
    assert len(collect(create_loader(colour_shards, backend="dali", batch_size=6, image_size=16, device="cpu",
                                     workers=1, normalize=False, seed=2))) == 10  # the parent's DALI still works
