"""Shared fixtures: every test makes its own small data; nothing is downloaded."""
from __future__ import annotations

import io
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from convert.synthetic import SyntheticConfig, generate  # noqa: E402
from s3_server import CLEARED_ENV, FaultProxy, MotoServer, env_for, server_environment  # noqa: E402


def jpeg_bytes(rgb=(200, 40, 30), size=(40, 30), mode="RGB", **save) -> bytes:
    im = Image.new("RGB", size, rgb)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def png_bytes(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic ImageFolder (6 classes, 64 px) shared by read-only tests."""
    out = tmp_path_factory.mktemp("synthetic")
    cfg = SyntheticConfig(classes=6, per_class=12, val_per_class=3, seed=7, size=64, noise=6.0)
    return generate(out, cfg, workers=2, progress=False)


@pytest.fixture
def quirky_root(tmp_path) -> Path:
    """An ImageFolder holding every kind of file ImageNet's own folders hold."""
    root = tmp_path / "src"
    good = root / "train" / "n001"
    odd = root / "train" / "n002"
    good.mkdir(parents=True)
    odd.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (good / f"img_{i}.JPEG").write_bytes(buf.getvalue())
    (odd / "cmyk.JPEG").write_bytes(jpeg_bytes((200, 40, 30), mode="CMYK"))
    (odd / "gray.JPEG").write_bytes(jpeg_bytes((120, 120, 120), mode="L"))
    (odd / "png_as_jpeg.JPEG").write_bytes(png_bytes((10, 200, 30)))
    (odd / "rgba.JPEG").write_bytes(png_bytes((30, 60, 220, 255), mode="RGBA"))
    full = jpeg_bytes((50, 60, 70), size=(200, 150))
    (odd / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (odd / "empty.JPEG").write_bytes(b"")
    (odd / "text.JPEG").write_bytes(b"this is not an image\n" * 10)
    (odd / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "train" / "README.txt").write_text("stray")
    return root


# Class k of the colour dataset is a flat colour: its label survives any crop, resize or flip.
CLASS_COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 210)]


def write_image_folder(root: Path, counts: dict[str, int], classes: int, draw, quality: int, seed: int) -> Path:
    """An ImageFolder: counts[split] JPEGs per class, image k of class c being draw(rng, c, k)."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in counts.items():
        for cls in range(classes):
            d = root / split / f"c{cls}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(draw(rng, cls, k)).save(d / f"{i}.JPEG", quality=quality)
                k += 1
    return root


def make_colour_folder(root: Path, per_class: int = 10, val_per_class: int = 3) -> Path:
    def draw(rng, cls, k):
        w, h = int(rng.integers(48, 120)), int(rng.integers(48, 120))
        return np.clip(np.array(CLASS_COLOURS[cls])[None, None, :] + rng.normal(0, 6, (h, w, 3)), 0,
                       255).astype(np.uint8)

    return write_image_folder(root, {"train": per_class, "val": val_per_class}, len(CLASS_COLOURS), draw, 92, 5)


def converted(tmp_path_factory, name: str, make_folder, shard_size_mb: float) -> Path:
    """An ImageFolder made by `make_folder(root)`, converted to shards of about `shard_size_mb`."""
    from convert.imagenet_to_shards import convert

    base = tmp_path_factory.mktemp(name)
    make_folder(base / "src")
    convert(base / "src", base / "shards", shard_size_mb=shard_size_mb, workers=1, progress=False)
    return base / "shards"


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """Converted colour dataset: 60 train (several shards), 18 val."""
    return converted(tmp_path_factory, "colour", make_colour_folder, 0.03)


def coordinate_image(w: int, h: int, k: int, cls: int) -> np.ndarray:
    """An image whose pixels say where they are: red is the column (rising left to right, or right
    to left in odd images), green the row, blue the class; a crop, scale or flip that is off shows
    as a colour error proportional to the offset. A fine luma texture (periods of 5 to 9 px, its
    phase set by `k`) on top shows a resize or a decode that blurs or aliases."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    red = xx / (w - 1) if k % 2 == 0 else 1 - xx / (w - 1)
    texture = 14 * np.sin(xx * 0.9 + k) * np.sin(yy * 0.7 + 2 * k) + 8 * np.sin((xx + 2 * yy) * 1.3)
    rgb = np.stack([20 + 215 * red, 20 + 215 * yy / (h - 1), np.full_like(xx, 40 + 60 * cls)], -1)
    return np.clip(rgb + texture[..., None], 0, 255).round().astype(np.uint8)


