"""Shards in object storage, against a real S3 API on loopback (moto's server mode, started by the
fixtures in conftest.py; tests/s3_server.py): the loader reads a bucket by range requests exactly
as it reads the local copy, survives dropped connections and throttling, names what is missing,
refuses hostile manifests; the converters write straight to a bucket, manifest last, and resume."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from conftest import assert_resumes_exactly, bucket_files, collect, folder_files, make_colour_folder, new_bucket, \
    run_cli, upload_folder, write_cifar10
from pipeline import ManifestError, ShardError, create_loader, objstore, plan
from pipeline.shard_format import MANIFEST_NAME, index_name, load_manifest
from pipeline.source import RANGED, open_split
from pipeline.workers import WorkerError

KW = dict(batch_size=8, image_size=24, device="cpu", seed=3, normalize=False)


def same_batches(a, b) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def bucket_copy(folder) -> str:
    url = f"{new_bucket()}/ds"
    upload_folder(folder, url)
    return url


# -- the loader ------------------------------------------------------------------------------------

def test_train_and_val_epochs_from_a_bucket_equal_the_local_copy(s3_env, s3_colour_shards, colour_shards):
    table = open_split(s3_colour_shards, "train")
    assert table.access == RANGED and len(table) == 60 and table.labels_known
    assert table.urls[0].startswith(s3_colour_shards + "/train-")
    # Forked workers after this process has used the client; then threads sharing one reader.
    for split, mode in (("train", "process"), ("val", "thread")):
        remote = create_loader(s3_colour_shards, split=split, workers=2, worker_mode=mode, **KW)
        local = create_loader(colour_shards, split=split, workers=2, worker_mode=mode, **KW)
        remote.set_epoch(1)
        local.set_epoch(1)
        if split == "train":  # random access: the full per-epoch permutation, no shuffle buffer
            want = plan.train_batches_local(60, 3, 1, 0, 1, 8)
            assert [b.tolist() for b in remote.batch_sample_ids()] == [b.tolist() for b in want]
            assert "shuffle_buffer" not in remote.state_dict()
        assert same_batches(collect(remote), collect(local))
        assert remote.stats.samples == local.stats.samples == (56 if split == "train" else 18)
        remote.close()


def test_forkserver_workers_see_their_owners_environment(s3_server, s3_colour_shards, colour_shards, monkeypatch):
    """A fork server keeps the environment of its first use: one started before the endpoint and
    credentials were set must still give its workers the owner's (as under torchrun, where the
    process group's start picks the forkserver)."""
    import multiprocessing.forkserver as forkserver

    from s3_server import CLEARED_ENV, env_for

    forkserver._forkserver._stop()  # a fresh one, started below without any S3 settings
    for k in (*CLEARED_ENV, *env_for(s3_server.endpoint)):
        monkeypatch.delenv(k, raising=False)
    local = create_loader(colour_shards, workers=1, start_method="forkserver", **KW)
    want = collect(local)
    local.close()
    for k, v in env_for(s3_server.endpoint).items():
        monkeypatch.setenv(k, v)
    remote = create_loader(s3_colour_shards, workers=1, start_method="forkserver", **KW)
    assert same_batches(collect(remote), want)
    remote.close()


def test_exact_mid_epoch_resume_from_a_bucket_and_across_copies(s3_env, s3_colour_shards, colour_shards):
    def from_bucket():
        loader = create_loader(s3_colour_shards, workers=1, start_method="forkserver", prefetch=3, **KW)
        loader.set_epoch(2)
        return loader

    assert_resumes_exactly(from_bucket, 3, through_json=True)
    # One plan for both copies: a state saved on the local copy resumes on the bucket's.
    local = create_loader(colour_shards, workers=1, **KW)
    local.set_epoch(2)
    it = iter(local)
    for _ in range(3):
        next(it)
    state = local.state_dict()
    tail_local = [(x.clone(), y.clone()) for x, y in it]
    resumed = from_bucket()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert same_batches(collect(resumed), tail_local)


