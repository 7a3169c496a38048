"""The node-local shard cache (pipeline/shard_cache.py) against moto's S3 server on loopback, behind
the counting proxy (tests/s3_server.py): each shard is downloaded once per node whatever the ranks
and workers, later epochs make no request, the cache stays under its limit, and a damaged, partial
or killed download is never decoded. Batches always equal the local copy's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_resumes_exactly, cli_env, collect, new_bucket, rewrite_shard, run_cli, upload_folder
from pipeline import create_loader
from pipeline.shard_cache import OWN_NAME, ShardCache, need_batches, parse_size
from pipeline.shard_format import load_manifest
from pipeline.source import open_split

KW = dict(batch_size=8, image_size=24, device="cpu", seed=3, normalize=False)
TAR = r"\.tar$"
ROOT = Path(__file__).resolve().parent.parent


def same_batches(a, b) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def local_epoch(folder, epoch: int, split: str = "train", **kw) -> list:
    loader = create_loader(folder, split=split, workers=1, worker_mode="thread", **{**KW, **kw})
    loader.set_epoch(epoch)
    try:
        return collect(loader)
    finally:
        loader.close()


def cached_files(cache_dir) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in Path(cache_dir).iterdir() if p.name.endswith(".tar")}


@pytest.fixture
def bucket(s3_env, colour_shards) -> str:
    """colour_shards in a new bucket of its own (a test's GETs are all its own)."""
    url = f"{new_bucket()}/ds"
    upload_folder(colour_shards, url)
    return url


def test_parse_size():
    assert parse_size("500M") == 500 << 20 and parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("2TiB") == 2 << 40 and parse_size(4096) == 4096 and parse_size(None) is None
    assert parse_size("0") is None
    with pytest.raises(ValueError, match="12 parsecs"):
        parse_size("12 parsecs")


def test_need_batches_follow_the_plans_order_of_first_need():
    needs = need_batches([[2, 0, 2], [1, 2, 0], [1]])
    assert list(needs) == [2, 0, 1] and {s: b.tolist() for s, b in needs.items()} == {2: [0, 1], 0: [0, 1], 1: [1, 2]}


def test_epoch_one_fills_the_cache_and_later_epochs_make_no_request(s3_proxy, bucket, colour_shards, tmp_path):
    cache_dir = tmp_path / "cache"
    shards = len(load_manifest(colour_shards)["splits"]["train"]["shards"])
    loader = create_loader(bucket, workers=2, cache_dir=str(cache_dir), **KW)
    loader.set_epoch(1)
    assert same_batches(collect(loader), local_epoch(colour_shards, 1))
    loader.table.cache._filler.wait(60)
    whole = s3_proxy.gets(TAR, ranged=False)
    assert sorted(r.key for r in whole) == sorted(set(r.key for r in whole))  # each shard once
    assert len(whole) == shards and len(cached_files(cache_dir)) == shards
    before = len(s3_proxy.gets(TAR))
    for epoch in (2, 3):
        loader.set_epoch(epoch)
        assert same_batches(collect(loader), local_epoch(colour_shards, epoch))
    assert len(s3_proxy.gets(TAR)) == before  # from the cache only: no request at all
    loader.close()
    # The cache survives the process: a new loader (a restart) reads it without a request.
    again = create_loader(bucket, workers=1, cache_dir=str(cache_dir), **KW)
    again.set_epoch(4)
    assert same_batches(collect(again), local_epoch(colour_shards, 4))
    again.table.cache._filler.wait(60)
    assert len(s3_proxy.gets(TAR)) == before
    again.close()


RANK_SCRIPT = """
import json, sys
from pipeline import create_loader
rank, bucket, cache_dir, fill = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
loader = create_loader(bucket, rank=rank, world_size=2, workers=2, cache_dir=cache_dir, cache_fill=fill,
                       batch_size=4, image_size=24, device="cpu", seed=3, normalize=False)
n = 0
for epoch in (0, 1):
    loader.set_epoch(epoch)
    n += sum(len(y) for _, y in loader)
loader.table.cache._filler.wait(60)
loader.close()
print(json.dumps({"samples": n}))
"""


@pytest.mark.parametrize("fill", ["ranged", "wait"])
def test_two_ranks_of_two_workers_on_one_node_download_each_shard_once(s3_proxy, bucket, colour_shards, tmp_path,
                                                                      fill):
    """Two rank processes, each with two workers and its cache filler, share one cache folder: under
    "wait", every worker that needs a shard not yet cached fetches it too. Every shard is GET whole
    exactly once."""
    cache_dir = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), bucket, str(cache_dir), fill],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for r in range(2)]
    outs = [p.communicate(timeout=240) for p in ranks]
    for p, (out, err) in zip(ranks, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["samples"] == 2 * 28
    shards = load_manifest(colour_shards)["splits"]["train"]["shards"]
    whole = [r.key for r in s3_proxy.gets(TAR, ranged=False)]
    assert len(whole) == len(set(whole)) == len(shards)
    if fill == "wait":  # every sample came from the cache: no range request for a shard's samples
        assert s3_proxy.gets(TAR, ranged=True) == []
    files = cached_files(cache_dir)
    assert sorted(files.values()) == sorted(e["bytes"] for e in shards)


def test_eviction_keeps_the_cache_under_its_limit(s3_proxy, bucket, colour_shards, tmp_path):
    """A limit of two train shards: a train epoch caches what fits and reads the rest by range; a
    val loader on the same folder then evicts the least recently used train shards to make room."""
    cache_dir = tmp_path / "cache"
    sizes = sorted(e["bytes"] for e in load_manifest(colour_shards)["splits"]["train"]["shards"])
    limit = sizes[-1] + sizes[-2]
    train = create_loader(bucket, workers=1, cache_dir=str(cache_dir), cache_limit=limit, **KW)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        assert same_batches(collect(train), local_epoch(colour_shards, epoch))
        train.table.cache._filler.wait(60)
        assert 0 < sum(cached_files(cache_dir).values()) <= limit
    kept = set(cached_files(cache_dir))
    assert 0 < len(kept) < len(sizes)
    val = create_loader(bucket, split="val", workers=1, cache_dir=str(cache_dir), cache_limit=limit, **KW)
    assert same_batches(collect(val), local_epoch(colour_shards, 0, split="val"))
    val.table.cache._filler.wait(60)
    now = cached_files(cache_dir)
    assert sum(now.values()) <= limit
    val_names = {val.table.cache.name(s) for s in range(len(val.table.urls))}
    assert val_names <= set(now) and kept - set(now)  # val's shards are in; some train shard went
    for loader in (train, val):
        loader.close()


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "unstamped", "stamp-of-another-file"])
def test_a_damaged_cached_file_is_deleted_and_fetched_again_never_decoded(s3_proxy, bucket, colour_shards, tmp_path,
                                                                         damage):
    cache_dir = tmp_path / "cache"
    loader = create_loader(bucket, workers=1, cache_dir=str(cache_dir), **KW)
    collect(loader)
    loader.table.cache._filler.wait(60)
    loader.close()
    cache = loader.table.cache
    path, stamp = cache.path(0), cache._stamp(0)
    data = path.read_bytes()
    if damage == "overwritten":  # same size, other bytes: every image member gets garbage
        path.write_bytes(bytes(b ^ 0x5A for b in data))
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "unstamped":  # killed between the rename and the stamp: checked, found right
        stamp.unlink()
    else:  # a wrong file renamed over the right one (a new inode)
        other = cache.path(1).read_bytes()
        tmp = path.with_name("elsewhere")
        tmp.write_bytes(other[:len(data)].ljust(len(data), b"\0"))
        os.replace(tmp, path)
    before = len(s3_proxy.gets(TAR, ranged=False))
    again = create_loader(bucket, workers=2, cache_dir=str(cache_dir), **KW)
    again.set_epoch(0)
    assert same_batches(collect(again), local_epoch(colour_shards, 0))
    again.table.cache._filler.wait(60)
    again.close()
    refetched = len(s3_proxy.gets(TAR, ranged=False)) - before
    assert refetched == (0 if damage == "unstamped" else 1)
    assert path.read_bytes() == data and cache.local(0) == path


