"""The fault matrix: each cell names a phase of a long job and a fault injected there, and asserts
that the job either continues from the newest good state, or stops with an error that names the
cause. No cell may start afresh over a checkpoint, or lose a shard, a record row (metrics.jsonl)
or a user's file. The matrix (cells x verdict) is printed at the end of the test output
(conftest.py, `pytest_terminal_summary`).

Everything goes through the loopback S3 server and the fault-injecting proxy in front of it
(s3_server.FaultProxy): S3 errors on chosen requests, connections cut during an upload or a
download, and requests held unanswered, so that a converter or a training run (a real process)
is SIGKILLed exactly there. A full staging disk is a file size limit (RLIMIT_FSIZE, set on the
running process with prlimit): the process's real writes fail, with EFBIG where a full disk
gives ENOSPC.

Phases: conversion to a bucket (during a shard upload, between shards, during the manifest
upload); training with `--output s3://...` (the local checkpoint save, the bucket PUT, the
server-side copy that keeps the previous checkpoint, the resume download); restarts (rank 0 on
another node; A -> B -> A).

The processes that are killed or run out of disk are forked from one that has done the imports
(conftest.Forker), so each starts in a fraction of a second. In them as in this process, the S3
clients' own retries are off (one attempt per call) and the project's back-off is short: the
project's retries are what meets a fault, and a fault that outlasts them ends in a second rather
than a minute. The cells that need no process of their own run the command lines in this process.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import Forker, WarmChild, bucket_files, folder_files, make_colour_folder, new_bucket
from pipeline import objstore
from pipeline.shard_format import MANIFEST_NAME, index_name
from s3_server import CLEARED_ENV, FaultProxy, env_for
from train import checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit and SIGKILL of a process")

CONTINUES, STOPS = "continues", "stops"
SIGKILL, CUT, THROTTLED, DENIED, MISSING, DISK_FULL = ("SIGKILL", "connection cut", "503", "access denied",
                                                       "object missing", "disk full")
UPLOAD, BETWEEN, MANIFEST = "convert: during a shard upload", "convert: between shards", "convert: manifest upload"
SAVE, PUT, COPY, DOWNLOAD = ("train: local checkpoint save", "train: checkpoint PUT", "train: server-side copy",
                             "train: resume download")
OTHER_NODE, A_B_A = "restart: rank 0 on another node", "restart: A -> B -> A"


def cell(phase: str, fault: str, verdict: str):
    return pytest.mark.fault_cell(phase, fault, verdict)


TIMEOUT_S = 120
SHARD_MB = 0.01  # about 10 KB: seven shards
CONVERT_FLAGS = ["--shard-size-mb", str(SHARD_MB), "--workers", "1", "--no-progress"]
# The tiny dataset's plan (18 train samples, 2 a batch: 9 steps an epoch) with the synthetic
# backend's batches: the faults here are in the run folder, and decoding would only add time. No
# momentum: a checkpoint without momentum buffers is half the size (45 MB), each transfer half as long.
TRAIN_FLAGS = ["--arch", "resnet18", "--image-size", "32", "--stem", "imagenet", "--device", "cpu",
               "--backend", "synthetic", "-b", "2", "--epochs", "2", "--lr", "0.02", "--warm-up-epochs", "0", "-p", "1",
               "--seed", "7", "--momentum", "0", "--resume", "auto"]
NEWEST, PREVIOUS = checkpoint.NEWEST, checkpoint.PREVIOUS
USER_FILE, USER_BYTES = "notes.txt", b"the user's own file, kept beside the staged shards\n"
# A full disk, here: the process may write files of at most this size. Shards are at least 10 KB
# (a tar's record); checkpoints 45 MB; the run's log and metrics stay far below 64 KB.
STAGING_FULL_AT, MIRROR_FULL_AT = 8 << 10, 64 << 10
DISK_FULL_MESSAGE = os.strerror(errno.EFBIG)
# The processes that are killed or run out of disk: forked warm (conftest.Forker), with the S3
# client settings of this process.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CHILD_SETUP = "import s3fs; from pipeline import objstore; s3fs.S3FileSystem.retries = 1; objstore.BACKOFF_S = 0.01"


# -- the setup every cell shares -------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxy(s3_server, tmp_path_factory):
    """The proxy that every request of this module goes through, the environment pointing at it
    (in this process and its children), with the S3 clients' own retries off."""
    import s3fs

    proxy = FaultProxy(("127.0.0.1", s3_server.port))
    with pytest.MonkeyPatch.context() as mp:
        for k in CLEARED_ENV:
            mp.delenv(k, raising=False)
        for k, v in env_for(proxy.endpoint).items():
            mp.setenv(k, v)
        mp.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries (here and in the children)
        mp.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's (here)
        mp.setattr(objstore, "BACKOFF_S", 0.01)
        # Default staging and run mirrors: never the user's own cache.
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
        # One thread for the runs trained in this process, as their children have (OMP_NUM_THREADS):
        # on a busy machine a second one makes each step several times slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield proxy
        finally:
            torch.set_num_threads(threads)
    proxy.close()


