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


def run_cli(module: str, *args, warm: bool = False, env: dict[str, str] | None = None,
            timeout: float | None = None, check: bool = False):
    """`python -m module *args` in the project's root, as subprocess.run(capture_output=True,
    text=True) runs it: a CompletedProcess (args, returncode, stdout, stderr), TimeoutExpired
    after killing it. `env`: its whole environment (default: cli_env()).

    With `warm`, the process is forked from a forker that has already imported torch, torchvision
    and train.run (warm_forker), and runs the module as -m would: the exit status, output, argv
    and environment are the same, without the seconds of imports. For tests whose subject is what
    the command does, not how the interpreter starts: a flag or variable read at startup
    (IMPORT_TIME_ENV_PREFIXES) gets a forker started with it, and startup itself needs cold.
    Warm torchrun (`torch.distributed.run`) forks its `-m` ranks from its agent (fork_ranks_here):
    a rank there is no fresh interpreter, so a test that reads a rank's /proc (its environ or
    cmdline) or its startup starts torchrun cold."""
    import subprocess

    env = cli_env() if env is None else env
    if warm:
        return _run_warm(module, args, env, timeout, check)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=check)


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
# A module's tests run in one worker (`--dist loadgroup`, each module a group: they share its
# fixtures, and test_scripts' a folder), except these, whose long tests are spread over the
# workers: on an AVX2-only CPU two of test_train's take minutes each (bf16 is emulated there).
SPREAD_MODULES = ("test_train.py", "test_train_resume.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order
    for item in items:
        if item.path.name not in SPREAD_MODULES and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


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
import atexit, ctypes, importlib, json, os, resource, runpy, signal, sys, threading, traceback
setup, preload = json.loads(sys.argv[1])


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# numpy's OpenBLAS starts its pool when it loads, and stops it before a fork (pthread_atfork):
# those threads are the baseline. A fork copies only the thread that calls it: any other thread
# the imports start (an OpenMP pool, a CUDA context, an I/O loop) would be missing in every
# child, with whatever lock it held.
import numpy
openblas = native_threads() - 1
for name in preload:
    importlib.import_module(name)
exec(setup)
print(json.dumps({"threads": native_threads() - openblas, "python_threads": threading.active_count()}), flush=True)
running = set()


def as_python_exits(e: SystemExit) -> int:
    # What the interpreter does with a SystemExit that reaches the top: None 0, an int itself,
    # anything else printed to stderr and 1.
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def exit_flushed(rc: int) -> None:
    # A forked child ends with os._exit (never the parent's clean-up), its output flushed first.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc & 0xFF)


def run_module(req) -> int:
    # As `python -m MODULE ARGS` in a fresh interpreter: the module runs as __main__ (the preloaded
    # copy is dropped from sys.modules, as -m never had it), argv[0] its file, sys.path[0] the
    # working directory, the environment exactly the one asked for, numpy's and torch's default
    # generators seeded afresh (a new interpreter seeds them from the OS; every child would
    # otherwise share the forker's).
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["module"], *req["argv"]]
    sys.path[0] = os.getcwd()
    sys.modules.pop(req["module"], None)
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    if "torch" in sys.modules:  # a new interpreter's default generator starts from a random seed too
        sys.modules["torch"].default_generator.seed()
    try:
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        rc = 0
    except SystemExit as e:
        rc = as_python_exits(e)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        rc = 1
    # The interpreter's shutdown: wait for non-daemon threads, run the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    return rc


def call_target(req) -> int:
    os.environ.update(req["env"])
    module, _, function = req["target"].partition(":")
    try:
        return getattr(importlib.import_module(module), function)(req["argv"]) or 0
    except BaseException:
        traceback.print_exc()
        return 1


