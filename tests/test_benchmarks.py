"""The benchmark photo set (deterministic, the promised ImageNet-like mix) and the benchmark CLIs'
flag validation. Fast: a few dozen renders and in-process argument parsing."""
import importlib.util
import io
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from benchmarks import photos
from benchmarks.photos import SUBSAMPLING, PhotoConfig, plan, render

from conftest import ROOT, cli_env, make_colour_folder, run_cli

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image (the photos) is not installed")


def test_plans_follow_imagenet_mix():
    cfg = PhotoConfig()
    ps = [plan(k, i, "train", cfg) for k in range(20) for i in range(150)]
    w = np.array([p.width for p in ps])
    h = np.array([p.height for p in ps])
    # Mean about 500 x 430, most at a 500 px longer side, the rest spread well beyond it.
    assert 470 < w.mean() < 550 and 400 < h.mean() < 470
    long = np.maximum(w, h)
    assert 0.45 < np.mean(long == 500) < 0.7
    assert np.mean(long < 400) > 0.05 and np.mean(long > 700) > 0.03
    assert np.mean(w < h) > 0.1  # portraits too
    q = np.array([p.quality for p in ps])
    assert 0.75 < np.mean((q >= 75) & (q <= 95)) < 0.92
    assert np.any(q < 75) and np.any(q > 95)
    sub = Counter(p.subsampling for p in ps)
    assert 0.78 < sub["4:2:0"] / len(ps) < 0.92 and sub["4:4:4"] / len(ps) > 0.06 and sub["4:2:2"] > 0
    modes = Counter(p.mode for p in ps)
    assert modes["L"] > 0.01 * len(ps) and modes["CMYK"] > 0 and modes["RGB"] > 0.95 * len(ps)
    assert len({p.photo for p in ps}) == len(photos.COLOUR + photos.GREY)


def test_plans_are_keyed_on_seed_and_position():
    cfg = PhotoConfig()
    assert plan(3, 7, "train", cfg) == plan(3, 7, "train", cfg)
    others = {plan(3, 7, "val", cfg), plan(3, 8, "train", cfg), plan(3, 7, "train", PhotoConfig(seed=1))}
    assert plan(3, 7, "train", cfg) not in others


def _quant_tables(quality: int) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=quality)
    return Image.open(buf).quantization


@needs_skimage
def test_files_honour_their_plans():
    """Size, mode, chroma subsampling and quantization (i.e. quality) of the written JPEGs."""
    cfg = PhotoConfig()
    keys = [(k, i) for k in range(2) for i in range(8)]
    grey = next((0, i) for i in range(500) if plan(0, i, "train", cfg).mode == "L")
    cmyk = next((0, i) for i in range(2000) if plan(0, i, "train", cfg).mode == "CMYK")
    sizes = []
    for k, i in dict.fromkeys(keys + [grey, cmyk]):  # grey or cmyk may already be among keys
        p = plan(k, i, "train", cfg)
        data = render(k, i, "train", cfg)
        sizes.append(len(data))
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.size == (p.width, p.height) and im.mode == p.mode
        if p.mode == "RGB":
            assert JpegImagePlugin.get_sampling(im) == SUBSAMPLING[p.subsampling]
        assert im.quantization[0] == _quant_tables(p.quality)[0]
        # Photo content with camera noise, not a flat render: the pixels vary locally.
        a = np.asarray(im.convert("L"), np.float32)
        assert np.abs(np.diff(a, axis=1)).mean() > 2.0
    assert len(set(sizes)) == len(sizes)
    assert 40e3 < np.mean(sizes[:len(keys)]) < 250e3