KILL_SCRIPT = """
import sys
from pipeline.source import open_split
from pipeline.shard_cache import ShardCache
t = open_split(sys.argv[1], "train")
cache = ShardCache(sys.argv[2], None, t.urls, t.shard_bytes, t.shard_sha256)
print("fetching", flush=True)
cache.ensure(0, block=True)
"""


def test_a_download_killed_midway_is_never_read(s3_proxy, bucket, colour_shards, tmp_path):
    """SIGKILL a process in the middle of a shard's download (the proxy stalls it after half the
    body): the cache holds a partial file under a temporary name and a lock nobody holds. A rerun
    is not blocked by it, never reads it, and caches the whole shard."""
    cache_dir = tmp_path / "cache"
    table = open_split(bucket, "train")
    first = table.urls[0].split("://", 1)[1]
    stall = s3_proxy.inject("stall", method="GET", key=first.replace(".", r"\.") + "$", ranged=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, bucket, str(cache_dir)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = ShardCache(cache_dir, None, table.urls, table.shard_bytes, table.shard_sha256)
    partial = cache.path(0).with_name("." + cache.name(0) + ".partial")
    deadline = time.monotonic() + 60
    while not (stall.done and partial.exists() and partial.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stall.release()
    assert partial.exists() and not cache.path(0).exists()  # what a kill leaves: no final name
    s3_proxy.clear()
    loader = create_loader(bucket, workers=1, cache_dir=str(cache_dir), cache_fill="wait", **KW)
    assert same_batches(collect(loader), local_epoch(colour_shards, 0))
    loader.close()
    assert not partial.exists()  # swept when the cache opened
    assert cache.local(0) == cache.path(0) and cache.path(0).stat().st_size == table.shard_bytes[0]
    assert all(OWN_NAME.match(p.name) or p.name == "cache.lock" for p in cache_dir.iterdir())


def test_a_failed_download_is_not_damage(s3_proxy, bucket, colour_shards, tmp_path):
    """The store refuses the whole-shard downloads (403): nothing is cached, nothing cached is
    deleted, and the samples are read by range as without a cache."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    mine = cache_dir / "notes.txt"
    mine.write_text("not the cache's")
    table = open_split(bucket, "train")
    keys = "|".join(u.split("://", 1)[1].replace(".", r"\.") + "$" for u in table.urls[1:])
    warm = create_loader(bucket, workers=1, cache_dir=str(cache_dir), **KW)
    warm.table.cache.ensure(0)  # one shard cached before the store starts refusing
    s3_proxy.inject("403", method="GET", key=keys, ranged=False)
    for fill in ("ranged", "wait"):
        loader = create_loader(bucket, workers=1, cache_dir=str(cache_dir), cache_fill=fill, **KW)
        assert same_batches(collect(loader), local_epoch(colour_shards, 0))
        loader.table.cache._filler.wait(60)
        loader.close()
    warm.close()
    assert set(cached_files(cache_dir)) == {warm.table.cache.name(0)} and mine.read_text() == "not the cache's"


def test_a_shard_the_manifest_does_not_match_is_not_cached(s3_proxy, s3_env, colour_shards, tmp_path):
    """A bucket whose shard differs from its manifest's sha256: never cached (every attempt is
    refused), its samples read by range as without a cache."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(colour_shards, copy)
    m = load_manifest(copy)
    rewrite_shard(copy, "train", 0, 0, lambda mem: mem)  # same bytes, manifest entry rewritten
    url = f"{new_bucket()}/ds"
    upload_folder(copy, url)
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    from pipeline import objstore

    objstore.put(f"{url}/manifest.json", json.dumps(m).encode())
    cache_dir = tmp_path / "cache"
    loader = create_loader(url, workers=1, cache_dir=str(cache_dir), **KW)
    assert same_batches(collect(loader), local_epoch(colour_shards, 0))
    loader.table.cache._filler.wait(60)
    loader.close()
    assert loader.table.cache.name(0) not in cached_files(cache_dir)
    assert len(cached_files(cache_dir)) == len(m["splits"]["train"]["shards"]) - 1


def test_train_run_with_a_cache_dir(s3_proxy, bucket, colour_shards, tmp_path):
    """`python -m train.run --cache-dir DIR --cache-limit SIZE` on a bucket: the run trains, and every
    train and val shard is downloaded once, whatever the epochs."""
    cache_dir = tmp_path / "cache"
    r = run_cli("train.run", "--shards", bucket, "--cache-dir", cache_dir, "--cache-limit", "50M", "--arch", "resnet18",
                "--image-size", "32", "--device", "cpu", "-j", "1", "-b", "8", "--epochs", "2", "--warm-up-epochs", "0",
                "-p", "1", "--seed", "7", "--output", tmp_path / "run", env=cli_env(OMP_NUM_THREADS="1"), timeout=300,
                warm=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(colour_shards)["splits"]
    shards = len(m["train"]["shards"]) + len(m["val"]["shards"])
    whole = [q.key for q in s3_proxy.gets(TAR, ranged=False)]
    assert len(whole) == len(set(whole)) == shards == len(cached_files(cache_dir))


# -- block shuffle: a cache smaller than the dataset ---------------------------------------------

def test_block_permutation_keeps_each_stretch_within_its_block_of_shards():
    from pipeline import plan

    sizes = [5, 7, 6, 4, 8, 3, 9]
    starts = plan.shard_starts(sizes)
    shard = np.repeat(np.arange(len(sizes)), sizes)
    order = plan.block_permutation(sizes, 3, 1, 2)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert np.array_equal(order, plan.block_permutation(sizes, 3, 1, 2))  # a pure function
    assert not np.array_equal(order, plan.block_permutation(sizes, 3, 2, 2))  # each epoch its own
    pos = 0
    blocks = []
    while pos < len(order):  # consecutive blocks: two shards each (the last one, one)
        first = shard[order[pos]]
        block = {int(s) for s in shard[order[pos:]][:1]}
        n = 0
        seen = set()
        for sid in order[pos:]:
            seen.add(int(shard[sid]))
            if len(seen) > 2:
                break
            n += 1
        block = {int(shard[s]) for s in order[pos:pos + n]}
        assert n == sum(sizes[s] for s in block) and first in block
        blocks.append(block)
        pos += n
    assert [len(b) for b in blocks] == [2, 2, 2, 1] and set().union(*blocks) == set(range(len(sizes)))
    assert starts[-1] == len(order)


def test_block_shuffle_resumes_exactly_and_its_state_names_it(s3_env, bucket, colour_shards):
    def make():
        loader = create_loader(bucket, workers=1, block_shuffle=2, **KW)
        loader.set_epoch(1)
        return loader

    state = assert_resumes_exactly(make, 2, through_json=True)
    assert state["block_shuffle"] == 2
    local = create_loader(colour_shards, workers=1, worker_mode="thread", block_shuffle=2, **KW)
    local.set_epoch(1)
    assert same_batches(collect(make()), collect(local))  # the bucket and the local copy agree
    with pytest.raises(ValueError, match="block_shuffle"):
        create_loader(colour_shards, workers=1, **KW).load_state_dict(state)
    with pytest.raises(ValueError, match="block_shuffle"):
        create_loader(colour_shards, workers=1, block_shuffle=-1, **KW)


def test_a_cache_smaller_than_the_dataset_never_passes_its_limit(s3_proxy, bucket, colour_shards, tmp_path):
    """A limit of about two shards. A full permutation needs every shard in every stretch: the cache
    fills and keeps what it holds while the epoch still needs it (a shard is downloaded at most once
    an epoch, not once a batch), and the rest is read by range. A block shuffle of one shard a block
    moves the cache along with the blocks, so later epochs read much less by range."""
    entries = load_manifest(colour_shards)["splits"]["train"]["shards"]
    limit = sum(sorted(e["bytes"] for e in entries)[-2:])
    ranged_later = {}
    for block_shuffle in (0, 1):
        cache_dir = tmp_path / f"cache{block_shuffle}"
        options = dict(batch_size=4, image_size=24, device="cpu", seed=3, normalize=False, block_shuffle=block_shuffle)
        loader = create_loader(bucket, workers=1, cache_dir=str(cache_dir), cache_limit=limit, cache_fill="wait",
                               **options)
        local = create_loader(colour_shards, workers=1, worker_mode="thread", **options)
        ranged_later[block_shuffle] = 0
        for epoch in (0, 1, 2):
            before_whole, before_ranged = len(s3_proxy.gets(TAR, ranged=False)), len(s3_proxy.gets(TAR, ranged=True))
            loader.set_epoch(epoch)
            local.set_epoch(epoch)
            assert same_batches(collect(loader), collect(local))
            loader.table.cache._filler.wait(60)
            assert 0 < sum(cached_files(cache_dir).values()) <= limit
            whole = s3_proxy.gets(TAR, ranged=False)[before_whole:]
            assert len(whole) == len({r.key for r in whole}) <= len(entries)  # no shard twice in an epoch
            if epoch:
                ranged_later[block_shuffle] += len(s3_proxy.gets(TAR, ranged=True)) - before_ranged
        loader.close()
        local.close()
    assert ranged_later[1] < ranged_later[0] / 2, ranged_later


def test_a_download_landing_while_room_is_counted_still_counts(tmp_path, monkeypatch):
    """A download that lands (its file renamed into place, its reservation deleted) between another
    thread's listing of the folder and its reading of the reservations must count once, not vanish
    from both: else the other thread takes the room and the cache passes its limit. The race is
    forced: shard 0's download lands only after shard 1's room count has listed the folder."""
    import threading

    from pipeline import shard_cache as sc

    urls = ["s3://b/0.tar", "s3://b/1.tar"]
    cache = ShardCache(tmp_path, limit=1500, urls=urls, sizes=[1000, 1000])
    downloading, listed = threading.Event(), threading.Event()

    def get_file(url, local_path, check=None):
        tmp = Path(local_path).with_name("." + Path(local_path).name + ".partial")
        tmp.write_bytes(b"x" * 1000)
        if url == urls[0]:
            downloading.set()
            assert listed.wait(10)
        os.replace(tmp, local_path)

    own_entries = ShardCache._own_entries

    def listing_then_landing(self):
        entries = own_entries(self)
        if downloading.is_set() and threading.current_thread() is threading.main_thread():
            listed.set()
            reservation = cache._reservation(0)
            deadline = time.monotonic() + 2
            while reservation.exists() and time.monotonic() < deadline:  # shard 0 lands now, if it can
                time.sleep(0.01)
        return entries

    monkeypatch.setattr(sc.objstore, "get_file", get_file)
    first = {}
    filler = threading.Thread(target=lambda: first.setdefault("fill", cache.fill(0)))
    filler.start()
    assert downloading.wait(10)
    monkeypatch.setattr(ShardCache, "_own_entries", listing_then_landing)
    assert cache.fill(1) == sc.NO_ROOM
    filler.join(10)
    assert first["fill"] == sc.CACHED
    assert sum(cached_files(tmp_path).values()) <= 1500, cached_files(tmp_path)


class _Reader:
    """A sample reader whose shards are all mapped from the cache (`mapped`) or none are."""

    def __init__(self, mapped: bool):
        self.is_mapped, self.fetched = mapped, []

    def mapped(self, ids) -> bool:
        return self.is_mapped

    def fetch(self, ids):
        self.fetched.append(list(ids))
        return {int(i): (b"", 0) for i in ids}


class _Decoder:
    def __init__(self, mapped: bool):
        self.samples = _Reader(mapped)

    def size_at(self, epoch) -> int:
        return 2  # the host slot's own size: no progressive resizing here

    def decode_batch(self, epoch, ids, images, labels, raw):
        return {"read_s": 0.0}


@pytest.mark.parametrize("mapped", [True, False])
def test_a_worker_fetches_ahead_only_what_needs_requests(mapped):
    """A batch whose shards are all mapped from the cache needs no request: the worker takes it as a
    local copy's worker does (one task at a time, no fetch thread), so a busy worker never holds
    batches an idle one could decode; a batch that needs range requests is fetched ahead."""
    import queue

    from pipeline.workers import _serve_ahead

    tasks, results = queue.Queue(), queue.Queue()
    for seq in range(4):
        tasks.put(("t", seq, 0, 1, [seq], None))
    tasks.put(None)
    decoder = _Decoder(mapped)
    img, lab = np.zeros((1, 1, 2, 2, 3), np.uint8), np.zeros((1, 1), np.int64)  # one slot of one 2 px image
    _serve_ahead(decoder, img, lab, tasks, results, ahead=2)
    answers = [results.get_nowait() for _ in range(4)]
    assert [a[1] for a in answers] == [0, 1, 2, 3] and all(a[4] is None for a in answers)
    # Ahead fetches go through `fetch`; a mapped batch's bytes are read when it is decoded.
    assert decoder.samples.fetched == ([] if mapped else [[0], [1], [2], [3]])