def fork_ranks_here(import_time_prefixes, run_time_names) -> None:
    # This child runs torchrun's agent. The agent starts each rank as `python -u -m MODULE ARGS`
    # in a session of its own (SubprocessHandler._popen); here it forks the rank instead, which
    # then starts with MODULE's imports done. The rank is still the agent's child, in its own
    # session, with torchrun's environment, output and exit status; what the agent itself set up
    # after this point (its signal handlers, its logging) is undone in the rank. Its open files
    # stay open there (a cold rank's exec would close them): closing a descriptor under an object
    # that owns it lets the rank reuse the number and the object, on its next fork, close the
    # rank's own file (a loader's task pipe, seen here).
    # A rank whose import-time settings differ from this process's gets a cold start, as torchrun
    # would give it (OMP_NUM_THREADS, say, which torchrun sets when the caller did not).
    import io, logging, subprocess
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    def import_time(env):
        return {k: v for k, v in env.items() if k.startswith(tuple(import_time_prefixes))
                and not k.startswith(tuple(run_time_names))}

    settings = import_time(os.environ)
    handlers = {}
    for s in signal.valid_signals():
        try:
            handlers[s] = signal.getsignal(s)
        except (OSError, ValueError):
            pass
    manager = logging.Logger.manager
    loggers = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
               for name, lg in [("", logging.root), *manager.loggerDict.items()] if isinstance(lg, logging.Logger)}
    fresh_logger = (logging.NOTSET, [], True, False)  # one created after this point
    exit_handlers = atexit._ncallbacks()

    def become_the_rank(module, argv, env, fds) -> int:
        os.setsid()
        for fd, target in zip(fds, (0, 1, 2)):
            if fd != -1:
                os.dup2(fd, target)
        for s, handler in handlers.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)
        for name, lg in [("", logging.root), *manager.loggerDict.items()]:
            if isinstance(lg, logging.Logger):
                lg.level, lg.handlers[:], lg.propagate, lg.disabled = loggers.get(name, fresh_logger)
        # python -u: unbuffered output (the agent's own buffers were flushed before the fork)
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=stream.encoding,
                                                   errors=stream.errors, write_through=True)
                                  for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
        return run_module({"module": module, "argv": argv, "env": env})

    class ForkedRank(subprocess.Popen):
        def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                           creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            pid = os.fork()
            if pid == 0:
                rc = 1
                try:
                    rc = become_the_rank(args[3], list(args[4:]), env, (p2cread, c2pwrite, errwrite))
                finally:
                    exit_flushed(rc)
            self.pid, self._child_created = pid, True

    cold = subprocess_handler.SubprocessHandler._popen

    def _popen(self, args, env):
        if list(args[:3]) == [sys.executable, "-u", "-m"] and import_time(env) == settings:
            if atexit._ncallbacks() != exit_handlers:  # they would run at the rank's exit
                raise RuntimeError("torchrun's agent registered exit handlers: a forked rank would run them")
            return ForkedRank(list(args), env=env, stdout=self._stdout, stderr=self._stderr, start_new_session=True)
        return cold(self, args, env)

    subprocess_handler.SubprocessHandler._popen = _popen


def child(req) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the forker
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req["stderr"] else out
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    rc = 1
    try:
        if req["cwd"]:
            os.chdir(req["cwd"])
        if req.get("fork_ranks"):
            fork_ranks_here(*req["fork_ranks"])
        rc = run_module(req) if req["module"] else call_target(req)
    finally:
        exit_flushed(rc)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "close":  # not only the end of stdin: a process forked from the owner may hold it open
        break
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        running.add(pid)
        reply = {"pid": pid}
    else:  # "reap": the exit status of a child that has ended
        running.discard(req["pid"])
        reply = {"rc": os.waitstatus_to_exitcode(os.waitpid(req["pid"], 0)[1])}
    print(json.dumps(reply), flush=True)
# Closed: no child outlives the forker.
for pid in running:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
"""


class WarmChild:
    """A child of a Forker, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, forker: "Forker", pid: int, args: list[str] | None = None):
        self.forker, self.pid, self.args, self.returncode = forker, pid, args, None

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
                raise subprocess.TimeoutExpired(self.args or f"pid {self.pid}", timeout)
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
    with the imports done instead of spending seconds on them. A child either calls `target`
    ("module:function") with its argv and exits with what it returns (1 and a traceback if it
    raises), or, with `module`, runs it as `python -m module *argv` would (see run_cli).

    Before forking the forker must only import: no torch op that starts the OpenMP pool, no CUDA,
    no thread of any kind (a child gets only the forking thread; a lock another thread held stays
    locked in it forever). The forker counts its threads after `preload` and `setup` and refuses
    to start with more than one. Closing it (or its parent dying: its stdin ends) kills the
    children still running; a child also dies with the forker (PR_SET_PDEATHSIG)."""

    def __init__(self, preload: list[str], setup: str = "", env: dict[str, str] | None = None, *,
                 replace_env: bool = False):
        """`env`: the forker's environment, added to this process's (PYTHONPATH the project), or,
        with `replace_env`, the whole of it."""
        import json
        import subprocess

        self.env = dict(env or {}) if replace_env else {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-c", _FORKER_SOURCE, json.dumps([setup, preload])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=self.env)
        ready = self.proc.stdout.readline()
        if not ready or json.loads(ready) != {"threads": 1, "python_threads": 1}:
            self.close()
            raise RuntimeError(f"the forker must hold one thread before it forks: {ready or 'it exited'}")

    def ask(self, request: dict) -> dict:
        import json

        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forker exited ({self.proc.wait()})")
        return json.loads(line)

    def start(self, target: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> WarmChild:
        """Fork a child that calls `target` ("module:function") with `argv`, stdout and stderr to
        `log`, `env` on top of the forker's environment."""
        return WarmChild(self, self.ask({"op": "start", "target": target, "module": None,
                                         "argv": [str(a) for a in argv], "stdout": str(log), "stderr": None,
                                         "env": env or {}, "cwd": None})["pid"])

    def start_module(self, module: str, argv: list, stdout: Path, stderr: Path | None, env: dict[str, str],
                     cwd: Path = ROOT) -> WarmChild:
        """Fork a child that runs `python -m module *argv` (run_cli): stdout and stderr to their
        files (stderr to stdout's when None), in `cwd`, with exactly `env` as its environment.
        torchrun (torch.distributed.run) forks its `-m` ranks warm as well (fork_ranks_here)."""
        argv = [str(a) for a in argv]
        fork_ranks = [IMPORT_TIME_ENV_PREFIXES, RUN_TIME_ENV] if module == "torch.distributed.run" else None
        return WarmChild(self, self.ask({"op": "start", "target": None, "module": module, "argv": argv,
                                         "stdout": str(stdout), "stderr": None if stderr is None else str(stderr),
                                         "env": env, "cwd": str(cwd), "fork_ranks": fork_ranks})["pid"],
                         [sys.executable, "-m", module, *argv])

    def close(self) -> None:
        import subprocess

        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write('{"op": "close"}\n')
                self.proc.stdin.close()
            except BrokenPipeError:
                pass  # it has exited already
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self.proc.wait()


