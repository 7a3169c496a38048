"""One contract, every backend, both datasets: each registered backend runs through the same
checks (pipeline/contract.py) on an ImageNet-like dataset (JPEGs of many sizes, RandomResizedCrop)
and a CIFAR-10-format one (32 x 32 PNGs, padded RandomCrop, val split "test"). nvjpeg runs with
torchvision's CPU decoder and the Triton kernel's reference, dali in DALI's CPU-only mode, so all
of them run here and in CI. The resident backend only crops, so it takes the CIFAR dataset and
refuses the ImageNet one (tested below). A copy of each dataset in a bucket (moto's S3 server on
loopback), read by range requests ("-s3" in a test id), or through a node-local shard cache
("-s3cache"), must give every backend the batches of the local copy, resume exactly and replace
damaged samples alike."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import CLASS_COLOURS, assert_resumes_exactly, collect, new_bucket, rewrite_shard, upload_folder
from pipeline import BACKENDS, BatchLoader, LoaderStats, ResolutionSchedule, create_loader
from pipeline.shard_format import load_manifest

DATA_BACKENDS = ["cpu", "nvjpeg", "dali", "resident"]
ALL_BACKENDS = DATA_BACKENDS + ["synthetic"]
TRAIN, VAL = 60, 18  # both datasets: 6 colour classes, 10 train and 3 val images each


class Dataset:
    """One of the two datasets, with the loader options its recipe uses."""

    def __init__(self, name: str, local, shards=None, source: str = "local"):
        # `local`: the converted folder; `shards`: what the loaders read (it, or its bucket copy)
        self.name, self.local, self.shards, self.source = name, local, shards or local, source
        cifar = name == "cifar"
        self.val = "test" if cifar else "val"
        self.options = {"crop": "padded", "image_size": 32} if cifar else {"image_size": 24}
        self.size = self.options["image_size"]
        self.classes = 10 if cifar else 6  # CIFAR-10's names, six of them used


def combos(backends, sources=("local",)):
    """(backend, dataset) pairs; a dataset read from the bucket copy is named "<dataset>-s3"."""
    named = lambda d, src: d if src == "local" else f"{d}-{src}"  # noqa: E731
    return [pytest.param(b, named(d, src), id=f"{b}-{named(d, src)}") for src in sources for b in backends
            for d in ("imagenet", "cifar") if not (b == "resident" and d == "imagenet")]


BOTH = ("local", "s3")
CACHED = ("local", "s3", "s3cache")  # s3cache: the bucket copy through a node-local shard cache


@pytest.fixture
def ds(request, colour_shards, cifar_shards) -> Dataset:
    name, _, source = request.node.callspec.params["dataset"].partition("-")
    local = colour_shards if name == "imagenet" else cifar_shards
    if source in ("s3", "s3cache"):  # the server starts only for tests that read from it
        request.getfixturevalue("s3_env")
        d = Dataset(name, local, request.getfixturevalue(f"s3_{'colour' if name == 'imagenet' else 'cifar'}_shards"),
                    source)
        if source == "s3cache":
            d.options["cache_dir"] = str(request.getfixturevalue("tmp_path") / "shard-cache")
        return d
    return Dataset(name, local)


def _needs(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")


def test_every_registered_backend_is_in_this_suite():
    assert sorted(BACKENDS) == sorted(ALL_BACKENDS)


def make(ds: Dataset, backend: str, shards=None, split: str = "train", **kw):
    _needs(backend)
    kw = {"batch_size": 8, "device": "cpu", "workers": 2, "seed": 3, **ds.options, **kw}
    return create_loader(shards or ds.shards, split=ds.val if split == "val" else split, backend=backend, **kw)


def colour_of(images_u8: torch.Tensor) -> np.ndarray:
    """Nearest class colour of each (B, 3, H, W) uint8 image, ignoring a padded crop's zeros."""
    x = images_u8.float()
    inside = (x.sum(1, keepdim=True) > 0).float()
    mean = ((x * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3)).clamp(min=1)).numpy()
    table = np.array(CLASS_COLOURS, dtype=np.float32)
    return np.argmin(((mean[:, None, :] - table[None]) ** 2).sum(-1), axis=1)