@pytest.fixture(scope="module")
def forker(proxy):
    """Starts the processes that are killed or run out of disk (after `proxy`: its environment)."""
    forker = Forker(["train.run", "convert.imagenet_to_shards", "torchvision", "s3fs"], CHILD_SETUP, CHILD_ENV)
    yield forker
    forker.close()


@pytest.fixture(autouse=True)
def no_fault_outlives_its_cell(request):
    yield
    if "proxy" in request.fixturenames:
        request.getfixturevalue("proxy").clear()


@pytest.fixture(scope="module")
def bucket(proxy) -> str:
    return new_bucket()


def key_prefix(url: str) -> str:
    """How the proxy names the objects under the prefix `url`: "bucket/prefix/"."""
    _, bucket, prefix = objstore.split_url(url)
    return f"{bucket}/{prefix}/"


def key_of(url: str, name: str = "", pattern: str = "") -> str:
    """The proxy's key pattern for the object `name` (or the objects matching the regular
    expression `pattern`) under the prefix `url`."""
    return re.escape(key_prefix(url)) + (pattern or re.escape(name)) + "$"


@dataclass
class Dataset:
    src: Path
    local: Path  # the same images converted to a local folder
    files: dict[str, bytes]  # ...and its files: what every bucket conversion must hold, byte for byte

    @property
    def train_tars(self) -> list[str]:
        return sorted(n for n in self.files if n.startswith("train-") and n.endswith(".tar"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    from convert.imagenet_to_shards import convert

    base = tmp_path_factory.mktemp("fault-data")
    src = make_colour_folder(base / "src", per_class=3, val_per_class=1)
    convert(src, base / "local", shard_size_mb=SHARD_MB, workers=1, progress=False)
    data = Dataset(src, base / "local", folder_files(base / "local"))
    assert len(data.train_tars) >= 4, sorted(data.files)
    return data


def wait_for(done, proc: WarmChild, log: Path, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} in {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.005)


def kill_at(proc: WarmChild, done, log: Path, what: str) -> None:
    """SIGKILL the process once `done()` says it is at the phase `what`."""
    try:
        wait_for(done, proc, log, what)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def disk_full(proc: WarmChild, at: int) -> None:
    """From now on the process's writes past `at` bytes of a file fail, as on a full disk."""
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (at, at))


def finished(proc: WarmChild, log: Path) -> tuple[int, str]:
    try:
        proc.wait(TIMEOUT_S)
    finally:
        proc.kill()
    return proc.returncode, log.read_text()


def error_line(text: str) -> str:
    """The one-line error a command ends with (`error: ...`), or its last line."""
    lines = [x for x in text.splitlines() if x.strip()]
    return next((x for x in reversed(lines) if x.startswith("error: ")), lines[-1] if lines else "")


# -- conversion to a bucket ---------------------------------------------------------------------------

def scratch(tmp_path: Path) -> Path:
    """A --staging folder in which the user already keeps a file of their own."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / USER_FILE).write_bytes(USER_BYTES)
    return folder


def convert_args(dataset: Dataset, url: str, staging: Path) -> list[str]:
    return ["--src", str(dataset.src), "--out", url, "--staging", str(staging), *CONVERT_FLAGS]


def convert_here(dataset: Dataset, url: str, staging: Path) -> tuple[int, str]:
    """The converter's command line, run in this process: (exit status, its stderr)."""
    from convert.imagenet_to_shards import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(convert_args(dataset, url, staging))
    return rc, err.getvalue()


def start_converting(forker: Forker, dataset: Dataset, url: str, staging: Path, log: Path):
    """The converter's command line, in a process of its own."""
    return forker.start("convert.imagenet_to_shards:main", convert_args(dataset, url, staging), log)


def assert_converted(url: str, dataset: Dataset, staging: Path) -> None:
    """The bucket holds the dataset, byte for byte as a local conversion writes it, manifest
    included; the user's file in the staging folder is still there."""
    got = bucket_files(url)
    assert sorted(got) == sorted(dataset.files), f"shards missing or extra: {sorted(set(dataset.files) ^ set(got))}"
    differ = [n for n in got if got[n] != dataset.files[n]]
    assert not differ, f"objects differ from a local conversion: {differ}"
    assert (staging / USER_FILE).is_file(), f"the user's file in --staging was deleted (with {staging})"
    assert (staging / USER_FILE).read_bytes() == USER_BYTES


def assert_no_dataset_yet(url: str, shards: list[str]) -> None:
    """A reader sees no dataset (no manifest), and the shards uploaded before the fault are there."""
    names = objstore.listdir(url)
    assert MANIFEST_NAME not in names, "the manifest was uploaded before every shard was in place"
    missing = [n for s in shards for n in (s, index_name(s)) if n not in names]
    assert not missing, f"uploaded shards lost: {missing}"


def shards_put_since(proxy: FaultProxy, n: int, url: str) -> list[str]:
    """The shards and indexes under `url` uploaded since the proxy's n-th request."""
    prefix = key_prefix(url)
    return [r.key[len(prefix):] for r in proxy.requests[n:] if r.method == "PUT" and r.key.startswith(prefix)
            and r.key.endswith((".tar", ".idx"))]


@cell(UPLOAD, SIGKILL, CONTINUES)
def test_convert_killed_during_a_shard_upload(proxy, forker, bucket, dataset, tmp_path):
    url, staging, shard = f"{bucket}/upload-kill", scratch(tmp_path), dataset.train_tars[2]
    held = proxy.inject("hold", "PUT", key_of(url, shard))
    proc = start_converting(forker, dataset, url, staging, tmp_path / "log")
    kill_at(proc, lambda: held.done, tmp_path / "log", f"the upload of {shard}")
    held.release()
    assert_no_dataset_yet(url, dataset.train_tars[:2])
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert_converted(url, dataset, staging)


@cell(UPLOAD, CUT, CONTINUES)
def test_convert_with_a_connection_cut_during_a_shard_upload(proxy, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/upload-cut", scratch(tmp_path)
    cut = proxy.inject("cut-request", "PUT", key_of(url, dataset.train_tars[1]), times=1)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0 and cut.done == 1, err
    assert_converted(url, dataset, staging)


@cell(UPLOAD, THROTTLED, CONTINUES)
def test_convert_throttled_during_a_shard_upload(proxy, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/upload-503", scratch(tmp_path)
    slow = proxy.inject("503", "PUT", key_of(url, dataset.train_tars[1]), times=2)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0 and slow.done == 2, err
    assert_converted(url, dataset, staging)


@cell(UPLOAD, DENIED, STOPS)
def test_convert_denied_a_shard_upload(proxy, bucket, dataset, tmp_path):
    url, staging, shard = f"{bucket}/upload-denied", scratch(tmp_path), dataset.train_tars[1]
    proxy.inject("403", "PUT", key_of(url, shard))
    rc, err = convert_here(dataset, url, staging)
    assert rc == 2, err
    assert f"{url}/{shard}" in error_line(err) and "access denied" in error_line(err), err
    assert_no_dataset_yet(url, dataset.train_tars[:1])
    proxy.clear()  # access granted: the same command finishes the job
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert_converted(url, dataset, staging)


@cell(BETWEEN, SIGKILL, CONTINUES)
def test_convert_killed_between_shards(proxy, forker, bucket, dataset, tmp_path):
    # Held at the first request of shard 2 (its index): shards 0 and 1 are in the bucket, shard 2
    # is written in staging and nothing of it has reached the bucket.
    url, staging, shard = f"{bucket}/between-kill", scratch(tmp_path), dataset.train_tars[2]
    held = proxy.inject("hold", "PUT", key_of(url, index_name(shard)))
    proc = start_converting(forker, dataset, url, staging, tmp_path / "log")
    kill_at(proc, lambda: held.done, tmp_path / "log", f"the upload of {index_name(shard)}")
    held.release()
    assert_no_dataset_yet(url, dataset.train_tars[:2])
    n = len(proxy.requests)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert not set(dataset.train_tars[:2]) & set(shards_put_since(proxy, n, url)), "finished shards redone"
    assert_converted(url, dataset, staging)


@cell(BETWEEN, MISSING, CONTINUES)
def test_convert_rerun_after_an_uploaded_shard_went_missing(proxy, bucket, dataset, tmp_path):
    url, staging, first = f"{bucket}/between-missing", scratch(tmp_path), dataset.train_tars[0]
    proxy.inject("403", "PUT", key_of(url, dataset.train_tars[3]))  # the first run stops there
    rc, err = convert_here(dataset, url, staging)
    assert rc == 2, err
    proxy.clear()
    objstore.remove(f"{url}/{first}")  # a shard the first run uploaded is gone from the bucket
    n = len(proxy.requests)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert first in shards_put_since(proxy, n, url), "the missing shard was not written again"
    assert_converted(url, dataset, staging)


@cell(BETWEEN, DISK_FULL, STOPS)
def test_convert_with_the_staging_disk_full_between_shards(proxy, forker, bucket, dataset, tmp_path):
    # The disk fills while shard 1 uploads: writing shard 2 in staging fails.
    url, staging, shard = f"{bucket}/between-full", scratch(tmp_path), dataset.train_tars[1]
    held = proxy.inject("hold", "PUT", key_of(url, shard), times=1)
    proc = start_converting(forker, dataset, url, staging, tmp_path / "log")
    wait_for(lambda: held.done, proc, tmp_path / "log", f"the upload of {shard}")
    disk_full(proc, STAGING_FULL_AT)
    held.release()  # the upload is retried and goes through; the next shard's write fails
    rc, out = finished(proc, tmp_path / "log")
    assert rc != 0, out
    line = error_line(out)
    assert DISK_FULL_MESSAGE in line and str(staging) in line, \
        f"the error does not name the cause and the staging folder: {line!r}"
    assert_no_dataset_yet(url, dataset.train_tars[:2])
    rc, err = convert_here(dataset, url, staging)  # space freed: the same command finishes the job
    assert rc == 0, err
    assert_converted(url, dataset, staging)


@cell(MANIFEST, SIGKILL, CONTINUES)
def test_convert_killed_during_the_manifest_upload(proxy, forker, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/manifest-kill", scratch(tmp_path)
    held = proxy.inject("hold", "PUT", key_of(url, MANIFEST_NAME))
    proc = start_converting(forker, dataset, url, staging, tmp_path / "log")
    kill_at(proc, lambda: held.done, tmp_path / "log", "the manifest upload")
    held.release()
    assert_no_dataset_yet(url, dataset.train_tars)
    n = len(proxy.requests)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert not shards_put_since(proxy, n, url), f"the rerun uploaded shards again: {shards_put_since(proxy, n, url)}"
    assert_converted(url, dataset, staging)


@cell(MANIFEST, CUT, CONTINUES)
def test_convert_with_a_connection_cut_during_the_manifest_upload(proxy, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/manifest-cut", scratch(tmp_path)
    cut = proxy.inject("cut-request", "PUT", key_of(url, MANIFEST_NAME), times=1)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0 and cut.done == 1, err
    assert_converted(url, dataset, staging)


@cell(MANIFEST, THROTTLED, CONTINUES)
def test_convert_throttled_during_the_manifest_upload(proxy, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/manifest-503", scratch(tmp_path)
    slow = proxy.inject("503", "PUT", key_of(url, MANIFEST_NAME), times=2)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0 and slow.done == 2, err
    assert_converted(url, dataset, staging)


@cell(MANIFEST, DENIED, STOPS)
def test_convert_denied_the_manifest_upload(proxy, bucket, dataset, tmp_path):
    url, staging = f"{bucket}/manifest-denied", scratch(tmp_path)
    proxy.inject("403", "PUT", key_of(url, MANIFEST_NAME))
    rc, err = convert_here(dataset, url, staging)
    assert rc == 2, err
    assert f"{url}/{MANIFEST_NAME}" in error_line(err) and "access denied" in error_line(err), err
    assert_no_dataset_yet(url, dataset.train_tars)
    proxy.clear()
    n = len(proxy.requests)
    rc, err = convert_here(dataset, url, staging)
    assert rc == 0, err
    assert not shards_put_since(proxy, n, url), f"the rerun uploaded shards again: {shards_put_since(proxy, n, url)}"
    assert_converted(url, dataset, staging)


# -- training with --output s3://... -----------------------------------------------------------------

@dataclass
class Run:
    url: str  # --output
    disks: Path  # node N's disk (its RESNET_RUN_CACHE) is disks / N

    def mirror(self, node: str) -> Path:
        """Node `node`'s local mirror of the run folder."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RESNET_RUN_CACHE", str(self.disks / node))
            return checkpoint.local_folder(self.url)


@dataclass
class Attempt:
    rc: int
    out: str  # stdout and stderr (the log lines, warnings, the error)

    def resumed_line(self) -> str:
        return next((x for x in self.out.splitlines() if x.startswith("=> resumed from")), "")


def train_here(run: Run, node: str, dataset: Dataset, *flags: str) -> Attempt:
    """`python -m train.run` in this process, on node `node`'s disk."""
    from train.run import main

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        warnings.simplefilter("always")
        mp.setenv("RESNET_RUN_CACHE", str(run.disks / node))
        rc = main(["--shards", str(dataset.local), *TRAIN_FLAGS, "--output", run.url, *flags])
    return Attempt(rc, out.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught))


def start_training(forker: Forker, run: Run, node: str, dataset: Dataset, log: Path, *flags: str):
    """`python -m train.run` in a process of its own, on node `node`'s disk."""
    return forker.start("train.run:main", ["--shards", dataset.local, *TRAIN_FLAGS, "--output", run.url, *flags],
                        log, {"RESNET_RUN_CACHE": str(run.disks / node)})


class _WithoutTensors(pickle.Unpickler):
    """Unpickles a checkpoint's data.pkl with each tensor left out (None)."""

    def find_class(self, module, name):
        return (lambda *args, **kw: None) if module.split(".")[0] == "torch" else super().find_class(module, name)

    def persistent_load(self, pid):
        return None


def step_of(url: str) -> int | None:
    """The step of a checkpoint in the bucket, read from its pickle alone: two range reads (the zip's
    directory at the end, its pickle at the start), no tensor downloaded. The block cache keeps both
    blocks: the zip reader seeks back and forth, which a read-ahead cache answers with a request
    each (five), and the test server reads the whole 45 MB object for every range it serves."""
    if not objstore.exists(url):
        return None
    with objstore.filesystem(url).open(url.split("://", 1)[1], "rb", block_size=1 << 16,
                                       cache_type="blockcache") as f, zipfile.ZipFile(f) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        return int(_WithoutTensors(io.BytesIO(archive.read(pickled))).load()["step"])


def record_steps(url: str) -> list[int]:
    """The steps of the loss rows in the bucket's metrics.jsonl."""
    rows = [json.loads(x) for x in objstore.get(f"{url}/metrics.jsonl").decode().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def state(run: Run) -> tuple[int | None, int | None, list[int]]:
    """(newest checkpoint's step, previous checkpoint's step, loss rows' steps), in the bucket."""
    return step_of(f"{run.url}/{NEWEST}"), step_of(f"{run.url}/{PREVIOUS}"), record_steps(run.url)


BASE = (4, 2, [1, 2, 3, 4])


@pytest.fixture(scope="module")
def base_run(proxy, bucket, dataset, tmp_path_factory) -> Run:
    """A run trained on node A to step 4: checkpoints of steps 4 (newest) and 2 (previous), loss
    rows 1 to 4, in the bucket. Every training cell starts from a copy of it."""
    run = Run(f"{bucket}/base", tmp_path_factory.mktemp("base-disks"))
    attempt = train_here(run, "A", dataset, "--max-steps", "4", "--save-every", "2")
    assert attempt.rc == 0, attempt.out[-3000:]
    assert state(run) == BASE
    return run


def new_run(base: Run, name: str, tmp_path: Path) -> Run:
    """A copy of the base run in the bucket, and of node A's mirror of it."""
    run = Run(f"{base.url.rsplit('/', 1)[0]}/{name}", tmp_path / "disks")
    for obj in objstore.listdir(base.url):
        objstore.copy(f"{base.url}/{obj}", f"{run.url}/{obj}")
    shutil.copytree(base.mirror("A"), run.mirror("A"))
    return run


def assert_continued(attempt: Attempt, run: Run, checkpoint_name: str, at: int, to: int) -> None:
    """The attempt resumed from `checkpoint_name` at step `at`, trained to step `to`, and left the
    bucket with its checkpoint and every loss row from step 1 to `to`, each once."""
    assert attempt.rc == 0, attempt.out[-3000:]
    assert "starting afresh" not in attempt.out, "started afresh over a checkpoint"
    want = f"=> resumed from {run.url}/{checkpoint_name}: step {at},"
    assert attempt.resumed_line().startswith(want), f"expected {want!r}, got {attempt.resumed_line()!r}"
    newest, rows = step_of(f"{run.url}/{NEWEST}"), record_steps(run.url)
    assert newest == to, f"the bucket's newest checkpoint is of step {newest}, not {to}"
    assert rows == list(range(1, to + 1)), f"record rows lost or doubled: loss rows of steps {rows}"


def assert_stopped(attempt: Attempt, run: Run, proxy: FaultProxy, *names: str | tuple[str, ...], before=BASE,
                   resumed: bool = False) -> None:
    """The attempt stopped, with an error naming each of `names` (a tuple: one of them), without
    resuming (`resumed`: after resuming from the newest checkpoint); the bucket's checkpoints and
    record are then `before`."""
    line = error_line(attempt.out)
    assert "starting afresh" not in attempt.out, f"started afresh over checkpoints it could not read ({line!r})"
    if resumed:
        assert attempt.resumed_line().startswith(f"=> resumed from {run.url}/{NEWEST}: step {BASE[0]},"), \
            attempt.out[-3000:]
    else:
        assert not attempt.resumed_line(), f"went on instead of stopping: {attempt.resumed_line()!r}"
    assert attempt.rc != 0, attempt.out[-3000:]
    for name in names:
        alternatives = name if isinstance(name, tuple) else (name,)
        assert any(a in line for a in alternatives), f"the error does not name {' or '.join(alternatives)}: {line!r}"
    proxy.clear()
    got = state(run)
    assert got == before, f"the bucket's (newest, previous, record rows) went from {before} to {got}"


@cell(SAVE, SIGKILL, CONTINUES)
def test_train_killed_during_the_local_checkpoint_save(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "save-kill", tmp_path)
    partial = run.mirror("A") / f".{NEWEST}.partial"
    held = proxy.inject("hold", "COPY", key_of(run.url, PREVIOUS))  # no further than the save's first change
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "6", "--save-every", "1")
    kill_at(proc, lambda: partial.exists() or held.done, tmp_path / "log", "the local checkpoint save")
    held.release()
    assert state(run) == BASE
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(SAVE, DISK_FULL, STOPS)
def test_train_with_the_disk_full_at_the_local_checkpoint_save(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "save-full", tmp_path)
    log = run.mirror("A") / "train.log"
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "6", "--save-every", "1")
    wait_for(lambda: "=> resumed from" in log.read_text(), proc, tmp_path / "log", "the resume")
    disk_full(proc, MIRROR_FULL_AT)  # resumed (its download is done): the save after step 5 fails
    rc, out = finished(proc, tmp_path / "log")
    assert_stopped(Attempt(rc, out), run, proxy, DISK_FULL_MESSAGE, str(run.mirror("A")), resumed=True)


@cell(PUT, SIGKILL, CONTINUES)
def test_train_killed_during_the_checkpoint_put(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "put-kill", tmp_path)
    held = proxy.inject("hold", "PUT", key_of(run.url, NEWEST))
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "5")
    kill_at(proc, lambda: held.done, tmp_path / "log", "the checkpoint upload")
    held.release()
    assert state(run) == (4, 4, BASE[2])  # the newest was copied to the previous one, then the PUT died
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(PUT, CUT, CONTINUES)
def test_train_with_a_connection_cut_during_the_checkpoint_put(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "put-cut", tmp_path)
    cut = proxy.inject("cut-request", "PUT", key_of(run.url, NEWEST), times=1)
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert cut.done == 1
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(PUT, THROTTLED, CONTINUES)
def test_train_throttled_during_the_checkpoint_put(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "put-503", tmp_path)
    slow = proxy.inject("503", "PUT", key_of(run.url, NEWEST), times=2)
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert slow.done == 2
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(PUT, DENIED, STOPS)
def test_train_denied_the_checkpoint_put(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "put-denied", tmp_path)
    proxy.inject("403", "PUT", key_of(run.url, NEWEST))
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    # Stopped at its first save: the newest checkpoint had been copied to the previous one.
    assert_stopped(attempt, run, proxy, f"{run.url}/{NEWEST}", "access denied", before=(4, 4, BASE[2]),
                   resumed=True)


@cell(COPY, SIGKILL, CONTINUES)
def test_train_killed_during_the_server_side_copy(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "copy-kill", tmp_path)
    held = proxy.inject("hold", "COPY", key_of(run.url, PREVIOUS))
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "5")
    kill_at(proc, lambda: held.done, tmp_path / "log", "the server-side copy")
    held.release()
    assert state(run) == BASE
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(COPY, THROTTLED, CONTINUES)
def test_train_throttled_during_the_server_side_copy(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "copy-503", tmp_path)
    slow = proxy.inject("503", "COPY", key_of(run.url, PREVIOUS), times=2)
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert slow.done == 2
    assert_continued(attempt, run, NEWEST, 4, 5)
    assert step_of(f"{run.url}/{PREVIOUS}") == 4


@cell(COPY, DENIED, STOPS)
def test_train_denied_the_server_side_copy(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "copy-denied", tmp_path)
    proxy.inject("403", "COPY", key_of(run.url, PREVIOUS))
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_stopped(attempt, run, proxy, run.url, "access denied", resumed=True)


@cell(COPY, MISSING, STOPS)
def test_train_finds_the_newest_checkpoint_gone_at_the_server_side_copy(proxy, base_run, dataset, tmp_path):
    # The newest checkpoint disappears between the save's look and its copy (another writer).
    run = new_run(base_run, "copy-missing", tmp_path)
    proxy.inject("404", "COPY", key_of(run.url, PREVIOUS))
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_stopped(attempt, run, proxy, f"{run.url}/{NEWEST}", resumed=True)  # the missing one, not the copy's target


@cell(DOWNLOAD, SIGKILL, CONTINUES)
def test_train_killed_during_the_resume_download(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "download-kill", tmp_path)
    mirror = run.mirror("A")

    def leftovers() -> list[Path]:
        return sorted(p for p in mirror.iterdir() if ".resume-" in p.name or p.name.endswith(".partial"))

    stalled = proxy.inject("stall", "GET", key_of(run.url, NEWEST), times=1)
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "5")
    kill_at(proc, lambda: stalled.done and any(p.stat().st_size for p in leftovers()), tmp_path / "log",
            "a half-downloaded checkpoint")
    stalled.release()
    assert state(run) == BASE
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_continued(attempt, run, NEWEST, 4, 5)
    assert not leftovers(), f"the killed download's file is left in the mirror: {[p.name for p in leftovers()]}"


@cell(DOWNLOAD, CUT, CONTINUES)
def test_train_with_a_connection_cut_during_the_resume_download(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "download-cut", tmp_path)
    cut = proxy.inject("cut-response", "GET", key_of(run.url, NEWEST), times=1)
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert cut.done == 1
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(DOWNLOAD, THROTTLED, STOPS)
def test_train_throttled_past_the_retries_at_the_resume_download(proxy, base_run, dataset, tmp_path):
    # Every GET of the newest checkpoint is refused: the run must neither take the older one
    # (it would redo steps the newest holds) nor start afresh.
    run = new_run(base_run, "download-503", tmp_path)
    proxy.inject("503", "GET", key_of(run.url, NEWEST))
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_stopped(attempt, run, proxy, f"{run.url}/{NEWEST}", ("SlowDown", "reduce your request rate", "503"))


@cell(DOWNLOAD, DENIED, STOPS)
def test_train_denied_the_resume_download(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "download-denied", tmp_path)
    proxy.inject("403", "GET", key_of(run.url, pattern=r"checkpoint(\.prev)?\.pth\.tar"))
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_stopped(attempt, run, proxy, f"{run.url}/{NEWEST}", "access denied")


@cell(DOWNLOAD, MISSING, CONTINUES)
def test_train_resumes_from_the_previous_checkpoint_when_the_newest_is_gone(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "download-missing", tmp_path)
    objstore.remove(f"{run.url}/{NEWEST}")
    attempt = train_here(run, "A", dataset, "--max-steps", "5")
    assert_continued(attempt, run, PREVIOUS, 2, 5)  # steps 3 and 4 redone, each row once


@cell(DOWNLOAD, DISK_FULL, STOPS)
def test_train_with_the_disk_full_at_the_resume_download(proxy, forker, base_run, dataset, tmp_path):
    run = new_run(base_run, "download-full", tmp_path)
    held = proxy.inject("hold", "GET", key_of(run.url, NEWEST), times=1)
    proc = start_training(forker, run, "A", dataset, tmp_path / "log", "--max-steps", "5")
    wait_for(lambda: held.done, proc, tmp_path / "log", "the resume download")
    disk_full(proc, MIRROR_FULL_AT)
    held.release()  # the download is retried, onto a full disk
    rc, out = finished(proc, tmp_path / "log")
    assert_stopped(Attempt(rc, out), run, proxy, DISK_FULL_MESSAGE, str(run.mirror("A")))


# -- restarts ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_on_a_then_b(proxy, forker, base_run, dataset, tmp_path_factory) -> tuple[Run, Attempt]:
    """Rank 0 trains on node A from step 4 and is killed right after its checkpoint of step 6 and
    the metrics that go with it are in the bucket; rank 0 then comes back on node B (an empty
    disk) and trains to step 8."""
    tmp = tmp_path_factory.mktemp("restart")
    run = new_run(base_run, "restart", tmp)
    held = proxy.inject("hold", "PUT", key_of(run.url, "train.log"))  # the record's last file
    proc = start_training(forker, run, "A", dataset, tmp / "log", "--max-steps", "8", "--save-every", "2")
    kill_at(proc, lambda: held.done, tmp / "log", "the upload of the record after step 6")
    proxy.clear()
    assert state(run) == (6, 4, list(range(1, 7)))
    return run, train_here(run, "B", dataset, "--max-steps", "8")


@cell(OTHER_NODE, SIGKILL, CONTINUES)
def test_restart_on_another_node_after_a_kill(killed_on_a_then_b, base_run):
    run, attempt = killed_on_a_then_b
    assert_continued(attempt, run, NEWEST, 6, 8)
    log = objstore.get(f"{run.url}/train.log").decode()
    assert log.startswith((base_run.mirror("A") / "train.log").read_text()), "the run's log lost its first lines"


@cell(A_B_A, SIGKILL, CONTINUES)
def test_restart_back_on_the_first_node_keeps_the_record(killed_on_a_then_b, dataset):
    # Node A's mirror still holds its record up to step 6; the bucket's runs to step 8.
    run, _ = killed_on_a_then_b
    attempt = train_here(run, "A", dataset, "--max-steps", "10")
    assert_continued(attempt, run, NEWEST, 8, 10)


@cell(OTHER_NODE, THROTTLED, CONTINUES)
def test_restart_on_another_node_throttled_while_fetching_the_record(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "other-503", tmp_path)
    slow = proxy.inject("503", "GET", key_of(run.url, "metrics.jsonl"), times=2)
    attempt = train_here(run, "B", dataset, "--max-steps", "5")
    assert slow.done == 2
    assert_continued(attempt, run, NEWEST, 4, 5)


@cell(OTHER_NODE, DENIED, STOPS)
def test_restart_on_another_node_denied_the_record(proxy, base_run, dataset, tmp_path):
    run = new_run(base_run, "other-denied", tmp_path)
    proxy.inject("403", "GET", key_of(run.url, "metrics.jsonl"))
    attempt = train_here(run, "B", dataset, "--max-steps", "5")
    assert_stopped(attempt, run, proxy, f"{run.url}/metrics.jsonl", "access denied")
