"""The cpu backend and the epoch plan (what every backend shares is in test_conformance)."""
from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from conftest import collect
from pipeline import ShardError, create_loader
from pipeline.shard_format import load_manifest
from pipeline.workers import WorkerError


def test_worker_count_and_mode_do_not_change_batches(colour_shards):
    kw = dict(batch_size=8, image_size=32, device="cpu", seed=3, normalize=False)
    ref = collect(create_loader(colour_shards, workers=1, **kw))
    for workers, mode in ((2, "process"), (3, "thread")):
        got = collect(create_loader(colour_shards, workers=workers, worker_mode=mode, **kw))
        assert len(got) == len(ref)
        for (a, la), (b, lb) in zip(ref, got):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_epochs_and_seeds_change_the_order(colour_shards):
    # (That crops change with the epoch and seed is checked in test_geometry.)
    kw = dict(batch_size=8, image_size=32, device="cpu", workers=1, normalize=False)
    loader = create_loader(colour_shards, seed=1, **kw)
    e0 = collect(loader)
    loader.set_epoch(1)
    e1 = collect(loader)
    other = collect(create_loader(colour_shards, seed=2, **kw))
    labels = lambda bs: torch.cat([y for _, y in bs])  # noqa: E731
    assert not torch.equal(labels(e0), labels(e1))
    assert not torch.equal(labels(e0), labels(other))
    # Same epoch again: identical.
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(e0, collect(loader)))


def test_two_rank_train_slices_are_disjoint_and_equal(colour_shards):
    from pipeline import plan

    n = 60
    for epoch in range(3):
        r0 = plan.train_batches_local(n, 49, epoch, 0, 2, 7)
        r1 = plan.train_batches_local(n, 49, epoch, 1, 2, 7)
        assert len(r0) == len(r1) == 30 // 7
        a, b = np.concatenate(r0), np.concatenate(r1)
        assert not set(a) & set(b)
    # And uneven world sizes still give equal counts on every rank.
    counts = {len(plan.train_batches_local(61, 49, 0, r, 3, 4)) for r in range(3)}
    assert counts == {61 // 3 // 4}
    lens = [len(create_loader(colour_shards, batch_size=7, image_size=16, device="cpu", workers=1, rank=r,
                              world_size=2)) for r in range(2)]
    assert lens[0] == lens[1] == 4


def test_val_batches_split_every_sample_once_in_equal_steps():
    from pipeline import plan

    for n, world, bs in ((18, 2, 4), (17, 3, 4), (5, 2, 8), (100, 4, 7)):
        got = [plan.val_batches(n, r, world, bs) for r in range(world)]
        ids = np.concatenate([b for r in got for b in r])
        assert sorted(ids.tolist()) == list(range(n))
        assert len({len(r) for r in got}) == 1
        assert all(len(b) <= bs for r in got for b in r)


def test_val_is_deterministic(colour_shards):
    kw = dict(split="val", batch_size=5, image_size=24, device="cpu", workers=2, normalize=False)
    a, b = collect(create_loader(colour_shards, **kw)), collect(create_loader(colour_shards, **kw, seed=99))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_missing_and_truncated_shards_are_named(colour_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(colour_shards, broken)
    name = load_manifest(broken)["splits"]["train"]["shards"][1]["name"]
    (broken / name).unlink()
    with pytest.raises(ShardError, match=f"{name} is missing"):
        create_loader(broken, device="cpu", batch_size=4)
    shutil.copy(colour_shards / name, broken / name)
    with open(broken / name, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(ShardError, match=f"{name} is truncated"):
        create_loader(broken, device="cpu", batch_size=4)
    with pytest.raises(ShardError, match="no such directory"):
        create_loader(tmp_path / "nowhere", device="cpu")


def test_unknown_options_and_bad_rank_fail_clearly(colour_shards):
    with pytest.raises(TypeError, match="shuffle_bufer"):
        create_loader(colour_shards, device="cpu", shuffle_bufer=3)
    with pytest.raises(ValueError, match="rank 2"):
        create_loader(colour_shards, device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend 'nope'"):
        create_loader(colour_shards, device="cpu", backend="nope")


def test_dead_worker_raises_instead_of_hanging(colour_shards):
    loader = create_loader(colour_shards, batch_size=4, image_size=16, device="cpu", workers=2, prefetch=1)
    it = iter(loader)
    next(it)
    victim = loader._pool.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    t = time.time()
    with pytest.raises(WorkerError, match="killed by signal 9"):
        for _ in it:
            pass
    assert time.time() - t < 30
    loader.close()


def test_synthetic_backend_without_shards_is_imagenet_sized():
    loader = create_loader(None, backend="synthetic", batch_size=8, image_size=32, device="cpu")
    assert len(loader) == 1_281_167 // 8 and loader.num_classes == 1000


def test_damaged_index_is_named(colour_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(colour_shards, broken)
    name = load_manifest(broken)["splits"]["train"]["shards"][0]["index"]
    (broken / name).write_text("v1.2 3\njpg 1 2\n")
    with pytest.raises(ShardError, match=name):
        create_loader(broken, device="cpu", batch_size=4)


def test_uint8_batches_on_the_cpu_are_fresh_channels_last_tensors(colour_shards):
    """Uint8 batches are a copy of the host slot, not a view of it: a batch held while the loader
    goes on (its slot reused by later batches) keeps its pixels."""
    loader = create_loader(colour_shards, batch_size=8, image_size=24, device="cpu", workers=2, normalize=False,
                           prefetch=1)
    held, copies = [], []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape == (8, 3, 24, 24)
        assert x.is_contiguous(memory_format=torch.channels_last)
        held.append(x)
        copies.append(x.clone())
    assert len(held) > loader.slots  # every slot was reused while the first batches were held
    assert all(torch.equal(a, b) for a, b in zip(held, copies))
    assert len({x.data_ptr() for x in held}) == len(held)
    loader.close()
