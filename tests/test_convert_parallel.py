"""Conversion encodes images in parallel per chunk, not per shard: the bytes written must not
depend on the worker count, and one shard must still spread over every worker."""
from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from conftest import jpeg_bytes
from convert.imagenet_to_shards import convert
from convert import runner
from convert.runner import CHUNK, ConvertError, Item, plan_shards, run_conversion
from convert.synthetic import SyntheticConfig, generate
from pipeline.shard_format import JPEG_EXT, Sample, load_manifest


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """Larger than --max-side, so every image is decoded, resized and re-encoded."""
    out = tmp_path_factory.mktemp("photos")
    cfg = SyntheticConfig(classes=3, per_class=2 * CHUNK + 5, val_per_class=4, seed=11, size=300, noise=6.0)
    return generate(out, cfg, workers=2, progress=False)


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode", ["chunks", "shards"])
@pytest.mark.parametrize("shard_size_mb", [256, 0.04])
def test_output_is_byte_identical_for_any_worker_count(photo_root, tmp_path, monkeypatch, shard_size_mb, mode):
    ref = tmp_path / "w1"
    convert(photo_root, ref, shard_size_mb=shard_size_mb, max_side=128, workers=1, progress=False)
    shards = load_manifest(ref)["splits"]["train"]["shards"]
    # The default size makes one train shard (the case a per-shard pool ran on one core);
    # the small size makes many, with chunks that end at shard boundaries.
    assert (len(shards) == 1) if shard_size_mb == 256 else (len(shards) > 3)
    assert sum(s["samples"] for s in shards) == 3 * (2 * CHUNK + 5)
    # Force the unit of parallel work: whole shards, or chunks of images.
    monkeypatch.setattr(runner, "SHARDS_PER_WORKER", 0 if mode == "shards" else 10**9)
    for workers in (2, 3):
        assert runner.split_by_shard(len(shards), workers) == (mode == "shards")
        out = tmp_path / f"w{workers}"
        convert(photo_root, out, shard_size_mb=shard_size_mb, max_side=128, workers=workers, progress=False)
        assert all_bytes(out) == all_bytes(ref)


def encode_with_pid(item: Item, options: dict) -> tuple[Sample, int]:
    """A test encoder: slow enough that a lone worker cannot take every chunk."""
    time.sleep(0.005)
    return Sample(item.source, JPEG_EXT, item.label, {"pid": os.getpid()}), len(item.source)


def test_one_shard_spreads_over_every_worker(tmp_path):
    data = jpeg_bytes(size=(16, 16))
    items = [Item(f"{i:06d}", f"train/x/{i}.jpg", 0, len(data), data) for i in range(6 * CHUNK)]
    jobs = plan_shards("train", items, 1 << 40, encode_with_pid, {})
    assert len(jobs) == 1
    manifest, _ = run_conversion(tmp_path, "test", ["x"], {"train": jobs}, {}, workers=2, strict=False,
                                 progress=False)
    with tarfile.open(tmp_path / jobs[0].name) as tar:
        names = tar.getnames()
        pids = {json.loads(tar.extractfile(n).read())["pid"] for n in names if n.endswith(".json")}
        keys = [n.split(".")[0] for n in names if n.endswith(".json")]
    assert keys == [it.key for it in items]  # plan order, whoever encoded what
    assert len(pids) == 2 and os.getpid() not in pids


def test_strict_reject_in_a_worker_stops_the_run_without_partial_files(photo_root, tmp_path):
    src = tmp_path / "src"
    # A copy of the tree with one damaged file deep in the plan.
    for p in sorted((photo_root / "train").rglob("*.JPEG")):
        dst = src / p.relative_to(photo_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    victim = sorted(src.rglob("*.JPEG"))[-3]
    victim.write_bytes(victim.read_bytes()[:400])
    with pytest.raises(ConvertError, match="--strict"):
        convert(src, tmp_path / "o", max_side=128, workers=2, strict=True, progress=False)
    assert not list((tmp_path / "o").glob("*.tar"))
    assert not list((tmp_path / "o").glob(".*.partial"))
    # Without --strict the run goes on and reports it.
    m, _ = convert(src, tmp_path / "o", max_side=128, workers=2, progress=False)
    rejects = m["splits"]["train"]["rejects"]
    assert [r["path"] for r in rejects] == [victim.relative_to(src).as_posix()]
