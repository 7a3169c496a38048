"""The dali backend in DALI's CPU-only mode: the same pipeline definition the GPU runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Loader

pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")

from conftest import assert_resumes_exactly, collect  # noqa: E402
from test_loader import colour_of  # noqa: E402


def test_dali_cpu_shapes_and_labels(colour_shards):
    loader = Loader(colour_shards, backend="dali", batch_size=8, image_size=32, device="cpu", workers=2,
                    normalize=False)
    assert len(loader) == 60 // 8
    batches = collect(loader)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8
        assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
        assert np.array_equal(colour_of(x), y.numpy())  # labels belong to their images
    norm = next(iter(Loader(colour_shards, backend="dali", batch_size=8, image_size=32, device="cpu", workers=1)))[0]
    assert norm.dtype == torch.bfloat16 and -2.2 < float(norm.float().min()) < float(norm.float().max()) < 2.7


def test_dali_two_ranks_equal_steps_and_val_exactly_once(colour_shards):
    train = [Loader(colour_shards, backend="dali", batch_size=7, image_size=16, device="cpu", workers=1, rank=r,
                    world_size=2) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 30 // 7
    assert [len(collect(t)) for t in train] == [4, 4]
    for epoch in range(2):  # and again next epoch
        for t in train:
            t.set_epoch(epoch)
        assert [len(collect(t)) for t in train] == [4, 4]
    val = [Loader(colour_shards, backend="dali", split="val", batch_size=4, image_size=16, device="cpu", workers=1,
                  rank=r, world_size=2, normalize=False) for r in range(2)]
    assert len(val[0]) == len(val[1])
    got = [collect(v) for v in val]
    labels = sorted(int(v) for g in got for _, y in g for v in y)
    assert labels == sorted([k for k in range(6) for _ in range(3)])  # 18 samples, once each
    for g in got:
        for x, y in g:
            assert np.array_equal(colour_of(x), y.numpy())


def test_dali_state_dict_resumes(colour_shards):
    kw = dict(backend="dali", batch_size=6, image_size=16, device="cpu", workers=1, normalize=False, seed=3)
    state = assert_resumes_exactly(lambda: Loader(colour_shards, **kw), 3)
    assert isinstance(state["dali_checkpoint"], (str, bytes))


def test_dali_missing_package_message(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from pipeline.dali import _import_dali

    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        _import_dali()