def digests(batches) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for x, _ in batches for img in x]


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_output_spec_and_contract(ds, backend, dataset):
    loader = make(ds, backend)
    assert isinstance(loader, BatchLoader) and isinstance(loader.stats, LoaderStats)
    assert len(loader) == TRAIN // 8 and loader.num_samples == TRAIN // 8 * 8 and loader.num_classes == ds.classes
    batches = collect(loader)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (8, 3, ds.size, ds.size) and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (8,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < ds.classes
        # Normalized with ImageNet statistics: within (0 - mean) / std .. (1 - mean) / std.
        assert -2.2 < float(x.float().min()) and float(x.float().max()) < 2.7
    s = loader.stats
    assert (s.samples, s.batches, s.corrupt) == (TRAIN // 8 * 8, TRAIN // 8, 0)
    assert s.wait_s >= 0 and s.read_s >= 0 and s.copy_s >= 0 and (s.decode_s is None or s.decode_s >= 0)
    raw = collect(make(ds, backend, normalize=False, channels_last=False))
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].is_contiguous()
    f32 = collect(make(ds, backend, dtype=torch.float32))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # (x / 255 - mean) / std, up to one uint8 level (nvjpeg normalizes before rounding to uint8).
    assert torch.allclose(f32[0][0], (raw[0][0].float() / 255 - mean) / std, atol=0.5 / 255 / 0.224 + 1e-5)
    loader.close()
    loader.close()  # idempotent


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("backend,dataset", combos(DATA_BACKENDS))
def test_labels_belong_to_their_images(ds, backend, dataset, split):
    seen = 0
    for x, y in make(ds, backend, split=split, normalize=False):
        assert np.array_equal(colour_of(x), y.numpy())
        seen += len(y)
    assert seen == (TRAIN // 8 * 8 if split == "train" else VAL)


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_epochs_interleaved_with_val_as_train_run_does(ds, backend, dataset):
    """train epoch, val, train epoch, val, val again, ...: every pass complete, val identical."""
    train = make(ds, backend, normalize=False)
    val = make(ds, backend, split="val", normalize=False)
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


@pytest.mark.parametrize("backend,dataset", combos(DATA_BACKENDS))
def test_set_epoch_selects_the_epoch_whatever_came_before(ds, backend, dataset):
    a = make(ds, backend, normalize=False)
    a.set_epoch(2)
    direct = collect(a)
    b = make(ds, backend, normalize=False)
    for e in range(3):
        b.set_epoch(e)
        got = collect(b, limit=2 if e < 2 else None)  # abandoned epochs on the way
    assert digests(got) == digests(direct)


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS, CACHED))
def test_mid_epoch_resume_with_batches_in_flight(ds, backend, dataset):
    def make_loader():
        loader = make(ds, backend, normalize=False, prefetch=3)  # several batches decoding ahead
        loader.set_epoch(1)
        return loader

    state = assert_resumes_exactly(make_loader, 3, through_json=True)
    assert state["epoch"] == 1 and state["batch"] == 3
    with pytest.raises(ValueError, match="seed"):
        make(ds, backend, seed=4).load_state_dict(state)


@pytest.mark.parametrize("backend,dataset", combos(DATA_BACKENDS))
def test_state_after_a_finished_epoch_resumes_into_the_next(ds, backend, dataset):
    a = make(ds, backend, normalize=False)
    collect(a)
    state = a.state_dict()
    b = make(ds, backend, normalize=False)
    b.load_state_dict(state)
    assert collect(b) == []  # nothing left of epoch 0
    b.set_epoch(1)
    a.set_epoch(1)
    assert digests(collect(b)) == digests(collect(a))


