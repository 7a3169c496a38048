"""Bad data, flaky servers and hostile manifests."""
from __future__ import annotations

import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_resumes_exactly, collect
from convert.manifest import ManifestError, load_manifest
from pipeline import Loader
from pipeline.http import HTTPReadError, http_get


def test_corrupt_samples_are_counted_replaced_and_deterministic(corrupt_shards, caplog):
    path, bad = corrupt_shards
    kw = dict(batch_size=6, image_size=24, device="cpu", normalize=False, seed=5)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loader = Loader(path, workers=2, drop_last=False, **kw)
        a = collect(loader)
        collect(loader)  # a second pass of the same epoch: counted again, logged once
    assert sum(len(y) for _, y in a) == 60  # every batch stays full
    assert set(loader.stats.corrupt_keys) == bad
    assert loader.stats.corrupt == 2 * len(bad)
    logged = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(logged) == len(bad) and all(any(k in m for m in logged) for k in bad)
    b = collect(Loader(path, workers=1, drop_last=False, **kw))
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with Range support; drops every other shard transfer halfway."""

    flaky = True
    counter = {"n": 0}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
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
    local = collect(Loader(colour_shards, **kw))
    remote = collect(Loader(f"{base}/manifest.json", **kw))
    assert len(local) == len(remote)
    for (a, la), (b, lb) in zip(local, remote):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_remote_train_equal_ranks_and_exact_resume(server):
    base, _ = server
    url = f"{base}/manifest.json"
    kw = dict(batch_size=4, image_size=24, device="cpu", workers=1, normalize=False, shuffle_buffer=10, seed=2)
    ranks = [Loader(url, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    got = [collect(r) for r in ranks]
    assert [len(g) for g in got] == [len(ranks[0])] * 2
    full = collect(Loader(url, **kw))
    assert_resumes_exactly(lambda: Loader(url, **kw), 3)
    # A shard-level shuffle: the order of labels differs from the local full permutation's.
    assert sum(len(y) for _, y in full) == len(full) * 4


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
        Loader(tmp_path / "ds", device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../secret.tar", "pipe:cat /etc/passwd", "http://127.0.0.2:9/colour/x.tar",
                                  "//evil.example/x.tar", "/etc/passwd"])
def test_hostile_remote_manifest_is_refused(server, colour_shards, name):
    base, _ = server
    (colour_shards.parent / "hostile.json").write_text(json.dumps(_manifest_with([name])))
    # Served from the folder above the shards: "../" would reach the filesystem root's side.
    with pytest.raises(ManifestError, match="refused"):
        Loader(base.rsplit("/", 1)[0] + "/hostile.json", device="cpu")


def test_brace_pattern_of_local_tars(colour_shards):
    names = [s["name"] for s in load_manifest(colour_shards)["splits"]["val"]["shards"]]
    assert len(names) > 1
    pattern = str(colour_shards / f"val-{{000000..{len(names) - 1:06d}}}.tar")
    loader = Loader(pattern, split="val", batch_size=6, image_size=24, device="cpu", workers=1, normalize=False)
    ref = Loader(colour_shards, split="val", batch_size=6, image_size=24, device="cpu", workers=1, normalize=False)
    for (a, la), (b, lb) in zip(collect(loader), collect(ref)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(Exception, match="pipe"):
        Loader("pipe:cat x.tar", device="cpu")


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