# Read by the interpreter or a native library when it starts or loads (before the forker forks),
# so a child keeps the forker's value whatever its own environment says: the interpreter's own
# (PYTHONPATH, PYTHONHASHSEED, PYTHONWARNINGS, ...), OpenMP's and MKL's thread counts
# (OMP_NUM_THREADS, MKL_NUM_THREADS, KMP_*, GOMP_*, OPENBLAS_*), the ISA that ATen and oneDNN
# dispatch to (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, DNNL_MAX_CPU_ISA), the GPUs CUDA can see
# (CUDA_VISIBLE_DEVICES, CUDA_*), the loader's (LD_PRELOAD, LD_LIBRARY_PATH), malloc's, and
# torch's own TORCH*/PYTORCH_* settings (torch._dynamo's and inductor's configs read theirs when
# torchvision imports them). A warm request whose value of any of these differs from a forker's
# gets a forker of its own, started with that environment: never a child that silently ignores it.
IMPORT_TIME_ENV_PREFIXES = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "ATEN_", "ONEDNN_", "DNNL_",
                            "CUDA_", "NVIDIA_", "LD_", "MALLOC_", "TORCH", "PYTORCH_")
# ... except these, which torch reads when it uses them: what torchrun sets for each rank, and the
# rendezvous's own switch (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py).
RUN_TIME_ENV = ("TORCHELASTIC_", "TORCH_NCCL_", "TORCHINDUCTOR_CACHE_DIR", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
# What a warm child finds imported: train.run and what it imports, torchvision's models
# (torchvision alone pulls in torch._dynamo: ~1.7 s of the ~3 s a cold start spends importing),
# and torchrun's agent.
WARM_PRELOAD = ["train.run", "torchvision.models", "torch.distributed.run"]
_warm_forkers: dict[tuple, Forker] = {}


def import_time_env(env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(IMPORT_TIME_ENV_PREFIXES) and not k.startswith(RUN_TIME_ENV)))


def warm_forker(env: dict[str, str]) -> Forker:
    """This pytest process's forker for `env`'s import-time settings, started on first use (each
    pytest-xdist worker has its own); all are closed at the end of the session."""
    key = import_time_env(env)
    if key not in _warm_forkers:
        _warm_forkers[key] = Forker(WARM_PRELOAD, env=env, replace_env=True)
    return _warm_forkers[key]


def close_warm_forkers() -> None:
    while _warm_forkers:
        _warm_forkers.popitem()[1].close()


@pytest.fixture(scope="session", autouse=True)
def _close_warm_forkers_at_the_end():
    yield
    close_warm_forkers()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment run_cli gives a command: this process's, PYTHONPATH the project, `extra` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def start_cli(module: str, *args, log: Path, warm: bool = False, env: dict[str, str] | None = None):
    """`python -m module *args` started in the background, stdout and stderr to `log`: a
    subprocess.Popen, or with `warm` a WarmChild forked warm (see run_cli); both poll, wait,
    send_signal and kill."""
    import subprocess

    env = cli_env() if env is None else env
    if warm:
        return warm_forker(env).start_module(module, args, log, None, env)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _run_warm(module: str, args, env: dict[str, str], timeout: float | None, check: bool = False):
    """run_cli's warm path: subprocess.run's result and exceptions, from a child of warm_forker."""
    import shutil
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="warm-cli-"))
    try:
        proc = warm_forker(env).start_module(module, args, tmp / "stdout", tmp / "stderr", env)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout, (tmp / "stdout").read_text(),
                                            (tmp / "stderr").read_text()) from None
        r = subprocess.CompletedProcess(proc.args, proc.returncode, (tmp / "stdout").read_text(),
                                        (tmp / "stderr").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if check:
        r.check_returncode()
    return r
