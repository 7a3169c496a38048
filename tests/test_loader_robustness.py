"""Bad data, flaky servers and hostile manifests."""
from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_resumes_exactly, collect, descendants, proc_state
from pipeline.shard_format import ManifestError, load_manifest
from pipeline import create_loader
from pipeline.http import HTTPReadError, http_get


def test_corrupt_samples_are_counted_replaced_and_deterministic(corrupt_shards, caplog):
    path, bad = corrupt_shards
    kw = dict(batch_size=6, image_size=24, device="cpu", normalize=False, seed=5)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loader = create_loader(path, workers=2, drop_last=False, **kw)
        a = collect(loader)
        collect(loader)  # a second pass of the same epoch: counted again, logged once
    assert sum(len(y) for _, y in a) == 60  # every batch stays full
    assert set(loader.stats.corrupt_keys) == bad
    assert loader.stats.corrupt == 2 * len(bad)
    logged = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(logged) == len(bad) and all(any(k in m for m in logged) for k in bad)
    b = collect(create_loader(path, workers=1, drop_last=False, **kw))
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with Range support; drops every other shard transfer halfway."""

    flaky = True
    delay = 0.0  # seconds before each response
    counter = {"n": 0}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        time.sleep(self.delay)
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.counter["n"] += 1
        if self.flaky and path.suffix == ".tar" and self.counter["n"] % 2 == 0 and len(body) > 4096:
            self.wfile.write(body[: len(body) // 2])  # then hang up mid-body
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(colour_shards):
    handler = type("H", (_RangeHandler,), {"counter": {"n": 0}})

    def factory(*args, **kw):
        return handler(*args, directory=str(colour_shards.parent), **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/{colour_shards.name}", handler
    srv.shutdown()
    srv.server_close()


def test_http_get_resumes_a_dropped_transfer(server, colour_shards):
    base, handler = server
    name = load_manifest(colour_shards)["splits"]["train"]["shards"][0]["name"]
    for _ in range(3):  # some of these requests are cut halfway by the server
        assert http_get(f"{base}/{name}", backoff=0.01) == (colour_shards / name).read_bytes()
    assert handler.counter["n"] >= 4  # the drops really happened and were resumed
    with pytest.raises(HTTPReadError, match="404"):
        http_get(f"{base}/missing.tar")


def test_remote_val_equals_local_val(server, colour_shards):
    base, _ = server
    kw = dict(split="val", batch_size=5, image_size=24, device="cpu", workers=2, normalize=False)
    local = collect(create_loader(colour_shards, **kw))
    remote = collect(create_loader(f"{base}/manifest.json", **kw))
    assert len(local) == len(remote)
    for (a, la), (b, lb) in zip(local, remote):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_remote_train_equal_ranks_and_exact_resume(server):
    base, _ = server
    url = f"{base}/manifest.json"
    kw = dict(batch_size=4, image_size=24, device="cpu", workers=1, normalize=False, shuffle_buffer=10, seed=2)
    ranks = [create_loader(url, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    got = [collect(r) for r in ranks]
    assert [len(g) for g in got] == [len(ranks[0])] * 2
    assert_resumes_exactly(lambda: create_loader(url, **kw), 3)
    # A shard-level shuffle: each epoch streams the shards in another order, the shuffle buffer
    # mixes within that stream, and the epochs differ.
    one = create_loader(url, **kw)
    orders = []
    for epoch in range(3):
        one.set_epoch(epoch)
        orders.append(np.concatenate(one.batch_sample_ids()))
    starts = one.table.shard_starts
    shard_of = [np.searchsorted(starts, o, side="right") - 1 for o in orders]
    first_seen = [list(dict.fromkeys(s.tolist())) for s in shard_of]
    assert len({tuple(f) for f in first_seen}) > 1  # the shard order changes with the epoch
    assert any((np.diff(o) != 1).mean() > 0.5 for o in orders)  # not read in tar order
    assert all(len(o) == len(set(o.tolist())) for o in orders)


def test_streamed_train_refuses_a_mid_epoch_world_change_clearly(server):
    """http shards are dealt to ranks whole, so a state resumes mid-epoch only on its own world
    size; at an epoch's start or end the world may change."""
    url = f"{server[0]}/manifest.json"
    kw = dict(batch_size=4, image_size=24, device="cpu", workers=1, normalize=False, shuffle_buffer=10, seed=2)
    two = create_loader(url, rank=0, world_size=2, **kw)
    fresh = two.state_dict()
    collect(two, 1)
    one = create_loader(url, **kw)
    with pytest.raises(ValueError, match="world_size=2.*world_size=1.*streamed"):
        one.load_state_dict(two.state_dict())
    one.load_state_dict(fresh)
    assert len(one) == len(create_loader(url, **kw))
    collect(two)
    one.load_state_dict(two.state_dict())  # the finished epoch: nothing left of it
    assert len(one) == 0 and collect(one) == []


