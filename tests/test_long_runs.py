"""Long runs lose nothing: each defect found in the bucket, restart and conversion paths, with a test
that failed before its fix. A user's staging folder keeps its files; a bucket's record is never
overwritten by a node's older copy; a checkpoint that could not be fetched stops the start instead
of being taken for damage; an index entry is bounded by its shard before it sizes a request, and is
one corrupt sample on a local and a bucket copy alike; a val split that cannot be read is an error;
converting one split keeps the others; a killed resume leaves nothing behind for good."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import collect, folder_files, make_colour_folder, new_bucket, run_cli, upload_folder, \
    write_image_folder
from pipeline import ShardError, create_loader, objstore, plan
from pipeline.shard_format import MANIFEST_NAME, load_manifest, read_index
from train import checkpoint
from train.resume import CheckpointError, agree

KW = dict(batch_size=8, image_size=24, device="cpu", seed=3, normalize=False)


# -- 1. the staging folder -------------------------------------------------------------------------

def test_converting_to_a_bucket_keeps_the_users_staging_folder_and_its_files(s3_env, tmp_path):
    from convert.imagenet_to_shards import convert

    src = make_colour_folder(tmp_path / "src", per_class=2, val_per_class=1)
    staging = tmp_path / "scratch"
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    (staging / "train-000000.tar").write_bytes(b"my own shard")  # a name the converter also uses
    url = f"{new_bucket()}/ds"
    convert(src, url, shard_size_mb=0.01, workers=1, progress=False, staging=staging)
    assert MANIFEST_NAME in objstore.listdir(url)
    assert folder_files(staging) == {"notes.txt": b"mine", "train-000000.tar": b"my own shard"}
    assert [p.name for p in staging.iterdir() if p.is_dir()] == []  # its own subfolder is gone


def test_default_staging_folders_never_nest_and_finishing_one_leaves_the_others(s3_env, tmp_path, monkeypatch):
    from convert.destination import staging_folder
    from convert.imagenet_to_shards import convert

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = new_bucket()
    top, sub = staging_folder(bucket), staging_folder(f"{bucket}/sub")
    assert top.parent == sub.parent and top != sub
    assert staging_folder(f"{bucket}/sub/") == sub and staging_folder(f"{bucket}/") == top
    sub.mkdir(parents=True)  # an interrupted conversion to s3://b/sub
    (sub / MANIFEST_NAME).write_text("{}")
    convert(make_colour_folder(tmp_path / "src", per_class=2, val_per_class=1), bucket, shard_size_mb=0.01,
            workers=1, progress=False)
    assert (sub / MANIFEST_NAME).read_text() == "{}" and not top.exists()


# -- 2. the run's record in a bucket -----------------------------------------------------------------

def _rows(steps) -> bytes:
    return "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps).encode()


def test_a_stale_mirror_never_replaces_the_buckets_record(s3_env, tmp_path, monkeypatch):
    """Rank 0 on node A (steps 1-4), then B (5-8), then A again: A's mirror must continue the
    bucket's steps 1-8, not upload its own 1-4 over them."""
    monkeypatch.setenv("RESNET_RUN_CACHE", str(tmp_path / "nodeA"))
    output = f"{new_bucket()}/run"
    mirror = checkpoint.local_folder(output)
    mirror.mkdir(parents=True)
    (mirror / "metrics.jsonl").write_bytes(_rows(range(1, 5)))
    (mirror / "train.log").write_text("A\n")
    checkpoint.upload_record(output)
    objstore.put(f"{output}/metrics.jsonl", _rows(range(1, 9)))  # node B's attempt went on
    objstore.put(f"{output}/train.log", b"A\nB\n")

    checkpoint.fetch_record(output)  # back on A
    assert (mirror / "metrics.jsonl").read_bytes() == _rows(range(1, 9))
    assert (mirror / "train.log").read_bytes() == b"A\nB\n"
    (mirror / "metrics.jsonl").write_bytes(_rows(range(1, 13)))
    checkpoint.upload_record(output)
    steps = [json.loads(r)["step"] for r in objstore.get(f"{output}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, 13))

    # This node's own copy, ahead of the bucket's (an upload that did not happen): kept.
    (mirror / "metrics.jsonl").write_bytes(_rows(range(1, 15)))
    checkpoint.fetch_record(output)
    assert (mirror / "metrics.jsonl").read_bytes() == _rows(range(1, 15))
    assert not list(mirror.glob(".*.partial"))


# -- 3. could not fetch is not damage ----------------------------------------------------------------

def _state(step: int) -> dict:
    return {"step": step, "epoch": 0, "loader": {"batch": step}, "state_dict": {"w": torch.full((3,), float(step))}}


@pytest.fixture
def bucket_run(s3_env, tmp_path, monkeypatch) -> str:
    """A run folder in a bucket with two good checkpoints (steps 6 and 9)."""
    monkeypatch.setenv("RESNET_RUN_CACHE", str(tmp_path / "mirror"))
    output = f"{new_bucket()}/run"
    checkpoint.local_folder(output).mkdir(parents=True)
    for step in (6, 9):
        checkpoint.save(_state(step), output)
    return output


@pytest.mark.parametrize("failure", [objstore.ObjectStoreError("s3://x: download failed after 5 retries (503)"),
                                     objstore.ObjectAccessDenied("s3://x: access denied (AccessDenied)")])
def test_a_checkpoint_that_cannot_be_downloaded_stops_the_start(bucket_run, monkeypatch, failure):
    def failing(url, local):
        raise failure

    monkeypatch.setattr(objstore, "get_file", failing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "damaged, trying the one before it"
        with pytest.raises(checkpoint.CheckpointUnavailable, match="checkpoint.pth.tar could not be read"):
            checkpoint.newest(bucket_run)
        with pytest.raises(CheckpointError, match=rf"{bucket_run}/checkpoint.pth.tar could not be read .*"
                                                  rf"{type(failure).__name__}"):
            agree("auto", bucket_run, 0, 1)  # never None: that would start afresh over both


def test_a_transient_failure_on_the_newest_does_not_fall_back_to_the_older(bucket_run, monkeypatch):
    real = objstore.get_file

    def newest_fails(url, local):
        if url.endswith(checkpoint.NEWEST):
            raise objstore.ObjectStoreError(f"{url}: download failed after 5 retries (ReadTimeout)")
        return real(url, local)

    monkeypatch.setattr(objstore, "get_file", newest_fails)
    with pytest.raises(checkpoint.CheckpointUnavailable, match="ReadTimeout"):
        checkpoint.newest(bucket_run)
    monkeypatch.setattr(objstore, "get_file", real)
    assert checkpoint.newest(bucket_run)[1]["step"] == 9  # once it can be read, it is the one


def test_a_listing_that_fails_stops_the_start_too(bucket_run, monkeypatch):
    def denied(url):
        raise objstore.ObjectAccessDenied(f"{url}: access denied")

    monkeypatch.setattr(objstore, "exists", denied)
    with pytest.raises(checkpoint.CheckpointUnavailable, match="access denied"):
        checkpoint.newest(bucket_run)


def test_damaged_bytes_still_fall_back_to_the_previous_checkpoint(bucket_run):
    raw = objstore.get(f"{bucket_run}/checkpoint.pth.tar")
    objstore.put(f"{bucket_run}/checkpoint.pth.tar", raw[:len(raw) // 3])
    with pytest.warns(RuntimeWarning, match="is damaged"):
        assert checkpoint.newest(bucket_run)[1]["step"] == 6


def _agree_in_rank(rank: int, world: int, init: str, output: str, queue) -> None:
    """One rank of a manual --world-size/--rank launch: rank 0 cannot read the run's checkpoint."""
    import torch.distributed as dist

    from train import checkpoint as ckpt
    from train.resume import agree as agree_

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    if rank == 0:
        def unreadable(out):
            raise ckpt.CheckpointUnavailable(f"{out}/checkpoint.pth.tar", PermissionError(13, "Permission denied"))
        ckpt.newest = unreadable
    try:
        agree_("auto", output, rank, world)
        queue.put((rank, "returned"))
    except CheckpointError as e:
        queue.put((rank, f"CheckpointError: {e}"))
    except Exception as e:  # noqa: BLE001 - reported to the test, which names what was expected
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_every_rank_raises_when_one_cannot_read_its_checkpoint(tmp_path):
    """Rank 0 fails before the collective: rank 1 must not wait in it, and both say why."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_agree_in_rank, args=(r, 2, init, str(tmp_path / "run"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results[0].startswith("CheckpointError") and "Permission denied" in results[0], results
    assert results[1].startswith("CheckpointError: rank 0:") and "Permission denied" in results[1], results


# -- 4, 5. index entries are bounded by their shard ----------------------------------------------------

def _forge_index(folder: Path, shard: int, pos: int, size: int) -> str:
    """Give sample `pos` of train shard `shard` an image member of `size` bytes in the .idx: past the
    end of the shard. Returns its "shard.tar:KEY"."""
    entry = load_manifest(folder)["splits"]["train"]["shards"][shard]
    lines = (folder / entry["index"]).read_text().splitlines()
    fields = lines[1 + pos].split()
    for i in range(0, len(fields), 4):
        if fields[i] == "jpg":
            fields[i + 2] = str(size)
    lines[1 + pos] = " ".join(fields)
    (folder / entry["index"]).write_text("\n".join(lines) + "\n")
    return f"{entry['name']}:{read_index(folder / entry['index'])[pos][0]}"


@pytest.fixture
def forged(colour_shards, tmp_path) -> tuple[Path, str]:
    out = tmp_path / "forged"
    shutil.copytree(colour_shards, out)
    return out, _forge_index(out, shard=1, pos=0, size=1 << 30)


def test_a_forged_index_entry_is_one_corrupt_sample_locally_and_in_a_bucket(s3_env, forged, monkeypatch):
    folder, key = forged
    url = f"{new_bucket()}/ds"
    upload_folder(folder, url)
    sizes = objstore.listdir(url)
    asked = []
    real = objstore.read_ranges

    def recording(urls, starts, ends, **kw):
        asked.extend((u.rsplit("/", 1)[-1], e) for u, e in zip(urls, ends))
        return real(urls, starts, ends, **kw)

    monkeypatch.setattr(objstore, "read_ranges", recording)
    epochs, stats = [], []
    for src in (folder, url):
        loader = create_loader(src, split="train", workers=2, worker_mode="thread", **KW)
        epochs.append(collect(loader))
        stats.append((loader.stats.corrupt, sorted(loader.stats.corrupt_keys)))
        loader.close()
    assert stats[0] == stats[1] == (1, [key])  # one behaviour: counted, replaced, named
    assert len(epochs[0]) == len(epochs[1]) > 0
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(*epochs))
    assert asked and all(end is None or end <= sizes[name] for name, end in asked)  # never past an object's end


def test_a_forged_label_member_is_an_error_before_any_request(s3_env, colour_shards, tmp_path, monkeypatch):
    """Shards without a manifest read their labels from the .cls members: one placed past the end
    of its shard is named, not fetched."""
    folder = tmp_path / "nolabels"
    shutil.copytree(colour_shards, folder)
    entry = load_manifest(folder)["splits"]["train"]["shards"][0]
    lines = (folder / entry["index"]).read_text().splitlines()
    fields = lines[1].split()
    i = fields.index("cls")
    fields[i + 1] = str(10 ** 12)
    lines[1] = " ".join(fields)
    (folder / entry["index"]).write_text("\n".join(lines) + "\n")
    (folder / MANIFEST_NAME).unlink()
    url = f"{new_bucket()}/ds"
    upload_folder(folder, url)
    with pytest.raises(ShardError, match=r"\.cls member past the end of the shard"):
        create_loader(f"{url}/{entry['name']}", split="train", **KW)


def test_labels_without_a_manifest_are_read_in_merged_ranges(s3_env, tmp_path, monkeypatch):
    """Bucket shards without a manifest: their labels come from the .cls members. With samples of
    ImageNet-like size (tens of KB apart) that must not cost one request per sample."""
    from convert.imagenet_to_shards import convert

    def noise(rng, cls, k):  # ~40 KB JPEGs: farther apart than the batch reads' merge gap
        return rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)

    write_image_folder(tmp_path / "src", {"train": 4}, 3, noise, 92, 1)
    convert(tmp_path / "src", tmp_path / "shards", shard_size_mb=0.3, workers=1, progress=False,
            restart_interval=None)
    (tmp_path / "shards" / MANIFEST_NAME).unlink()
    names = sorted(p.name for p in (tmp_path / "shards").glob("train-*.tar"))
    url = f"{new_bucket()}/ds"
    upload_folder(tmp_path / "shards", url)
    requests = []
    real = objstore.read_ranges

    def counting(urls, starts, ends, merge_gap=objstore.MERGE_GAP):
        if all(s is not None for s in starts):  # ranges, not the whole .idx objects
            requests.append(len(objstore._merge(list(zip(urls, starts, ends)), merge_gap)[0]))
        return real(urls, starts, ends, merge_gap=merge_gap)

    monkeypatch.setattr(objstore, "read_ranges", counting)
    pattern = f"{url}/train-{{000000..{len(names) - 1:06d}}}.tar"
    table = create_loader(pattern, split="train", **KW).table
    assert (table.label >= 0).all() and len(table) == 12 and len(names) >= 2
    assert requests == [len(names)]  # the labels: one request per shard, not one per sample


# -- 6. a val split that cannot be read ------------------------------------------------------------

TRAIN = ["--arch", "resnet18", "--image-size", "24", "--device", "cpu", "-j", "0", "-b", "8", "--epochs", "1",
         "--max-steps", "1", "--warm-up-epochs", "0", "--seed", "1"]


def test_a_damaged_val_split_is_an_error_naming_the_shard(colour_shards, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(colour_shards, folder)
    val = load_manifest(folder)["splits"]["val"]["shards"][0]["name"]
    with open(folder / val, "r+b") as f:
        f.truncate(1000)
    r = run_cli("train.run", "--shards", folder, "--output", tmp_path / "run", *TRAIN, timeout=300, warm=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"shard {folder / val} is truncated" in r.stderr and "training without evaluation" not in r.stderr


def test_a_dataset_without_val_still_trains_and_says_so(colour_shards, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(colour_shards, folder)
    m = load_manifest(folder)
    for s in m["splits"].pop("val")["shards"]:
        (folder / s["name"]).unlink()
    (folder / MANIFEST_NAME).write_text(json.dumps(m))
    r = run_cli("train.run", "--shards", folder, "--output", tmp_path / "run", *TRAIN, timeout=300, warm=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no split 'val'" in r.stderr and "training without evaluation" in r.stderr


# -- 7. converting one more split ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "bucket"])
def test_converting_one_split_at_a_time_keeps_the_others(where, s3_env, tmp_path):
    from convert.imagenet_to_shards import convert

    src = make_colour_folder(tmp_path / "src", per_class=3, val_per_class=2)
    convert(src, tmp_path / "whole", shard_size_mb=0.01, workers=1, progress=False)
    out = tmp_path / "out" if where == "local" else f"{new_bucket()}/ds"
    for split in ("train", "val"):
        convert(src, out, splits=[split], shard_size_mb=0.01, workers=1, progress=False,
                staging=tmp_path / "staging")
    got = folder_files(out) if where == "local" else {n: objstore.get(f"{out}/{n}") for n in objstore.listdir(out)}
    assert got == folder_files(tmp_path / "whole")  # the manifest too: both splits, in one order
    assert len(collect(create_loader(out, split="train", **KW))) > 0


def test_a_split_whose_shards_are_gone_is_left_out_with_a_warning(tmp_path, capsys):
    from convert.imagenet_to_shards import convert

    src = make_colour_folder(tmp_path / "src", per_class=3, val_per_class=2)
    convert(src, tmp_path / "out", splits=["train"], shard_size_mb=0.01, workers=1, progress=False)
    next((tmp_path / "out").glob("train-*.tar")).write_bytes(b"cut")
    convert(src, tmp_path / "out", splits=["val"], shard_size_mb=0.01, workers=1, progress=False)
    assert set(load_manifest(tmp_path / "out")["splits"]) == {"val"}
    assert "split 'train' of the earlier conversion" in capsys.readouterr().err


def test_a_local_rerun_marks_its_manifest_unfinished_before_deleting_a_shard(tmp_path, monkeypatch):
    from convert.imagenet_to_shards import convert

    src = make_colour_folder(tmp_path / "src", per_class=3, val_per_class=1)
    out = tmp_path / "out"
    convert(src, out, shard_size_mb=0.01, workers=1, progress=False)
    (out / "notes-train-000099.tar").write_bytes(b"not ours")
    seen = []
    real = Path.unlink

    def watching(self, missing_ok=False):
        if self.suffix in (".tar", ".idx") and self.parent == out:
            seen.append((self.name, load_manifest(out)["complete"]))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", watching)
    convert(src, out, shard_size_mb=0.1, workers=1, progress=False)  # fewer, larger shards
    assert seen and all(complete is False for _, complete in seen)
    assert load_manifest(out)["complete"] and (out / "notes-train-000099.tar").read_bytes() == b"not ours"


# -- 8. a rank killed while resuming ---------------------------------------------------------------

def test_downloads_of_dead_processes_are_removed_and_no_other(bucket_run):
    mirror = checkpoint.local_folder(bucket_run)
    host = socket.gethostname().replace("-", "_")
    dead = mp.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    leftovers = [f".resume-{host}-{dead.pid}-checkpoint.pth.tar", f"..resume-{host}-{dead.pid}-checkpoint.pth.tar.partial"]
    kept = [f".resume-{host}-{os.getppid()}-checkpoint.pth.tar",  # a live process
            f".resume-otherhost-{dead.pid}-checkpoint.pth.tar",  # another node's: its processes cannot be seen
            "notes.txt"]
    for name in leftovers + kept:
        (mirror / name).write_bytes(b"x" * 100)
    assert checkpoint.newest(bucket_run)[1]["step"] == 9
    assert checkpoint.load(f"{bucket_run}/checkpoint.pth.tar")["step"] == 9
    assert sorted(p.name for p in mirror.iterdir() if p.is_file()) == sorted(kept)


# -- suspected, confirmed or ruled out -------------------------------------------------------------

def test_a_val_split_smaller_than_the_world_scores_without_nan(colour_shards, tmp_path):
    """18 val samples over 32 ranks: the ranks past the split get an empty batch, which must not
    make the val loss NaN."""
    from train.precision import Precision
    from train.run import DistInfo, validate

    class Log:
        lines: list[str] = []

        def info(self, s):
            self.lines.append(s)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 6))
    precision = Precision("O0", torch.float32, None, "cpu")
    rank = next(r for r in range(32) if len(plan.val_batches(18, r, 32, KW["batch_size"])[0]) == 0)
    empty = create_loader(colour_shards, split="val", rank=rank, world_size=32, **KW)
    batches = collect(empty)
    assert [len(y) for _, y in batches] == [0]
    log = Log()
    validate(model, empty, torch.nn.CrossEntropyLoss(), precision, DistInfo(0, 1), log)
    assert "nan" not in log.lines[-1].lower() and "0 samples" in log.lines[-1]


def test_a_pattern_that_mixes_stores_is_a_clear_error():
    with pytest.raises(ShardError, match="shards of one kind"):
        create_loader("{s3://b/train-000000.tar,gs://b/train-000001.tar}", split="train", **KW)