@needs_skimage
def test_generate_is_deterministic_across_workers(tmp_path):
    cfg = PhotoConfig(classes=2, per_class=3, val_per_class=1, seed=5)
    a = photos.generate(tmp_path / "a", cfg, workers=1)
    b = photos.generate(tmp_path / "b", cfg, workers=2)
    files = sorted(f.relative_to(a) for f in a.rglob("*.JPEG"))
    assert len(files) == 2 * 3 + 2 * 1
    assert files == sorted(f.relative_to(b) for f in b.rglob("*.JPEG"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = photos.generate(tmp_path / "c", PhotoConfig(classes=2, per_class=3, val_per_class=1, seed=6), workers=1)
    assert (other / files[0]).read_bytes() != (a / files[0]).read_bytes()


def test_missing_scikit_image_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="scikit-image"):
        photos.photo_dir()


def test_imagenet_like_rejects_unknown_content(tmp_path):
    from benchmarks.common import imagenet_like

    with pytest.raises(ValueError, match="content"):
        imagenet_like(1, 1, cache=tmp_path, content="cartoons")


def _flag_error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code != 0
    return capsys.readouterr().err


def test_loader_flags_validate(tmp_path, capsys, colour_shards):
    from benchmarks.loader import parse_args

    assert "--src" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "missing")])
    (tmp_path / "flat").mkdir()
    assert "no train/" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "flat")])
    (tmp_path / "empty" / "train" / "n0").mkdir(parents=True)
    assert "--src" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "empty")])
    assert "--shards" in _flag_error(capsys, parse_args, ["--shards", str(tmp_path / "missing")])
    err = _flag_error(capsys, parse_args, ["--shards", str(tmp_path / "flat")])
    assert "--shards" in err and "manifest" in err
    # Good paths pass.
    src = make_colour_folder(tmp_path / "good", per_class=1, val_per_class=0)
    a = parse_args(["--src", str(src), "--shards", str(colour_shards)])
    assert a.src == src and a.shards == colour_shards


def test_loader_cli_exits_nonzero_on_bad_path(tmp_path):
    r = run_cli("benchmarks.loader", "--shards", tmp_path / "nowhere", warm=True)
    assert r.returncode != 0 and "--shards" in r.stderr and "Traceback" not in r.stderr


def test_ffcv_compare_flags_validate(tmp_path, capsys):
    from benchmarks.ffcv_compare import main

    assert "--ffcv-python" in _flag_error(capsys, main, [])
    assert "--ffcv-python" in _flag_error(capsys, main, ["--ffcv-python", str(tmp_path / "python")])


# -- every figure names its machine ------------------------------------------------------------------

CPUINFO = {  # the lines of /proc/cpuinfo that matter, from five generations of x86 server
    "AMX bf16": "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse4_2 avx avx2 avx512f "
                "avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n",
    "AVX-512 bf16": "model name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: sse4_2 avx avx2 avx512f "
                    "avx512bw avx512_bf16\n",
    "AVX-512": "model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: sse4_2 avx avx2 avx512f avx512bw\n",
    "AVX2": "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz\nflags\t\t: sse4_2 avx avx2 fma\n",
    "below AVX2": "model name\t: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz\nflags\t\t: sse4_2 avx\n",
}


@pytest.mark.parametrize("level", list(CPUINFO))
def test_isa_level_from_cpuinfo(level):
    from benchmarks.machine import isa_level, parse_cpuinfo

    # Two processors, as the real file lists each: the first one's lines are taken.
    model, flags = parse_cpuinfo("processor\t: 0\n" + CPUINFO[level] + "\nprocessor\t: 1\n" + CPUINFO["AVX2"])
    assert model == CPUINFO[level].split(": ", 1)[1].split("\n")[0]
    assert isa_level(flags) == level