def make_coordinate_folder(root: Path, per_class: int = 8, val_per_class: int = 4, classes: int = 3) -> Path:
    """ImageFolder of coordinate images of ImageNet-like spread of sizes (48 to 480 px), q95 4:2:0."""
    def draw(rng, cls, k):
        return coordinate_image(int(rng.integers(48, 481)), int(rng.integers(48, 481)), k, cls)

    return write_image_folder(root, {"train": per_class, "val": val_per_class}, classes, draw, 95, 11)


@pytest.fixture(scope="session")
def coord_shards(tmp_path_factory) -> Path:
    """Converted coordinate images: 24 train, 12 val, 3 classes."""
    return converted(tmp_path_factory, "coord", make_coordinate_folder, 0.05)


def write_cifar10(root: Path, per_class: int = 10, test_per_class: int = 3) -> Path:
    """The python files of CIFAR-10 (cifar-10-batches-py's layout; Python 3 pickles), 32 x 32:
    class k's images are the k-th class colour with noise (classes 6 to 9 have none)."""
    import pickle

    rng = np.random.default_rng(9)
    root.mkdir(parents=True)
    for name, n in [(f"data_batch_{b}", per_class // 5 + (b <= per_class % 5)) for b in range(1, 6)] + \
            [("test_batch", test_per_class)]:
        labels = [k for k in range(len(CLASS_COLOURS)) for _ in range(n)]
        hwc = np.clip(np.array([CLASS_COLOURS[k] for k in labels], np.float64)[:, None, None, :]
                      + rng.normal(0, 6, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
        data = hwc.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # CIFAR rows are planar RGB
        (root / name).write_bytes(pickle.dumps({b"labels": labels, b"data": data, b"batch_label": b"x"}, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]},
                                                     protocol=2))
    return root


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory) -> Path:
    """Converted CIFAR-10-format colour dataset: 60 train, 18 test, 32 x 32 PNGs."""
    from convert.cifar_to_shards import convert

    base = tmp_path_factory.mktemp("cifar")
    convert(write_cifar10(base / "cifar-10-batches-py"), base / "shards", shard_size_mb=0.06, workers=1,
            progress=False)
    return base / "shards"


@pytest.fixture
def corrupt_shards(colour_shards, tmp_path) -> tuple[Path, set[str]]:
    """A copy of the colour shards with four damaged JPEG members: three without a JPEG header,
    and one whose header is intact but whose scan data is missing (cut right after the SOS
    segment: every decoder reads the header and then fails)."""
    import shutil

    from pipeline.shard_format import load_manifest, read_index

    out = tmp_path / "corrupt"
    shutil.copytree(colour_shards, out)
    m = load_manifest(out)
    bad = set()
    for shard, pos in ((0, 1), (1, 0), (2, 2)):
        entry = m["splits"]["train"]["shards"][shard]
        key, members = read_index(out / entry["index"])[pos]
        off, size = members["jpg"]
        with open(out / entry["name"], "r+b") as f:
            f.seek(off)
            f.write(b"NOTAJPEG" * 4)  # no SOI marker: the header read fails
        bad.add(f"{entry['name']}:{key}")

    def cut_after_sos(members: dict) -> dict:
        jpg = members["jpg"]
        sos = jpg.index(b"\xff\xda")
        return {**members, "jpg": jpg[:sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")]}

    bad.add(rewrite_shard(out, "train", 3, 1, cut_after_sos))
    return out, bad


def rewrite_shard(folder: Path, split: str, shard: int, pos: int, edit) -> str:
    """Rewrite one shard of a converted dataset with sample `pos`'s members passed through `edit`,
    keeping its manifest entry consistent (bytes, sha256); returns "shard.tar:KEY" of the sample."""
    from pipeline.shard_format import ShardWriter, load_manifest, read_index, write_manifest

    m = load_manifest(folder)
    entry = m["splits"][split]["shards"][shard]
    raw = (folder / entry["name"]).read_bytes()
    samples = [(k, {ext: raw[o:o + n] for ext, (o, n) in mem.items()})
               for k, mem in read_index(folder / entry["index"])]
    with ShardWriter(folder / entry["name"]) as w:
        for i, (k, mem) in enumerate(samples):
            w.write(k, edit(mem) if i == pos else mem)
        entry["bytes"], entry["sha256"] = w.close()
    write_manifest(folder, m)
    return f"{entry['name']}:{samples[pos][0]}"


def collect(loader, limit: int | None = None) -> list[tuple]:
    """The loader's (images, labels) batches, copied (a backend may reuse its buffers)."""
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if limit is not None and i + 1 >= limit:
            break
    return out


def assert_resumes_exactly(make_loader, head_batches: int, through_json: bool = False) -> dict:
    """Take `head_batches` from one loader, restore its state into a fresh one, and check that
    head + the rest equals an uninterrupted epoch, bitwise. Returns the saved state."""
    import json

    import torch

    reference = collect(make_loader())
    first = make_loader()
    it = iter(first)
    head = [tuple(t.clone() for t in next(it)) for _ in range(head_batches)]
    state = first.state_dict()
    assert state["batch"] == head_batches
    resumed = make_loader()
    resumed.load_state_dict(json.loads(json.dumps(state)) if through_json else state)
    tail = collect(resumed)
    assert len(head) + len(tail) == len(reference)
    for (a, la), (b, lb) in zip(head + tail, reference):
        assert torch.equal(a, b) and torch.equal(la, lb)
    return state


def run_cli(module: str, *args, **kw):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


# -- object storage: moto's S3 server on loopback (tests/s3_server.py) ---------------------------

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server, in a subprocess on a free loopback port, for the whole session."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the standard credential chain (dummy keys) and AWS_ENDPOINT_URL at the test server,
    in os.environ, so loader workers and subprocesses inherit them. Returns the server."""
    for k in CLEARED_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env_for(s3_server.endpoint).items():
        monkeypatch.setenv(k, v)
    return s3_server


def new_bucket() -> str:
    """Create a bucket with a new name on the server the environment points at: `s3://NAME`."""
    from pipeline import objstore

    name = f"test-bucket-{next(_bucket_ids)}"
    objstore.filesystem(f"s3://{name}").mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A new, empty bucket for this test: `s3://test-bucket-N`."""
    return new_bucket()


@pytest.fixture
def s3_proxy(s3_env, monkeypatch):
    """A fault-injecting proxy (s3_server.FaultProxy) in front of the server, AWS_ENDPOINT_URL
    pointing at it; call `.cut(n)` / `.fail(n)`, or `.inject(action, method, key)`, to inject faults."""
    proxy = FaultProxy(("127.0.0.1", s3_env.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


def upload_folder(folder: Path, url: str) -> None:
    """Upload every file of a local folder (not recursing) under the prefix `url`."""
    from pipeline import objstore

    for p in sorted(folder.iterdir()):
        if p.is_file():
            objstore.put_file(p, f"{url}/{p.name}")


def uploaded(server: MotoServer, folder: Path) -> str:
    """A converted dataset copied to a new bucket, under the prefix `ds`: its URL."""
    with server_environment(server.endpoint):
        url = f"{new_bucket()}/ds"
        upload_folder(folder, url)
    return url


@pytest.fixture(scope="session")
def s3_colour_shards(s3_server, colour_shards) -> str:
    """colour_shards in a bucket (`s3://.../ds`); read it under the `s3_env` fixture."""
    return uploaded(s3_server, colour_shards)


@pytest.fixture(scope="session")
def s3_cifar_shards(s3_server, cifar_shards) -> str:
    """cifar_shards in a bucket (`s3://.../ds`); read it under the `s3_env` fixture."""
    return uploaded(s3_server, cifar_shards)


def bucket_files(url: str) -> dict[str, bytes]:
    """Every object under `url` (one level), by name."""
    from pipeline import objstore

    return {name: objstore.get(f"{url}/{name}") for name in objstore.listdir(url)}


def folder_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]))


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (Linux: read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := proc_state(int(d.name))) is not None:
            children.setdefault(st[1], []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


# -- parallel runs (pytest-xdist; pytest.ini asks for -n auto) ------------------------------------

def pytest_xdist_auto_num_workers(config):
    """One worker per core, at most 4: each worker's tests start multi-process trainings of their own."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


# The modules that take longest (their subprocess trainings), longest first: run first, so that
# no worker is left alone with one of them at the end. Only the order changes, never what runs.
LONGEST_MODULES = ("test_elastic.py", "test_train.py", "test_scripts.py", "test_fault_matrix.py",
                   "test_train_resume.py", "test_conformance.py", "test_loader_robustness.py",
                   "test_shard_cache.py", "test_fast_recipe.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def pytest_configure(config):
    config.addinivalue_line("markers", "fault_cell(phase, fault, verdict): one cell of the fault matrix "
                                       "(below); `verdict` is what it asserts (continues / stops)")
    _share_the_cores()


def _share_the_cores() -> None:
    """In an xdist worker, torch gets its share of the cores, and so do the processes its tests start
    (OMP_NUM_THREADS, unless set): workers each running a thread on every core oversubscribe them,
    and OpenMP threads spinning on a taken core slow every worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# -- the fault matrix (test_fault_matrix.py): each cell's verdict, printed after the run ---------

# (phase, fault) -> (verdict, why it failed), in collection order.
FAULT_MATRIX: dict[tuple[str, str], tuple[str, str]] = {}


def pytest_collection_finish(session):
    for item in session.items:  # those selected to run
        if (m := item.get_closest_marker("fault_cell")) is not None:
            FAULT_MATRIX[m.args[:2]] = ("not run", "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A fault cell's verdict rides on its report, so it reaches the process that prints the
    matrix (pytest-xdist's controller, or this one)."""
    outcome = yield
    marker = item.get_closest_marker("fault_cell")
    if marker is None:
        return
    report = outcome.get_result()
    phase, fault, verdict = marker.args
    if report.failed:
        why = str(call.excinfo.value).strip().splitlines()[0] if call.excinfo is not None else report.when
        cell = ("FAILS", f"{why[:160]}" + (" (in setup)" if report.when == "setup" else ""))
    elif report.skipped:
        cell = ("skipped", "")
    elif report.when == "call":
        cell = (verdict, "")
    else:
        return
    report.user_properties.append(("fault_cell", [phase, fault, *cell]))


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "fault_cell":
            phase, fault, verdict, why = value
            FAULT_MATRIX[(phase, fault)] = (verdict, why)


def pytest_terminal_summary(terminalreporter):
    """The fault matrix, phases down, faults across: what each cell asserted and held, or FAILS."""
    if not FAULT_MATRIX:
        return
    phases = list(dict.fromkeys(p for p, _ in FAULT_MATRIX))
    faults = list(dict.fromkeys(f for _, f in FAULT_MATRIX))
    rows = [["phase \\ fault", *faults]] + [[p, *(FAULT_MATRIX.get((p, f), ("-", ""))[0] for f in faults)]
                                            for p in phases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    tr = terminalreporter
    tr.write_sep("=", "fault matrix")
    for r in rows:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    tr.write_line("continues: went on from the newest good state; stops: exited naming the object and the cause.")
    tr.write_line("Every cell also checks that no checkpoint, shard, record row or user file was lost.")
    for (p, f), (verdict, why) in FAULT_MATRIX.items():
        if verdict == "FAILS":
            tr.write_line(f"FAILS {p} x {f}: {why}")


# -- processes that start warm: forked from one that has done the imports ---------------------------

_FORKER_SOURCE = r"""
import importlib, json, os, resource, sys, traceback
setup, preload = json.loads(sys.argv[1])
for name in preload:
    importlib.import_module(name)
exec(setup)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ.update(req["env"])
            module, _, function = req["target"].partition(":")
            try:
                rc = getattr(importlib.import_module(module), function)(req["argv"])
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
        reply = {"pid": pid}
    else:  # "reap": the exit status of a child that has ended
        reply = {"rc": os.waitstatus_to_exitcode(os.waitpid(req["pid"], 0)[1])}
    print(json.dumps(reply), flush=True)
"""


class WarmChild:
    """A child of a Forker, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, forker: "Forker", pid: int):
        self.forker, self.pid, self.returncode = forker, pid, None

    def poll(self) -> int | None:
        if self.returncode is None and proc_state(self.pid) is None:  # ended (a zombie until reaped)
            self.returncode = self.forker.ask({"op": "reap", "pid": self.pid})["rc"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


class Forker:
    """A Python process that imports `preload` (and runs `setup`) once, then forks a child for each
    `start`: a real process of its own (its pid can be SIGKILLed, its limits set), which starts
    with the imports done instead of spending seconds on them, as `python -m` would. Children
    call `target` ("module:function") with their argv, output to a log file, and exit with what
    it returns (1 and a traceback if it raises)."""

    def __init__(self, preload: list[str], setup: str = "", env: dict[str, str] | None = None):
        import json
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", _FORKER_SOURCE, json.dumps([setup, preload])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def ask(self, request: dict) -> dict:
        import json

        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forker exited ({self.proc.wait()})")
        return json.loads(line)

    def start(self, target: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> WarmChild:
        return WarmChild(self, self.ask({"op": "start", "target": target, "argv": [str(a) for a in argv],
                                         "log": str(log), "env": env or {}})["pid"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
