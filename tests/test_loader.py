from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from conftest import CLASS_COLOURS, assert_resumes_exactly, collect
from convert.manifest import load_manifest
from pipeline import Loader, ShardError
from pipeline.workers import WorkerError


def colour_of(images_u8: torch.Tensor) -> np.ndarray:
    """Nearest class colour of each (B, 3, H, W) uint8 image."""
    mean = images_u8.float().mean(dim=(2, 3)).numpy()
    table = np.array(CLASS_COLOURS, dtype=np.float32)
    return np.argmin(((mean[:, None, :] - table[None]) ** 2).sum(-1), axis=1)


def test_shapes_dtypes_and_layout(colour_shards):
    loader = Loader(colour_shards, batch_size=8, image_size=32, device="cpu", workers=1)
    assert len(loader) == 60 // 8
    batches = collect(loader)
    assert len(batches) == len(loader)
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.device.type == "cpu"
    # Normalized with ImageNet statistics: a flat colour maps to (c/255 - mean)/std.
    assert -2.2 < float(x.float().min()) and float(x.float().max()) < 2.7
    raw = collect(Loader(colour_shards, batch_size=8, image_size=32, device="cpu", workers=1, normalize=False,
                         channels_last=False))
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].is_contiguous()
    f32 = collect(Loader(colour_shards, batch_size=8, image_size=32, device="cpu", workers=1, dtype=torch.float32))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expect = (raw[0][0].float() / 255 - mean) / std
    assert torch.allclose(f32[0][0], expect, atol=1e-5)


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_match_pixels(colour_shards, split):
    loader = Loader(colour_shards, split=split, batch_size=6, image_size=24, device="cpu", workers=2,
                    normalize=False)
    seen = 0
    for x, y in loader:
        assert np.array_equal(colour_of(x), y.numpy())
        seen += len(y)
    assert seen == (60 // 6 * 6 if split == "train" else 18)


def test_worker_count_and_mode_do_not_change_batches(colour_shards):
    kw = dict(batch_size=8, image_size=32, device="cpu", seed=3, normalize=False)
    ref = collect(Loader(colour_shards, workers=1, **kw))
    for workers, mode in ((2, "process"), (3, "thread")):
        got = collect(Loader(colour_shards, workers=workers, worker_mode=mode, **kw))
        assert len(got) == len(ref)
        for (a, la), (b, lb) in zip(ref, got):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_epochs_and_seeds_change_order_and_crops(colour_shards):
    kw = dict(batch_size=8, image_size=32, device="cpu", workers=1, normalize=False)
    loader = Loader(colour_shards, seed=1, **kw)
    e0 = collect(loader)
    loader.set_epoch(1)
    e1 = collect(loader)
    other = collect(Loader(colour_shards, seed=2, **kw))
    labels = lambda bs: torch.cat([y for _, y in bs])  # noqa: E731
    assert not torch.equal(labels(e0), labels(e1))
    assert not torch.equal(labels(e0), labels(other))
    # Same epoch again: identical.
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(e0, collect(loader)))


def test_exact_mid_epoch_resume(colour_shards):
    kw = dict(batch_size=6, image_size=32, device="cpu", workers=2, seed=11, normalize=False)

    def make():
        loader = Loader(colour_shards, **kw)
        loader.set_epoch(2)
        return loader

    state = assert_resumes_exactly(make, 4, through_json=True)  # the state survives a JSON round trip
    assert state["epoch"] == 2
    with pytest.raises(ValueError, match="seed"):
        Loader(colour_shards, **{**kw, "seed": 12}).load_state_dict(state)


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
    lens = [len(Loader(colour_shards, batch_size=7, image_size=16, device="cpu", workers=1, rank=r, world_size=2))
            for r in range(2)]
    assert lens[0] == lens[1] == 4


def _digest(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x]


def test_two_rank_val_sees_each_sample_exactly_once(colour_shards):
    kw = dict(split="val", batch_size=4, image_size=24, device="cpu", workers=1, normalize=False)
    single = collect(Loader(colour_shards, **kw))
    per_rank = [Loader(colour_shards, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert per_rank[0].num_samples + per_rank[1].num_samples == 18
    both = [collect(ld) for ld in per_rank]
    one = sorted(d for x, _ in single for d in _digest(x))
    two = sorted(d for r in both for x, _ in r for d in _digest(x))
    assert one == two and len(one) == 18
    # Top-1 from two ranks (summed counts) equals top-1 from one.
    correct = lambda bs: sum(int((torch.from_numpy(colour_of(x)) == y).sum()) for x, y in bs)  # noqa: E731
    assert correct(single) == correct(both[0]) + correct(both[1]) == 18
    from pipeline import plan

    for n, world, bs in ((18, 2, 4), (17, 3, 4), (5, 2, 8), (100, 4, 7)):
        got = [plan.val_batches(n, r, world, bs) for r in range(world)]
        ids = np.concatenate([b for r in got for b in r])
        assert sorted(ids.tolist()) == list(range(n))
        assert len({len(r) for r in got}) == 1
        assert all(len(b) <= bs for r in got for b in r)


def test_val_is_deterministic(colour_shards):
    kw = dict(split="val", batch_size=5, image_size=24, device="cpu", workers=2, normalize=False)
    a, b = collect(Loader(colour_shards, **kw)), collect(Loader(colour_shards, **kw, seed=99))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_missing_and_truncated_shards_are_named(colour_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(colour_shards, broken)
    name = load_manifest(broken)["splits"]["train"]["shards"][1]["name"]
    (broken / name).unlink()
    with pytest.raises(ShardError, match=f"{name} is missing"):
        Loader(broken, device="cpu", batch_size=4)
    shutil.copy(colour_shards / name, broken / name)
    with open(broken / name, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(ShardError, match=f"{name} is truncated"):
        Loader(broken, device="cpu", batch_size=4)
    with pytest.raises(ShardError, match="no such directory"):
        Loader(tmp_path / "nowhere", device="cpu")


def test_unknown_options_and_bad_rank_fail_clearly(colour_shards):
    with pytest.raises(TypeError, match="shuffle_bufer"):
        Loader(colour_shards, device="cpu", shuffle_bufer=3)
    with pytest.raises(ValueError, match="rank 2"):
        Loader(colour_shards, device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend 'nope'"):
        Loader(colour_shards, device="cpu", backend="nope")


def test_dead_worker_raises_instead_of_hanging(colour_shards):
    loader = Loader(colour_shards, batch_size=4, image_size=16, device="cpu", workers=2, prefetch=1)
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


def test_synthetic_backend_contract(colour_shards):
    loader = Loader(colour_shards, backend="synthetic", batch_size=8, image_size=32, device="cpu")
    assert len(loader) == 60 // 8
    batches = collect(loader)
    assert len(batches) == len(loader)
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    assert int(y.max()) < 6
    loader2 = Loader(None, backend="synthetic", batch_size=8, image_size=32, device="cpu")
    assert len(loader2) == 1_281_167 // 8


def test_damaged_index_is_named(colour_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(colour_shards, broken)
    name = load_manifest(broken)["splits"]["train"]["shards"][0]["index"]
    (broken / name).write_text("v1.2 3\njpg 1 2\n")
    with pytest.raises(ShardError, match=name):
        Loader(broken, device="cpu", batch_size=4)