def _manifest_with(names: list[str], classes=("a",)) -> dict:
    return {"format": "webdataset-shards", "version": 1, "complete": True, "classes": list(classes),
            "splits": {"train": {"samples": len(names), "shards": [{"name": n, "samples": 1} for n in names]}}}


@pytest.mark.parametrize("name", ["pipe:touch {marker}", "../../../../etc/passwd", "/etc/passwd",
                                  "http://127.0.0.2:1/x.tar", "file:///etc/passwd", "sub/../../x.tar"])
def test_hostile_local_manifest_is_refused(tmp_path, name):
    marker = tmp_path / "ran"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(_manifest_with([name.format(marker=marker)])))
    with pytest.raises(ManifestError, match="refused"):
        create_loader(tmp_path / "ds", device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../secret.tar", "pipe:cat /etc/passwd", "http://127.0.0.2:9/colour/x.tar",
                                  "//evil.example/x.tar", "/etc/passwd"])
def test_hostile_remote_manifest_is_refused(server, colour_shards, name):
    base, _ = server
    (colour_shards.parent / "hostile.json").write_text(json.dumps(_manifest_with([name])))
    # Served from the folder above the shards: "../" would reach the filesystem root's side.
    with pytest.raises(ManifestError, match="refused"):
        create_loader(base.rsplit("/", 1)[0] + "/hostile.json", device="cpu")