def test_describe_names_cpu_cores_isa_torch_and_caps(tmp_path):
    import torch

    from benchmarks.machine import describe, header

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + CPUINFO["AMX bf16"])
    info = describe(cpuinfo=cpuinfo, environ={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                              "HOME": "/somewhere", "OMP_NUM_THREADS": ""})
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["cores"] == os.cpu_count() and info["cores_usable"] == len(os.sched_getaffinity(0))
    assert info["isa"]["cpu"] == "AMX bf16" and info["isa"]["flags"] == ["avx2", "avx512f", "avx512_bf16",
                                                                         "amx_tile", "amx_bf16"]
    # What torch itself dispatches to in this process (the caps above are only recorded: torch read
    # the real environment when it started).
    assert info["isa"]["torch"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["isa"]["onednn_bf16"], bool)
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["build"] == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
    assert info["caps"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # set ones only
    line = header(info)
    for part in ("machine: Intel(R) Xeon(R) Platinum 8480+", f"{os.cpu_count()} cores", "AMX bf16 [",
                 f"torch kernels {torch.backends.cpu.get_cpu_capability()}", f"torch {torch.__version__}",
                 "caps ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"):
        assert part in line
    assert "no caps" in header({**info, "caps": {}})


@pytest.mark.skipif("avx2" not in open("/proc/cpuinfo").read(), reason="the cap needs a CPU with AVX2")
def test_machine_cli_records_the_avx2_cap(tmp_path):
    """Under ATEN_CPU_CAPABILITY=avx2 torch dispatches to AVX2 kernels, and the description says so,
    next to the CPU's own level."""
    from benchmarks.machine import CAP_VARS, isa_level, parse_cpuinfo

    out = tmp_path / "m.json"
    caps = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    # Only these caps: none from the machine running the tests (pytest's workers set OMP_NUM_THREADS).
    r = run_cli("benchmarks.machine", "--json", out, env=cli_env(**{**dict.fromkeys(CAP_VARS, ""), **caps}),
                timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(out.read_text())
    assert info["isa"]["torch"] == "AVX2"
    assert info["isa"]["cpu"] == isa_level(parse_cpuinfo(open("/proc/cpuinfo").read())[1])
    assert info["caps"] == caps
    import torchvision

    assert info["torchvision"] == torchvision.__version__  # read there without importing torchvision
    assert r.stdout.startswith("machine: ") and "torch kernels AVX2" in r.stdout
    assert "caps ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in r.stdout


def test_describe_without_x86_flags(tmp_path):
    """An Arm /proc/cpuinfo has no model name and lists "Features", not "flags": the level is
    unknown rather than guessed, and the line says so."""
    from benchmarks.machine import describe, header, parse_cpuinfo

    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo(arm) == (None, set())
    (tmp_path / "cpuinfo").write_text(arm)
    info = describe(cpuinfo=tmp_path / "cpuinfo", environ={})
    assert info["isa"]["cpu"] == "unknown (no cpuinfo flags)" and info["isa"]["flags"] == [] and info["cpu"]
    assert "none of avx2 avx512f avx512_bf16 amx_tile amx_bf16" in header(info)


MACHINE_KEYS = {"cpu", "cores", "cores_usable", "isa", "torch", "caps"}


def test_write_json_records_the_machine_atomically(tmp_path):
    from benchmarks.common import write_json

    path = write_json("x", {"rows": [1]}, out_dir=tmp_path)
    record = json.loads(path.read_text())
    assert MACHINE_KEYS <= set(record["machine"]) and record["rows"] == [1]
    given = {"cpu": "named by the caller"}
    assert json.loads(write_json("x", {}, out_dir=tmp_path, machine=given).read_text())["machine"] == given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary left behind


def _benchmark_json(out_dir) -> dict:
    (path,) = out_dir.glob("*.json")
    return json.loads(path.read_text())


def test_train_step_prints_and_records_its_machine(tmp_path):
    from benchmarks.machine import describe, header

    r = run_cli("benchmarks.train_step", "--arch", "resnet18", "--batch-size", "2", "--image-size", "32",
                "--levels", "O0:fp32", "--compile", "off", "--optimizers", "fused", "--channels-last", "on",
                "--steps", "1", "--repeats", "1", env=cli_env(BENCH_OUT=str(tmp_path)), timeout=300, warm=True)
    assert r.returncode == 0, r.stderr[-2000:]
    record = _benchmark_json(tmp_path)
    machine = record["machine"]
    assert r.stdout.splitlines()[0] == header(machine)  # first, and the same machine as the JSON's
    assert machine["cpu"] == describe()["cpu"] and MACHINE_KEYS <= set(machine)
    assert record["rows"][0]["cpu_img_s"] > 0 and "img/CPU-s" in r.stdout
    # Run from the shell, the JSON still says how: the flags, not just the module.
    assert record["command"].startswith("python -m benchmarks.train_step --arch resnet18 --batch-size 2")


def test_loader_prints_and_records_its_machine(tmp_path, colour_shards):
    from benchmarks.machine import header

    r = run_cli("benchmarks.loader", "--shards", colour_shards, "--workers", "1", "--repeats", "1",
                "--batch-size", "8", "--chart", tmp_path / "chart.png", env=cli_env(BENCH_OUT=str(tmp_path)),
                timeout=300, warm=True)
    assert r.returncode == 0, r.stderr[-2000:]
    record = _benchmark_json(tmp_path)
    machine = record["machine"]
    assert r.stdout.splitlines()[0] == header(machine) and MACHINE_KEYS <= set(machine)
    assert record["ceilings"]["given"]["ours_cpu"] > 0 and "img/CPU-s" in r.stdout


def test_every_benchmark_prints_and_records_its_machine():
    """The benchmarks too slow to run here: each main prints the machine first (print_machine) and
    hands that description to every write_json call."""
    import ast

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        writes = [c for c in calls if c.func.id == "write_json"]
        if not writes or path.name == "common.py":
            continue
        assert any(c.func.id == "print_machine" for c in calls), f"{path.name} never prints its machine"
        for c in writes:
            assert any(k.arg == "machine" for k in c.keywords), f"{path.name}:{c.lineno} writes no machine"


def test_device_summary_carries_the_machine(tmp_path):
    from benchmarks.device_summary import collect

    (tmp_path / "machine.json").write_text(json.dumps({"cpu": "AMD EPYC 9654", "gpu": "NVIDIA H100 80GB HBM3"}))
    assert collect(tmp_path)["machine_info"] == {"cpu": "AMD EPYC 9654", "gpu": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "machine.json").unlink()
    assert collect(tmp_path)["machine_info"] is None


def test_timed_reports_the_rate_per_cpu_second():
    """A wait costs wall time but no CPU time: the CPU rate is the one other jobs' load leaves alone."""
    import time

    from benchmarks.common import timed

    r = timed(lambda: (time.sleep(0.05), 10)[1], repeats=3, warmup=0)
    assert r["median"] < 250 and (r["cpu_rate"] is None or r["cpu_rate"] > 5 * r["median"])


def test_kernels_normalize_rows_time_the_same_batch():
    from benchmarks.kernels import normalize_rows

    rng = np.random.default_rng(0)
    decoded = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(3)]
    boxes = np.array([[10.0, 20.0, 200.0, 150.0]] * 3)
    got = []

    def piece(name, fn, ref=None):
        got.append((name, fn(), ref))
        return got[-1]

    normalize_rows(decoded, boxes, np.array([False, True, False]), piece, batch=5)
    assert [n for n, _, _ in got] == ["normalize to fp32: torchvision ToTensor + Normalize + stack",
                                      "normalize to fp32: ours, one op on the uint8 batch"]
    assert [k for _, k, _ in got] == [5, 5] and got[1][2] is got[0]


def test_kernels_time_only_what_the_roi_decoder_takes():
    """The photo set holds a few CMYK JPEGs, which the ROI decoder refuses (the loader decodes them
    with Pillow): benchmarks.kernels leaves them out instead of stopping on the first."""
    from benchmarks.kernels import roi_decodable
    from kernels import _jpeg

    def jpeg(mode):
        buf = io.BytesIO()
        Image.new(mode, (64, 48), 90).save(buf, format="JPEG")
        return buf.getvalue()

    rgb, grey, cmyk = jpeg("RGB"), jpeg("L"), jpeg("CMYK")
    with pytest.raises(_jpeg.UnsupportedJPEG):
        _jpeg.decode_region(cmyk, 0, 0, 64, 48, 1, np.empty(1 << 16, np.uint8), False)
    assert roi_decodable([rgb, cmyk, grey]) == [rgb, grey]
    for d in (rgb, grey):
        _jpeg.decode_region(d, 0, 0, 64, 48, 1, np.empty(1 << 16, np.uint8), False)


def test_ffcv_reference_corrects_only_a_different_stack():
    """FFCV's reference is divided by the measured per-sample CPU-rate ratio where the two
    processes' library versions differ (a slower Pillow there must not flatter FFCV's loaders),
    and left alone where they are the same (the ratio is then the busy machine's noise)."""
    from benchmarks.ffcv_compare import ffcv_reference

    stack = {"torch": "2.14.1", "Pillow": "13.0.0", "torch_threads": 2}
    mine = {"stack": stack, "reference_cpu": 300.0, "reference_cpu_after": 300.0}
    theirs = {"stack": {**stack, "torch_threads": 1, "opencv_threads": 2}, "reference_cpu": 240.0,
              "reference": 400.0, "reference_after": 440.0}
    assert ffcv_reference(mine, theirs) == (420.0, 1.0, 0.8, {})
    theirs["stack"] = {**theirs["stack"], "Pillow": "11.3.0"}
    ref, factor, measured, differ = ffcv_reference(mine, theirs)
    assert (factor, measured, differ) == (0.8, 0.8, {"Pillow": ("13.0.0", "11.3.0")})
    assert ref == pytest.approx(525.0)  # 420 img/s on a stack 0.8x as fast is 525 on ours


def test_slowdown_runs_a_command_for_its_share_of_the_time(tmp_path):
    """The command gets at most its share of wall time (stopped the rest: a CPU-bound loop gets
    CPU time at most that share of its wall time, whatever else the machine runs), its children
    too, and its exit status comes back."""
    from benchmarks.slowdown import main

    busy = ("import os, time\n"
            "w, c = time.perf_counter(), time.process_time()\n"
            "while time.process_time() - c < 0.4: pass\n"
            "print((time.process_time() - c) / (time.perf_counter() - w))\n"
            "raise SystemExit(3)\n")
    script = tmp_path / "busy.py"
    script.write_text(busy)
    out = tmp_path / "share.txt"
    wrapper = f"import subprocess, sys; r = subprocess.run([sys.executable, {str(script)!r}], " \
              f"capture_output=True, text=True); open({str(out)!r}, 'w').write(r.stdout); sys.exit(r.returncode)"
    assert main(["--share", "0.25", "--period", "0.02", "--", sys.executable, "-c", wrapper]) == 3
    assert float(out.read_text()) < 0.4  # 0.25 and the stop/start jitter; unthrottled it is about 1


@pytest.mark.parametrize("args,needle", [(["--share", "0", "--", "true"], "--share"),
                                         (["--share", "0.5", "--period", "0", "--", "true"], "--period"),
                                         (["--share", "0.5"], "no command")])
def test_slowdown_flags_validate(capsys, args, needle):
    from benchmarks.slowdown import main

    assert needle in _flag_error(capsys, main, args)


@pytest.mark.parametrize("args,needle", [(["--repeats", "0"], "--repeats"), (["--slow", "1.5"], "--slow"),
                                         (["--cap", "sse2"], "--cap")])
def test_demo_benchmark_flags_validate(capsys, args, needle):
    from benchmarks.demo import main

    assert needle in _flag_error(capsys, main, args)


def test_demo_benchmark_counts_the_machines_other_load():
    """The CPU time of a busy loop in another process shows up as the machine's, not the demo's."""
    from benchmarks.demo import busy_cpu_seconds

    before = busy_cpu_seconds()
    loop = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", loop], check=True)
    assert busy_cpu_seconds() - before >= 0.25


def test_objstore_flags_validate(capsys):
    from benchmarks.objstore import parse_args

    assert "--latencies-ms" in _flag_error(capsys, parse_args, ["--latencies-ms", "-5"])
    assert "--repeats" in _flag_error(capsys, parse_args, ["--repeats", "0"])
    assert "--nodes" in _flag_error(capsys, parse_args, ["--nodes", "0"])
    assert "--small-cache" in _flag_error(capsys, parse_args, ["--small-cache", "1.5"])
    a = parse_args([])
    assert a.latencies_ms == [0, 10, 30, 100] and a.nodes == [1, 8, 64] and a.gpu_rate == 3000


def test_objstore_counts_requests_and_models_the_cluster():
    from types import SimpleNamespace

    from benchmarks.objstore import (IMAGENET_IMAGES, PREFIX_GETS_PER_S, model, order_stats, parse_args,
                                     request_counts)

    req = lambda method, key, rng=None: SimpleNamespace(method=method, key=key,  # noqa: E731
                                                        headers={"range": rng} if rng else {})
    seen = [req("GET", "b/ds/a.tar", "bytes=0-99"), req("GET", "b/ds/b.tar"), req("GET", "b/ds/a.idx"),
            req("HEAD", "b/ds/a.tar"), req("GET", "b/other/a.tar")]
    assert request_counts(seen, "b/ds/", {"a.tar": 1000, "b.tar": 500}) == (1, 1, 600)
    # One GET per sample without a cache; one whole GET per shard in epoch 1; none later.
    rows = [{"latency_ms": 30, "run": "ranged+ahead", "gets": 100, "samples": 100, "mb": 1.0, "whole_gets": 0},
            {"latency_ms": 30, "run": "cache e1 wait", "gets": 10, "samples": 100, "mb": 1.0, "whole_gets": 10},
            {"latency_ms": 30, "run": "cache e2+", "gets": 0, "samples": 100, "mb": 0.0, "whole_gets": 0}]
    cluster = {(r["nodes"], r["mode"]): r for r in model(rows, 100, 1_000_000, 10, parse_args([]))}
    big = cluster[(64, "no cache")]
    assert big["gets"] == IMAGENET_IMAGES and big["get_s"] == pytest.approx(64 * 8 * 3000)
    assert big["of_prefix"] == pytest.approx(64 * 8 * 3000 / PREFIX_GETS_PER_S)
    assert cluster[(64, "cache, epoch 2+")]["get_s"] == 0
    assert cluster[(1, "cache, epoch 1")]["gets"] == pytest.approx(140e9 / 256e6)
    # A full permutation spreads a batch over the shards; blocks keep it within one.
    full = order_stats([10, 10], np.arange(20)[::-1].copy(), 10)
    assert full == {"shards_per_batch": 1.0, "same_shard": 18 / 19, "shard_distance": 1 / 19}