def test_two_ranks_cover_the_split_exactly(s3_env, s3_colour_shards, colour_shards):
    opts = dict(KW, batch_size=7, workers=2, worker_mode="thread")
    train = [create_loader(s3_colour_shards, rank=r, world_size=2, **opts) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 30 // 7
    ids = [set(np.concatenate(t.batch_sample_ids()).tolist()) for t in train]
    assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == 28
    for r, t in enumerate(train):
        local = create_loader(colour_shards, rank=r, world_size=2, **opts)
        assert same_batches(collect(t), collect(local))
    val = [create_loader(s3_colour_shards, split="val", rank=r, world_size=2, **opts) for r in range(2)]
    parts = [np.concatenate(v.batch_sample_ids()) for v in val]
    assert sorted(np.concatenate(parts).tolist()) == list(range(18))
    got = sorted(int(y) for v in val for _, ys in collect(v) for y in ys)
    assert got == sorted(open_split(colour_shards, "val").label.tolist())


def test_a_connection_dropped_mid_transfer_is_retried(s3_proxy, s3_colour_shards, colour_shards):
    loader = create_loader(s3_colour_shards, workers=2, **KW)
    s3_proxy.cut(4)  # the next four range responses stop halfway through their body
    got = collect(loader)
    assert s3_proxy.cuts_done == 4
    assert same_batches(got, collect(create_loader(colour_shards, workers=2, **KW)))


def test_retries_beyond_the_clients_own_back_off_and_never_log_credentials(s3_proxy, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-never-logged")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNEVERLOGGED")
    monkeypatch.setattr(objstore, "BACKOFF_S", 0.01)
    url = f"{new_bucket()}/blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    objstore.put(url, data)
    # More cuts in a row than the client retries itself: this module's own retry takes over.
    s3_proxy.cut(7)
    with caplog.at_level(logging.WARNING, logger="pipeline.objstore"):
        got = objstore.read_ranges([url], [1000], [120_000])
    assert got == [data[1000:120_000]] and s3_proxy.cuts_done == 7
    warnings = [r.getMessage() for r in caplog.records]
    assert any(url in w and "retry 1/" in w for w in warnings)
    assert not any("sekrit" in w or "AKIDNEVERLOGGED" in w for w in warnings)
    s3_proxy.fail(3)  # throttled: 503 SlowDown three times
    assert objstore.get(url) == data and s3_proxy.failures_done == 3


def test_a_missing_object_fails_at_once_and_is_named(s3_env, colour_shards, monkeypatch):
    def no_retry(*args, **kw):
        raise AssertionError(f"retried: {args}")

    monkeypatch.setattr(objstore, "_wait", no_retry)  # a missing object is final
    url = bucket_copy(colour_shards)
    entries = load_manifest(colour_shards)["splits"]["train"]["shards"]
    with pytest.raises(FileNotFoundError, match=f"{url}/nope.tar: no such object"):
        objstore.get(f"{url}/nope.tar")
    with pytest.raises(ManifestError, match=f"{url}/elsewhere/{MANIFEST_NAME}: no manifest"):
        open_split(f"{url}/elsewhere", "train")

    loader = create_loader(url, workers=1, worker_mode="thread", **KW)  # opened while everything is there
    objstore.remove(f"{url}/{entries[1]['name']}")
    with pytest.raises(ShardError, match=f"shard {url}/{entries[1]['name']} is missing"):
        open_split(url, "train")
    with pytest.raises((ShardError, WorkerError), match=f"{url}/{entries[1]['name']}: no such object"):
        collect(loader)
    loader.close()
    upload_folder(colour_shards, url)
    objstore.remove(f"{url}/{entries[2]['index']}")
    with pytest.raises(ShardError, match=f"{url}/{entries[2]['index']} is missing"):
        open_split(url, "train")


@pytest.mark.parametrize("name", ["../secret.tar", "../../other/x.tar", "sub/../../x.tar", "s3://other-bucket/x.tar",
                                  "//other-bucket/x.tar", "/x.tar", "gs://other/x.tar", "pipe:cat /etc/passwd",
                                  "http://127.0.0.1:1/x.tar"])
def test_hostile_manifest_names_are_refused(s3_env, colour_shards, name):
    m = load_manifest(colour_shards)
    m["splits"]["train"]["shards"][0]["name"] = name
    url = f"{new_bucket()}/ds"
    objstore.put(f"{url}/{MANIFEST_NAME}", json.dumps(m).encode())
    with pytest.raises(ManifestError, match="refused"):
        open_split(url, "train")


def test_brace_patterns_and_foreign_shards_in_a_bucket(s3_env, s3_colour_shards, colour_shards, tmp_path):
    names = [e["name"] for e in load_manifest(colour_shards)["splits"]["train"]["shards"]]
    pattern = f"/train-{{000000..{len(names) - 1:06d}}}.tar"
    local = open_split(colour_shards, "train")
    with_manifest = open_split(s3_colour_shards + pattern, "train")
    assert with_manifest.ranged and with_manifest.classes == local.classes
    assert np.array_equal(with_manifest.label, local.label)
    # Foreign shards: no manifest beside them, so the labels come from the .cls members, by range.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for n in names:
        for f in (n, index_name(n)):
            (foreign / f).write_bytes((colour_shards / f).read_bytes())
    url = bucket_copy(foreign)
    table = open_split(url + pattern, "train")
    assert table.ranged and table.classes == [] and np.array_equal(table.label, local.label)
    assert same_batches(collect(create_loader(url + pattern, workers=1, **KW)),
                        collect(create_loader(colour_shards, workers=1, **KW)))
    with pytest.raises(ShardError, match="split 'train', not 'val'"):
        open_split(url + pattern, "val")


# -- the converters --------------------------------------------------------------------------------

class UploadLog:
    """Records uploads (and whether the bucket had a manifest then); can stop at one, as a killed
    run would."""

    def __init__(self, monkeypatch, url: str, stop_at: str | None = None):
        self.url, self.stop_at, self.names, self.manifest_seen = url, stop_at, [], []
        real = objstore.put_file

        def put_file(path, target):
            name = target.rsplit("/", 1)[-1]
            if name == self.stop_at:
                raise KeyboardInterrupt
            self.manifest_seen.append(objstore.exists(f"{self.url}/{MANIFEST_NAME}"))
            real(path, target)
            self.names.append(name)

        monkeypatch.setattr(objstore, "put_file", put_file)


def test_converting_to_a_bucket_uploads_the_manifest_last_and_resumes(s3_env, tmp_path, monkeypatch):
    from convert.imagenet_to_shards import convert

    src = make_colour_folder(tmp_path / "src", per_class=3, val_per_class=1)
    convert(src, tmp_path / "local", shard_size_mb=0.01, workers=1, progress=False)
    want = folder_files(tmp_path / "local")
    shards = sorted(n for n in want if n.endswith(".tar"))
    assert len(shards) >= 4
    url = f"{new_bucket()}/imagenet"
    staging = tmp_path / "staging"

    with monkeypatch.context() as m:  # killed while uploading the third shard
        log = UploadLog(m, url, stop_at=shards[2])
        with pytest.raises(KeyboardInterrupt):
            convert(src, url, shard_size_mb=0.01, workers=1, progress=False, staging=staging)
    assert not any(log.manifest_seen) and MANIFEST_NAME not in log.names
    assert set(shards[:2]) <= set(log.names) and MANIFEST_NAME not in objstore.listdir(url)
    with pytest.raises(ManifestError, match="no manifest"):
        open_split(url, "train")  # a reader sees no dataset until it is complete

    with monkeypatch.context() as m:  # rerun: finished shards are kept, the staged one uploaded
        log = UploadLog(m, url)
        convert(src, url, shard_size_mb=0.01, workers=1, progress=False, staging=staging)
    assert shards[2] in log.names and not set(shards[:2]) & set(log.names)
    assert log.names[-1] == MANIFEST_NAME and not any(log.manifest_seen)
    assert bucket_files(url) == want  # the same bytes as a local conversion
    assert list(staging.iterdir()) == []  # the converter's own subfolder is gone; the user's folder stays

    with monkeypatch.context() as m:  # again, staging gone: the bucket's manifest says what is done
        log = UploadLog(m, url)
        convert(src, url, shard_size_mb=0.01, workers=1, progress=False, staging=tmp_path / "fresh")
    assert log.names == [MANIFEST_NAME] and bucket_files(url) == want
    local, remote = open_split(tmp_path / "local", "val"), open_split(url, "val")
    assert np.array_equal(local.label, remote.label) and remote.ranged


def test_cifar_cli_converts_straight_to_a_bucket(s3_env, tmp_path, cifar_shards):
    url = f"{new_bucket()}/cifar"
    src = write_cifar10(tmp_path / "cifar-10-batches-py")  # the data of the cifar_shards fixture
    r = run_cli("convert.cifar_to_shards", "--src", src, "--out", url, "--staging", tmp_path / "staging",
                "--shard-size-mb", 0.06, "--workers", 1, "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    assert bucket_files(url) == folder_files(cifar_shards)


# -- the optional extras ---------------------------------------------------------------------------

def test_a_missing_extra_names_the_package_to_install(s3_env, tmp_path, monkeypatch):
    from convert.cifar_to_shards import convert
    from convert.runner import ConvertError

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ImportError, match="pip install s3fs"):
        objstore.get("s3://test-bucket/x")
    with pytest.raises(ImportError, match="pip install gcsfs"):
        objstore.exists("gs://test-bucket/x")
    with pytest.raises(ImportError, match="pip install s3fs"):
        create_loader("s3://test-bucket/ds", device="cpu")
    with pytest.raises(ConvertError, match="pip install s3fs"):
        convert(write_cifar10(tmp_path / "cifar"), "s3://test-bucket/out", workers=1, progress=False,
                staging=tmp_path / "staging")


# -- the object store module -----------------------------------------------------------------------

def test_object_store_functions_round_trip(s3_bucket, tmp_path):
    url = f"{s3_bucket}/dir/a.bin"
    data = bytes(range(256)) * 100
    assert not objstore.exists(url) and objstore.listdir(f"{s3_bucket}/dir") == {}
    objstore.put(url, data)
    (tmp_path / "b.bin").write_bytes(data[::-1])
    objstore.put_file(tmp_path / "b.bin", f"{s3_bucket}/dir/b.bin")
    assert objstore.exists(url) and objstore.size(url) == len(data)
    assert objstore.listdir(f"{s3_bucket}/dir") == {"a.bin": len(data), "b.bin": len(data)}
    assert objstore.get(f"{s3_bucket}/dir/b.bin") == data[::-1]
    objstore.get_file(url, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data and not list(tmp_path.glob(".*.partial"))
    starts, ends = [5000, 0, 10, 12, 20_000, 100], [5100, 4, 20, 30, 25_600, 100]  # overlaps, adjacent, empty
    assert objstore.read_ranges([url] * 6, starts, ends) == [data[s:e] for s, e in zip(starts, ends)]
    assert objstore.get_many([url, f"{s3_bucket}/dir/b.bin"]) == [data, data[::-1]]
    objstore.remove(url)
    objstore.remove(url)  # already gone: no error
    assert objstore.listdir(f"{s3_bucket}/dir") == {"b.bin": len(data)}


def test_whole_object_reads_and_copies_make_one_request_each(s3_proxy, tmp_path):
    """A whole-object read is one GET (s3fs would first HEAD it, to split a large one into
    concurrent ranges: a second request and round trip for every manifest, index and record
    file); a copy is one server-side COPY after the HEAD that sizes it (fsspec's generic copy
    first lists both names, to tell folders from objects)."""
    bucket = new_bucket()
    urls = [f"{bucket}/dir/{n}" for n in ("a.idx", "b.idx", "c.idx")]
    for i, u in enumerate(urls):
        objstore.put(u, bytes([i]) * 1000)
    seen = len(s3_proxy.requests)

    def requests_since():
        nonlocal seen
        made, seen = [(r.method, r.key.rsplit("/", 1)[-1]) for r in s3_proxy.requests[seen:]], len(s3_proxy.requests)
        return made

    assert objstore.get(urls[0]) == b"\0" * 1000
    assert requests_since() == [("GET", "a.idx")]
    assert objstore.get_many(urls) == [bytes([i]) * 1000 for i in range(3)]
    assert sorted(requests_since()) == [("GET", "a.idx"), ("GET", "b.idx"), ("GET", "c.idx")]
    objstore.copy(urls[0], f"{bucket}/dir/copy.idx")
    assert requests_since() == [("HEAD", "a.idx"), ("COPY", "copy.idx")]
    assert objstore.get(f"{bucket}/dir/copy.idx") == b"\0" * 1000
    assert requests_since() == [("GET", "copy.idx")]
    with pytest.raises(objstore.ObjectNotFound, match="dir/gone.idx"):
        objstore.copy(f"{bucket}/dir/gone.idx", f"{bucket}/dir/copy.idx")
    assert objstore.get(f"{bucket}/dir/copy.idx") == b"\0" * 1000  # a failed copy leaves its target


def test_nearby_ranges_of_a_batch_are_merged_into_one_request():
    u, v = "s3://b/x.tar", "s3://b/y.tar"
    requests, where = objstore._merge([(u, 5000, 6000), (u, 0, 1000), (v, 0, 10), (u, 1500, 2000),
                                       (u, 10**8, 10**8 + 5)], gap=4096)
    assert requests == [(u, 0, 6000), (u, 10**8, 10**8 + 5), (v, 0, 10)]
    assert where == [(0, 5000, 6000), (0, 0, 1000), (2, 0, 10), (0, 1500, 2000), (1, 0, 5)]


def test_transient_errors_are_told_from_final_ones():
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    for e in (ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "Internal"), client_error(503, "SlowDown"),
              client_error(500, "InternalError"), EndpointConnectionError(endpoint_url="http://x"),
              objstore.ShortRead("short")):
        assert objstore.is_transient(e), e
    for e in (FileNotFoundError(), PermissionError(), OSError(errno.EINVAL, "bad range"), client_error(403, "Denied"),
              NoCredentialsError(), ValueError()):
        assert not objstore.is_transient(e), e
    assert objstore.redact("failed: http://user:pw@host:9/b/k") == "failed: http://host:9/b/k"
    assert objstore.is_object_url("s3://b/k") and objstore.is_object_url("gs://b") and not objstore.is_object_url("/s3")
    with pytest.raises(ValueError, match="names no bucket"):
        objstore.split_url("s3:///k")