def ramp(ds: Dataset) -> ResolutionSchedule:
    """Two sizes in one run: 8 px below the dataset's size in epoch 0, its size from epoch 1 on."""
    return ResolutionSchedule(ds.size - 8, ds.size, start_epoch=0, end_epoch=1, step=8)


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_resolution_schedule_selects_the_size_by_epoch(ds, backend, dataset):
    """Each epoch of a schedule is, bitwise, the epoch of a loader built at that epoch's fixed size;
    every rank has the same size in the same epoch, and going back to an epoch gives it again."""
    small, large = ds.size - 8, ds.size
    loader = make(ds, backend, image_size=ramp(ds), normalize=False)
    other_rank = make(ds, backend, image_size=ramp(ds), normalize=False, rank=1, world_size=2)
    seen = {}
    for epoch, size in ((0, small), (1, large), (2, large), (0, small)):
        loader.set_epoch(epoch)
        other_rank.set_epoch(epoch)
        assert loader.image_size == other_rank.image_size == size
        got = collect(loader)
        assert len(got) == TRAIN // 8
        assert all(x.shape == (8, 3, size, size) for x, _ in got)
        assert next(iter(other_rank))[0].shape[-1] == size
        if backend != "synthetic":  # (its one random batch is drawn at the largest size)
            fixed = make(ds, backend, image_size=size, normalize=False)
            fixed.set_epoch(epoch)
            want = collect(fixed)
            assert digests(got) == digests(want) and all(torch.equal(a[1], b[1]) for a, b in zip(got, want))
        if epoch in seen:
            assert digests(got) == seen[epoch]
        seen[epoch] = digests(got)
    assert len(loader) == TRAIN // 8  # the plan does not depend on the size


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_a_resume_across_the_resolution_ramp_is_exact(ds, backend, dataset):
    """States saved mid-epoch before the ramp, at an epoch's end and mid-epoch after it resume
    bitwise into the sizes an uninterrupted run has."""
    def make_loader():
        return make(ds, backend, image_size=ramp(ds), normalize=False, prefetch=3)

    reference, whole = make_loader(), []
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        whole.append(collect(reference))
    assert whole[0][0][0].shape[-1] == ds.size - 8 and whole[1][0][0].shape[-1] == ds.size
    for epoch, head in ((0, 3), (0, TRAIN // 8), (1, 2)):
        first = make_loader()
        first.set_epoch(epoch)
        it = iter(first)
        got = [tuple(t.clone() for t in next(it)) for _ in range(head)]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = make_loader()
        resumed.load_state_dict(state)
        got += collect(resumed)
        if epoch == 0:
            resumed.set_epoch(1)
            got += collect(resumed)
        want = whole[0] + whole[1] if epoch == 0 else whole[1]
        assert len(got) == len(want)
        assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(got, want))


def test_host_slots_are_allocated_once_for_the_largest_size(colour_shards):
    """A smaller epoch uses a prefix of the slots allocated for the largest size: no new host memory."""
    schedule = ResolutionSchedule(16, 24, start_epoch=0, end_epoch=1, step=8)
    loader = create_loader(colour_shards, batch_size=8, image_size=schedule, device="cpu", workers=1, seed=3,
                           worker_mode="thread", normalize=False)
    sizes, slots = [], set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        sizes.append(next(iter(loader))[0].shape[-1])
        slots.add((loader._images.data_ptr(), tuple(loader._images.shape)))
    assert sizes == [16, 24, 24] and len(slots) == 1 and next(iter(slots))[1][2:4] == (24, 24)
    loader.close()


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_two_ranks_equal_steps_and_val_exactly_once(ds, backend, dataset):
    train = [make(ds, backend, batch_size=7, rank=r, world_size=2, normalize=False) for r in range(2)]
    assert len(train[0]) == len(train[1]) == TRAIN // 2 // 7
    got = [collect(t) for t in train]
    assert [len(g) for g in got] == [len(train[0])] * 2
    val = [make(ds, backend, split="val", batch_size=4, rank=r, world_size=2, normalize=False) for r in range(2)]
    assert len(val[0]) == len(val[1]) and val[0].num_samples + val[1].num_samples == VAL
    parts = [collect(v) for v in val]
    assert sum(len(y) for p in parts for _, y in p) == VAL
    if backend == "synthetic":
        return  # one resident batch: nothing more to tell apart
    single = collect(make(ds, backend, split="val", batch_size=4, normalize=False))
    assert sorted(digests(parts[0]) + digests(parts[1])) == sorted(digests(single))
    labels = sorted(int(v) for p in parts for _, y in p for v in y)
    assert labels == sorted(k for k in range(6) for _ in range(3))
    a, b = (set(np.concatenate([np.asarray(i) for i in t.batch_sample_ids()]).tolist()) for t in train)
    assert not a & b  # disjoint train slices


@pytest.mark.parametrize("backend,dataset", combos(DATA_BACKENDS, CACHED))
def test_corrupt_sample_is_counted_replaced_and_the_batch_keeps_its_size(ds, backend, dataset, tmp_path):
    path, bad = damaged_copy(ds, tmp_path)
    local = path
    if ds.source != "local":  # the same damage, in a bucket
        path = f"{new_bucket()}/damaged"
        upload_folder(local, path)
    loader = make(ds, backend, shards=path, batch_size=6, normalize=False, drop_last=False)
    got = collect(loader)
    assert [len(y) for _, y in got] == [6] * 10
    assert set(loader.stats.corrupt_keys) == bad and loader.stats.corrupt == len(bad)
    for x, y in got:
        assert np.array_equal(colour_of(x), y.numpy())  # a stand-in brings its own label
    cpu = collect(make(ds, "cpu", shards=local, batch_size=6, normalize=False, drop_last=False))
    for (_, y1), (_, y2) in zip(got, cpu):
        assert torch.equal(y1, y2)  # the same stand-ins in every backend


# (worlds, batches each rank of every world but the last runs, samples never seen): the last
# world runs the rest of the epoch. 60 samples, batch 4.
WORLD_CHANGES = {
    "2to1": ((2, 1), (3,), 0),  # 24 consumed, then 9 batches of the 36 left
    "1to3": ((1, 3), (5,), 4),  # 20 consumed, then 3 batches on each rank: 36 of the 40 left
    "2to3to1": ((2, 3, 1), (2, 1), 0),  # 16, 12, then the 32 left
}


@pytest.mark.parametrize("backend,dataset,change", [
    pytest.param(*p.values, change, id=f"{p.id}-{change}") for p in combos(DATA_BACKENDS, BOTH)
    for change in WORLD_CHANGES if change == "2to1" or "-s3" not in p.id])  # the bucket copy: one change
def test_a_state_continues_the_epoch_on_another_world_size(ds, backend, dataset, change):
    """Each world's ranks run some batches of epoch 1; one rank's state goes to every rank of the
    next world, of another size. Across all of them every sample comes at most once, with the
    pixels an uninterrupted one-rank epoch gives it, and only the drop_last remainder is missing."""
    worlds, heads, missing = WORLD_CHANGES[change]

    def loader(**kw):
        one = make(ds, backend, batch_size=4, normalize=False, **kw)
        one.set_epoch(1)
        return one

    ref = loader()
    pixels = dict(zip(np.concatenate(ref.batch_sample_ids()).tolist(), digests(collect(ref))))
    assert len(pixels) == TRAIN
    seen, state, left = [], None, TRAIN
    for k, world in enumerate(worlds):
        ranks = [loader(rank=r, world_size=world) for r in range(world)]
        states = []
        for rank in ranks:
            if state is not None:
                rank.load_state_dict(json.loads(json.dumps(state)))
            assert len(rank) == left // world // 4  # this world's batches of what is left of the epoch
            assert rank.num_samples == len(rank) * 4
            plan = rank.batch_sample_ids()
            got = collect(rank, heads[k] if k < len(heads) else None)
            for ids, batch in zip(plan, got):
                assert digests([batch]) == [pixels[i] for i in ids.tolist()]
                assert batch[1].tolist() == [int(rank.table.label[i]) for i in ids]
                seen += ids.tolist()
            states.append(rank.state_dict())
        assert all(s == states[0] for s in states), "every rank's state is the same"
        state = states[-1]  # any rank's
        left -= (heads[k] if k < len(heads) else 0) * world * 4
    assert len(seen) == len(set(seen)), "a sample came twice"
    assert TRAIN - len(seen) == missing
    after = loader(world_size=2, rank=1)  # the finished epoch's state, on yet another world: nothing left
    after.load_state_dict(state)
    assert len(after) == 0 and collect(after) == []
    after.set_epoch(2)
    assert len(after) == TRAIN // 2 // 4


@pytest.mark.parametrize("dataset", ["imagenet"])
def test_synthetic_continues_the_epoch_on_another_world_size(ds, dataset):
    """The synthetic backend keeps the shard backends' batch counts after a world change too."""
    two = make(ds, "synthetic", batch_size=4, world_size=2, rank=1)
    collect(two, 3)
    one = make(ds, "synthetic", batch_size=4)
    one.load_state_dict(two.state_dict())
    assert len(one) == (TRAIN - 3 * 2 * 4) // 4 == len(collect(one))


@pytest.mark.parametrize("backend,dataset", combos(["cpu"]))
def test_a_val_state_resumes_only_on_its_own_world_size(ds, backend, dataset):
    two = make(ds, backend, split="val", batch_size=4, world_size=2, rank=0, normalize=False)
    collect(two, 1)
    with pytest.raises(ValueError, match="world_size=2.*world_size=1.*val"):
        make(ds, backend, split="val", batch_size=4, normalize=False).load_state_dict(two.state_dict())


@pytest.mark.parametrize("backend,dataset", combos(ALL_BACKENDS))
def test_state_is_plain_data(ds, backend, dataset):
    loader = make(ds, backend)
    next(iter(loader))
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize("backend,dataset", combos(DATA_BACKENDS, ("s3",)))
def test_a_bucket_copy_gives_the_batches_of_the_local_copy(ds, backend, dataset):
    """Read by range requests, train keeps its full per-epoch permutation: the same samples, crops
    and pixels as the local copy, in train and in val."""
    for split in ("train", "val"):
        remote = make(ds, backend, split=split, normalize=False)
        mine = make(ds, backend, shards=ds.local, split=split, normalize=False)
        assert remote.table.ranged and not mine.table.ranged
        assert [b.tolist() for b in remote.batch_sample_ids()] == [b.tolist() for b in mine.batch_sample_ids()]
        a, b = collect(remote), collect(mine)
        assert len(a) == len(b) > 0
        assert digests(a) == digests(b) and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))


def damaged_copy(ds: Dataset, tmp_path) -> tuple:
    """A local copy of the dataset with four damaged image members: three without a header, one
    cut right after its header (every decoder reads the header, then fails)."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(ds.local, out)
    ext = "png" if ds.name == "cifar" else "jpg"
    keep = {"png": 33, "jpg": None}[ext]  # PNG: signature and IHDR; JPEG: up to its scan

    def no_header(m):
        return {**m, ext: b"NOTANIMAGE" * 4 + m[ext][40:]}

    def header_only(m):
        data = m[ext]
        if ext == "jpg":
            sos = data.index(b"\xff\xda")
            return {**m, ext: data[:sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")]}
        return {**m, ext: data[:keep]}

    shards = len(load_manifest(out)["splits"]["train"]["shards"])
    bad = {rewrite_shard(out, "train", shard % shards, pos, no_header) for shard, pos in ((0, 1), (1, 0), (2, 2))}
    bad.add(rewrite_shard(out, "train", 3 % shards, 5, header_only))
    return out, bad


def test_resident_refuses_a_transform_that_resizes(colour_shards):
    with pytest.raises(ValueError, match="crop='padded'"):
        create_loader(colour_shards, backend="resident", device="cpu", batch_size=8)
