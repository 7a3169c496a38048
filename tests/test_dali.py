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