def test_brace_pattern_of_local_tars(colour_shards):
    names = [s["name"] for s in load_manifest(colour_shards)["splits"]["val"]["shards"]]
    assert len(names) > 1
    pattern = str(colour_shards / f"val-{{000000..{len(names) - 1:06d}}}.tar")
    loader = create_loader(pattern, split="val", batch_size=6, image_size=24, device="cpu", workers=1, normalize=False)
    ref = create_loader(colour_shards, split="val", batch_size=6, image_size=24, device="cpu", workers=1,
                        normalize=False)
    for (a, la), (b, lb) in zip(collect(loader), collect(ref)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(Exception, match="pipe"):
        create_loader("pipe:cat x.tar", device="cpu")


def test_crop_parameters_follow_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    from pipeline.augment import train_params

    for w, h in ((500, 375), (375, 500), (1000, 120)):
        n = 20000
        boxes, flips = train_params(49, 0, np.arange(n), np.full(n, w), np.full(n, h))
        torch.manual_seed(0)
        ref = np.array([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=np.float64)  # (top, left, h, w)
        ours_area = boxes[:, 2] * boxes[:, 3] / (w * h)
        ref_area = ref[:, 3] * ref[:, 2] / (w * h)
        assert abs(ours_area.mean() - ref_area.mean()) < 0.01
        assert abs(np.log(boxes[:, 2] / boxes[:, 3]).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
        assert abs(np.quantile(ours_area, 0.9) - np.quantile(ref_area, 0.9)) < 0.02
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= h).all()
        assert abs(flips.mean() - 0.5) < 0.02


def test_val_box_is_torchvision_resize_then_center_crop():
    from pipeline.augment import val_params

    box = val_params(np.array([500, 375]), np.array([375, 500]), 224)
    # 500x375 -> Resize(256) gives 341x256; CenterCrop(224) starts at (58.5 -> 58, 16).
    s = 375 / 256
    assert np.allclose(box[0], [round((341 - 224) / 2) * 500 / 341, 16 * s, 224 * 500 / 341, 224 * s])
    assert np.allclose(box[1], [16 * s, round((341 - 224) / 2) * 500 / 341, 224 * s, 224 * 500 / 341])


# -- a pattern names one split --------------------------------------------------------------------

def test_a_pattern_is_checked_against_its_split(colour_shards, tmp_path):
    from pipeline import ShardError

    names = [s["name"] for s in load_manifest(colour_shards)["splits"]["train"]["shards"]]
    pattern = f"train-{{000000..{len(names) - 1:06d}}}.tar"
    # With the manifest beside the shards: it says which split they are.
    with pytest.raises(ShardError, match="belongs to split 'train'.*not to split 'val'"):
        create_loader(str(colour_shards / pattern), split="val", device="cpu")
    ok = create_loader(str(colour_shards / pattern), device="cpu", batch_size=8, image_size=16, workers=1)
    assert ok.num_classes == 6 and ok.table.labels_known
    # Without one: a split in the file names must match.
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for n in names:
        shutil.copy(colour_shards / n, bare / n)
    with pytest.raises(ShardError, match="its name says split 'train', not 'val'"):
        create_loader(str(bare / pattern), split="val", device="cpu")
    loader = create_loader(str(bare / pattern), device="cpu", batch_size=8, image_size=16, workers=1)
    assert loader.num_classes == 6  # from the .cls members: no .idx, no manifest
    assert torch.equal(torch.cat([y for _, y in collect(loader)]), torch.cat([y for _, y in collect(ok)]))


def test_train_run_never_validates_on_train_shards(colour_shards, tmp_path):
    from train.config import parse_args
    from train.devices import resolve_device
    from train.run import DistInfo, build_loaders, resolve

    names = [s["name"] for s in load_manifest(colour_shards)["splits"]["train"]["shards"]]
    pattern = str(colour_shards / f"train-{{000000..{len(names) - 1:06d}}}.tar")
    cfg = resolve(*parse_args(["--shards", pattern, "--device", "cpu", "-b", "8", "-j", "1", "--image-size", "16"]))
    train, val = build_loaders(cfg, resolve_device("cpu"), DistInfo(), torch.float32)
    assert len(train) == 60 // 8 and val is None  # a warning, and no val "accuracy" measured on train


def test_remote_pattern_learns_its_classes_from_the_manifest_beside_it(server, colour_shards, tmp_path):
    from train.run import num_classes

    base, _ = server
    names = [s["name"] for s in load_manifest(colour_shards)["splits"]["val"]["shards"]]
    url = f"{base}/val-{{000000..{len(names) - 1:06d}}}.tar"
    loader = create_loader(url, split="val", device="cpu", batch_size=6, image_size=16, workers=1)
    assert num_classes(loader) == 6 and loader.table.labels_known
    with pytest.raises(Exception, match="belongs to split 'val'"):
        create_loader(url, split="train", device="cpu")
    # Served without the manifest: labels arrive only with the stream, so the class count is
    # unknown, and the trainer says what is missing instead of building a 1-class model.
    (colour_shards / "manifest.json").rename(tmp_path / "manifest.json")
    try:
        blind = create_loader(url, split="val", device="cpu", batch_size=6, image_size=16, workers=1)
        assert blind.num_classes is None
        with pytest.raises(Exception, match="manifest.json"):
            num_classes(blind)
        assert torch.equal(torch.cat([y for _, y in collect(blind)]), torch.cat([y for _, y in collect(loader)]))
    finally:
        (tmp_path / "manifest.json").rename(colour_shards / "manifest.json")


# -- errors in the workers ------------------------------------------------------------------------

def _run_with_timeout(fn, seconds: float = 60):
    """fn() in a thread; its result, or an AssertionError if it hangs."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the loader hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_failed_task_raises_and_the_next_iteration_does_not_hang(colour_shards, monkeypatch):
    from pipeline.decode import BatchDecoder
    from pipeline.workers import WorkerError

    real = BatchDecoder.decode_batch
    calls = []

    def fails_once(self, epoch, ids, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in batch 2")
        return real(self, epoch, ids, *a, **k)

    monkeypatch.setattr(BatchDecoder, "decode_batch", fails_once)
    loader = create_loader(colour_shards, batch_size=6, image_size=16, device="cpu", workers=2,
                           worker_mode="thread", prefetch=2)
    with pytest.raises(WorkerError, match="a bug in batch 2"):
        _run_with_timeout(lambda: collect(loader))
    assert len(_run_with_timeout(lambda: collect(loader))) == len(loader)  # answered, not hung


def test_bugs_in_the_decoder_raise_instead_of_being_counted_as_corrupt(colour_shards, monkeypatch):
    from pipeline import decode
    from pipeline.workers import WorkerError

    def too_small(*a, **k):
        raise ValueError("decode_region: output buffer too small")

    monkeypatch.setattr(decode._jpeg, "decode_region", too_small)
    monkeypatch.setattr(decode._jpeg, "decode_region_rst", too_small, raising=False)
    loader = create_loader(colour_shards, batch_size=6, image_size=16, device="cpu", workers=1, worker_mode="thread")
    with pytest.raises(WorkerError, match="output buffer too small"):
        collect(loader)
    assert loader.stats.corrupt == 0


# -- file descriptors -----------------------------------------------------------------------------

FD_CHECK = r"""
import resource, sys
sys.path.insert(0, {tests!r})
from conftest import collect
from pipeline import create_loader
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for backend, mode in (("cpu", "thread"), ("cpu", "process"), ("nvjpeg", "thread")):
    loader = create_loader({shards!r}, backend=backend, worker_mode=mode, batch_size=16, image_size=16,
                           device="cpu", workers=3, max_open_shards=24)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(collect(loader)) == len(loader)
    loader.close()
    assert loader.samples.open_maps == 0
print("ok")
"""


def test_open_shard_maps_are_bounded_under_a_low_descriptor_limit(tmp_path):
    """~250 one-sample shards, read at random by 3 threads, under a 96-descriptor limit."""
    import subprocess
    import sys

    from conftest import ROOT, make_colour_folder
    from convert.imagenet_to_shards import convert

    make_colour_folder(tmp_path / "src", per_class=40, val_per_class=1)
    convert(tmp_path / "src", tmp_path / "shards", shard_size_mb=1e-6, workers=2, progress=False)
    assert len(load_manifest(tmp_path / "shards")["splits"]["train"]["shards"]) == 240
    code = FD_CHECK.format(tests=str(ROOT / "tests"), shards=str(tmp_path / "shards"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# -- the device stage and worker start ------------------------------------------------------------

def test_accelerators_without_a_cuda_stream_wait_for_the_copy_before_a_slot_is_reused(monkeypatch):
    """npu, xpu, ...: the copy out of a host slot may still run when the slot is refilled."""
    from pipeline.contract import LoaderConfig
    from pipeline.device import DeviceStage

    recorded = []

    class FakeEvent:
        def record(self, stream):
            recorded.append(stream)

        def synchronize(self):
            pass

    class FakeModule:
        Event = FakeEvent

        @staticmethod
        def current_stream(device):
            return f"stream of {device}"

    stage = DeviceStage(LoaderConfig(device="cpu", normalize=False))
    stage.device, stage.module = torch.device("meta"), FakeModule  # an accelerator with streams and events
    images, labels = torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    x, y, event = stage(images, labels)
    assert isinstance(event, FakeEvent) and recorded == ["stream of meta"]
    stage.module = None  # no events: a blocking copy, which needs none
    assert stage(images, labels)[2] is None


def test_workers_start_from_a_forkserver_once_cuda_is_initialised(colour_shards, monkeypatch):
    from pipeline.cpu import pick_start_method

    assert pick_start_method(None) == "fork"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert pick_start_method(None) == "forkserver" and pick_start_method("spawn") == "spawn"
    monkeypatch.undo()
    # Under a process group too: its backend's threads run beside the fork.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert pick_start_method(None) == "forkserver"
    monkeypatch.undo()
    kw = dict(batch_size=8, image_size=16, device="cpu", workers=2, normalize=False, seed=6)
    forked = collect(create_loader(colour_shards, **kw))
    served = collect(create_loader(colour_shards, start_method="forkserver", **kw))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(forked, served))


# Owns a loader with process workers, prints their pids once they serve, then waits to be killed.
# "thread": the workers are started by a thread that then ends (no parent-death signal can be
# armed), and os.pidfd_open is hidden: the watchdog's portable polling alone must catch the death.
OWNER = """
import os, sys, threading, time
from pipeline import create_loader

shards, start_method, how = sys.argv[1:]
loader = create_loader(shards, batch_size=4, image_size=16, device="cpu", workers=2, start_method=start_method)

def start():
    next(iter(loader))

if how == "thread":
    del os.pidfd_open
    t = threading.Thread(target=start)
    t.start()
    t.join()
    time.sleep(1.0)  # the starting thread is gone; its workers must live on while this process does
    next(iter(loader))
else:
    start()
print(" ".join(str(w.pid) for w in loader._pool.workers), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("start_method,how", [("fork", "main"), ("forkserver", "main"), ("fork", "thread")])
def test_loader_workers_die_with_their_owner(colour_shards, start_method, how):
    # A rank SIGKILLed under torchrun used to leave its workers blocked on the task queue forever
    # (reparented to init): every elastic restart leaked a set of them.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(colour_shards), start_method, how], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    family: set[int] = set()
    try:
        workers = [int(x) for x in owner.stdout.readline().split()]
        family = descendants(owner.pid)  # the workers, and the fork server and resource tracker if any
        assert len(workers) == 2 and set(workers) <= family, (workers, family)
        assert all(proc_state(p) is not None for p in workers)  # alive, also after the starting thread ended
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(proc_state(p) is not None for p in family):
            time.sleep(0.05)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in family if proc_state(p) is not None}
        assert not left, f"outlived their SIGKILLed owner: {left}"
    finally:
        owner.kill()
        for p in family:
            if proc_state(p) is not None:
                os.kill(p, signal.SIGKILL)


def test_loader_is_a_deprecated_name_of_create_loader(colour_shards):
    from pipeline import Loader

    with pytest.warns(DeprecationWarning, match="create_loader"):
        loader = Loader(colour_shards, device="cpu", batch_size=8)
    assert len(loader) == 60 // 8


# -- the remote stream ----------------------------------------------------------------------------

def test_waiting_on_a_slow_stream_is_counted_and_a_stopped_stream_does_not_block(server):
    from pipeline.remote import ReaderStopped, RemoteReader

    base, handler = server
    handler.flaky, handler.delay = False, 0.4  # every request waits: the stream is the bottleneck
    loader = create_loader(f"{base}/manifest.json", batch_size=6, image_size=16, device="cpu", workers=1)
    t0 = time.perf_counter()
    collect(loader)
    elapsed = time.perf_counter() - t0
    assert loader.stats.wait_s > 0.5 * elapsed, (loader.stats.wait_s, elapsed)

    ids = loader.batch_sample_ids()
    reader = RemoteReader(loader.table, loader._plan(0)[1], ids, 0, lookahead=1)
    threading.Timer(0.3, reader.stop).start()
    with pytest.raises(ReaderStopped):
        _run_with_timeout(lambda: reader.take(np.array([10 ** 9])), seconds=20)  # never arrives


# -- hostile JPEGs through the loader ---------------------------------------------------------------

def test_hostile_jpegs_in_foreign_shards(tmp_path):
    """Foreign shards (no converter validated them): a decompression bomb and damaged scan data
    are counted and replaced with bounded memory, and a CMYK JPEG is decoded by Pillow instead
    of being thrown away."""
    import io as _io

    from PIL import Image

    from jpeg_fixtures import damage_entropy, photo, pil_jpeg, with_dimensions
    from pipeline.shard_format import ShardWriter

    good = [pil_jpeg(photo(96, 72, seed=s)) for s in range(6)]
    bomb = with_dimensions(pil_jpeg(photo(16, 16), progressive=True), 16000, 16000)
    damaged = damage_entropy(pil_jpeg(photo(96, 72, seed=9)))
    cmyk_img = Image.fromarray(photo(96, 72, seed=7)).convert("CMYK")
    buf = _io.BytesIO()
    cmyk_img.save(buf, "JPEG", quality=95)
    with ShardWriter(tmp_path / "foreign-000000.tar") as w:
        for k, data in enumerate(good + [bomb, damaged, buf.getvalue()]):
            w.write(f"s{k:02d}", {"jpg": data, "cls": str(k % 3).encode()})
        w.close()
    loader = create_loader(str(tmp_path / "foreign-000000.tar"), split="val", batch_size=9, image_size=32,
                           device="cpu", workers=1, worker_mode="thread", normalize=False)
    (x, y), = collect(loader)
    assert len(y) == 9
    assert sorted(k.split(":")[1] for k in loader.stats.corrupt_keys) == ["s06", "s07"]  # bomb, damaged
    cmyk = x[8].permute(1, 2, 0).numpy().astype(int)  # the CMYK sample is itself, through Pillow
    import torchvision.transforms.functional as F

    rgb = Image.open(_io.BytesIO(buf.getvalue())).convert("RGB")
    ref = np.asarray(F.center_crop(F.resize(rgb, loader.cfg.transform.resize), 32)).astype(int)
    assert np.abs(cmyk - ref).max() <= 1
