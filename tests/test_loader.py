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


def test_the_epoch_order_continues_across_world_sizes_in_the_plan():
    """Any number of world changes in an epoch, of any sizes, with or without drop_last: each
    world deals what is left of the epoch's permutation, and `plan.consumed` says where the next
    world starts. The ranks together always consume a prefix of the permutation, each sample at
    most once; only the last world's cut to equal ranks and drop_last remainder are left out."""
    from pipeline import plan

    rng = np.random.default_rng(0)
    for _ in range(400):
        n, batch, drop = int(rng.integers(1, 120)), int(rng.integers(1, 9)), bool(rng.integers(2))
        perm = plan.epoch_permutation(n, 5, 2)
        start, seen = 0, []
        for k, world in enumerate(rng.integers(1, 6, size=int(rng.integers(1, 5)))):
            world = int(world)
            ranks = [plan.train_batches_local(n, 5, 2, r, world, batch, drop, start=start) for r in range(world)]
            count = len(ranks[0])
            assert all(len(b) == count for b in ranks)
            if start == 0:
                assert all(np.array_equal(a, b) for r, bs in enumerate(ranks)  # start 0: today's plan
                           for a, b in zip(bs, plan.train_batches_local(n, 5, 2, r, world, batch, drop)))
            if start == n:
                assert count == 0
                continue
            run = int(rng.integers(0, count + 1))
            for bs in ranks:
                seen += [i for b in bs[:run] for i in b.tolist()]
            if run < count:
                assert start + run * world * batch == len(seen)  # every batch before a rank's last is full
            else:
                finisher = world
            assert plan.train_batch_count(n, world, batch, drop, start) == count
            start = plan.consumed(n, start, world, batch, run, count)
        if start < n:  # the epoch's end, on one more world
            finisher = 3
            seen += [i for r in range(3) for b in plan.train_batches_local(n, 5, 2, r, 3, batch, drop, start=start)
                     for i in b.tolist()]
        assert len(seen) == len(set(seen)), "a sample came twice"
        assert set(seen) == set(perm[:len(seen)].tolist())
        assert n - len(seen) < (finisher * batch if drop else finisher)  # the remainder, no more


def test_batch_counts_are_the_plans_lengths():
    from pipeline import plan

    rng = np.random.default_rng(1)
    for _ in range(50):
        sizes = rng.integers(1, 20, size=int(rng.integers(1, 9))).tolist()
        world, batch, drop, epoch = int(rng.integers(1, 5)), int(rng.integers(1, 6)), bool(rng.integers(2)), 3
        counts = {len(plan.train_batches_remote(sizes, 7, epoch, r, world, batch, 4, drop)[0]) for r in range(world)}
        assert counts == {plan.train_batch_count_remote(sizes, 7, epoch, world, batch, drop)}


def test_same_world_plans_from_a_later_start_are_the_rest_of_the_epoch():
    """Why a state resumed on its own world size may keep its position: dealing the permutation
    from the samples its first k batches consumed gives exactly batches k, k + 1, ..."""
    from pipeline import plan

    for n, world, batch, k in ((60, 2, 4, 3), (61, 3, 5, 1), (100, 4, 3, 7)):
        for r in range(world):
            whole = plan.train_batches_local(n, 9, 1, r, world, batch)
            rest = plan.train_batches_local(n, 9, 1, r, world, batch, start=k * world * batch)
            assert [b.tolist() for b in rest] == [b.tolist() for b in whole[k:]]


def test_a_version_2_state_still_loads(colour_shards):
    """States saved before world changes were possible (version 2: no offset) still resume, on
    their own world size and on another."""
    kw = dict(batch_size=4, image_size=16, device="cpu", workers=1, normalize=False, seed=3)
    two = create_loader(colour_shards, rank=1, world_size=2, **kw)
    collect(two, 2)
    old = {k: v for k, v in two.state_dict().items() if k != "offset"} | {"version": 2}
    same = create_loader(colour_shards, rank=0, world_size=2, **kw)
    same.load_state_dict(old)
    assert len(collect(same)) == 60 // 2 // 4 - 2
    one = create_loader(colour_shards, **kw)
    one.load_state_dict(old)
    assert len(one) == (60 - 2 * 2 * 4) // 4
    with pytest.raises(ValueError, match="loader state version 1"):
        one.load_state_dict(old | {"version": 1})


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
