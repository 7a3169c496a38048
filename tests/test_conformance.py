"""One contract, every backend: each registered backend runs through the same checks
(pipeline/contract.py). nvjpeg runs with torchvision's CPU decoder and the Triton kernel's
reference, dali in DALI's CPU-only mode, so all four run here and in CI."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import CLASS_COLOURS, assert_resumes_exactly, collect
from pipeline import BACKENDS, BatchLoader, LoaderStats, create_loader

DATA_BACKENDS = ["cpu", "nvjpeg", "dali"]
ALL_BACKENDS = DATA_BACKENDS + ["synthetic"]
TRAIN, VAL = 60, 18  # the colour dataset


def test_every_registered_backend_is_in_this_suite():
    assert sorted(BACKENDS) == sorted(ALL_BACKENDS)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")
    return request.param


@pytest.fixture(params=DATA_BACKENDS)
def data_backend(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")
    return request.param


def make(shards, backend, **kw):
    kw = {"batch_size": 8, "image_size": 24, "device": "cpu", "workers": 2, "seed": 3, **kw}
    return create_loader(shards, backend=backend, **kw)


def colour_of(images_u8: torch.Tensor) -> np.ndarray:
    """Nearest class colour of each (B, 3, H, W) uint8 image."""
    mean = images_u8.float().mean(dim=(2, 3)).numpy()
    table = np.array(CLASS_COLOURS, dtype=np.float32)
    return np.argmin(((mean[:, None, :] - table[None]) ** 2).sum(-1), axis=1)


def digests(batches) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for x, _ in batches for img in x]


def test_output_spec_and_contract(colour_shards, backend):
    loader = make(colour_shards, backend)
    assert isinstance(loader, BatchLoader) and isinstance(loader.stats, LoaderStats)
    assert len(loader) == TRAIN // 8 and loader.num_samples == TRAIN // 8 * 8 and loader.num_classes == 6
    batches = collect(loader)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (8,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 6
        # Normalized with ImageNet statistics: within (0 - mean) / std .. (1 - mean) / std.
        assert -2.2 < float(x.float().min()) and float(x.float().max()) < 2.7
    s = loader.stats
    assert (s.samples, s.batches, s.corrupt) == (TRAIN // 8 * 8, TRAIN // 8, 0)
    assert s.wait_s >= 0 and s.read_s >= 0 and s.copy_s >= 0 and (s.decode_s is None or s.decode_s >= 0)
    raw = collect(make(colour_shards, backend, normalize=False, channels_last=False, dtype=torch.float32))
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].is_contiguous()
    loader.close()
    loader.close()  # idempotent


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_belong_to_their_images(colour_shards, data_backend, split):
    seen = 0
    for x, y in make(colour_shards, data_backend, split=split, normalize=False):
        assert np.array_equal(colour_of(x), y.numpy())
        seen += len(y)
    assert seen == (TRAIN // 8 * 8 if split == "train" else VAL)


def test_epochs_interleaved_with_val_as_train_run_does(colour_shards, backend):
    """train epoch, val, train epoch, val, val again, ...: every pass complete, val identical."""
    train = make(colour_shards, backend, normalize=False)
    val = make(colour_shards, backend, split="val", normalize=False)
    assert len(val) == -(-VAL // 8) and val.num_samples == VAL
    first_val = None
    orders = []
    for epoch in range(3):
        train.set_epoch(epoch)
        got = collect(train)
        assert len(got) == len(train) == TRAIN // 8
        orders.append(torch.cat([y for _, y in got]))
        for _ in range(2 if epoch == 1 else 1):  # and val twice in a row once
            v = collect(val)
            assert sum(len(y) for _, y in v) == VAL
            if first_val is None:
                first_val = v
            assert digests(v) == digests(first_val)
            assert all(torch.equal(a[1], b[1]) for a, b in zip(v, first_val))
    assert train.stats.batches == 3 * (TRAIN // 8) and val.stats.samples == 4 * VAL
    if backend != "synthetic":
        assert not torch.equal(orders[0], orders[1])  # each epoch has its own order


def test_set_epoch_selects_the_epoch_whatever_came_before(colour_shards, data_backend):
    a = make(colour_shards, data_backend, normalize=False)
    a.set_epoch(2)
    direct = collect(a)
    b = make(colour_shards, data_backend, normalize=False)
    for e in range(3):
        b.set_epoch(e)
        got = collect(b, limit=2 if e < 2 else None)  # abandoned epochs on the way
    assert digests(got) == digests(direct)


def test_mid_epoch_resume_with_batches_in_flight(colour_shards, backend):
    def make_loader():
        loader = make(colour_shards, backend, normalize=False, prefetch=3)  # several batches decoding ahead
        loader.set_epoch(1)
        return loader

    state = assert_resumes_exactly(make_loader, 3, through_json=True)
    assert state["epoch"] == 1 and state["batch"] == 3
    with pytest.raises(ValueError, match="seed"):
        make(colour_shards, backend, seed=4).load_state_dict(state)


def test_state_after_a_finished_epoch_resumes_into_the_next(colour_shards, data_backend):
    a = make(colour_shards, data_backend, normalize=False)
    collect(a)
    state = a.state_dict()
    b = make(colour_shards, data_backend, normalize=False)
    b.load_state_dict(state)
    assert collect(b) == []  # nothing left of epoch 0
    b.set_epoch(1)
    a.set_epoch(1)
    assert digests(collect(b)) == digests(collect(a))


def test_two_ranks_equal_steps_and_val_exactly_once(colour_shards, backend):
    train = [make(colour_shards, backend, batch_size=7, rank=r, world_size=2, normalize=False) for r in range(2)]
    assert len(train[0]) == len(train[1]) == TRAIN // 2 // 7
    got = [collect(t) for t in train]
    assert [len(g) for g in got] == [len(train[0])] * 2
    val = [make(colour_shards, backend, split="val", batch_size=4, rank=r, world_size=2, normalize=False)
           for r in range(2)]
    assert len(val[0]) == len(val[1]) and val[0].num_samples + val[1].num_samples == VAL
    parts = [collect(v) for v in val]
    assert sum(len(y) for p in parts for _, y in p) == VAL
    if backend == "synthetic":
        return  # one resident batch: nothing more to tell apart
    single = collect(make(colour_shards, backend, split="val", batch_size=4, normalize=False))
    assert sorted(digests(parts[0]) + digests(parts[1])) == sorted(digests(single))
    labels = sorted(int(v) for p in parts for _, y in p for v in y)
    assert labels == sorted(k for k in range(6) for _ in range(3))
    a, b = (set(np.concatenate([np.asarray(i) for i in t.batch_sample_ids()]).tolist()) for t in train)
    assert not a & b  # disjoint train slices


def test_corrupt_sample_is_counted_replaced_and_the_batch_keeps_its_size(corrupt_shards, data_backend):
    path, bad = corrupt_shards
    loader = make(path, data_backend, batch_size=6, normalize=False, drop_last=False)
    got = collect(loader)
    assert [len(y) for _, y in got] == [6] * 10
    assert set(loader.stats.corrupt_keys) == bad and loader.stats.corrupt == len(bad)
    for x, y in got:
        assert np.array_equal(colour_of(x), y.numpy())  # a stand-in brings its own label
    cpu = collect(make(path, "cpu", batch_size=6, normalize=False, drop_last=False))
    for (_, y1), (_, y2) in zip(got, cpu):
        assert torch.equal(y1, y2)  # the same stand-ins in every backend


def test_state_is_plain_data(colour_shards, backend):
    loader = make(colour_shards, backend)
    next(iter(loader))
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
