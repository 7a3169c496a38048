"""The seed-compatible launch scripts (test/*.sh) on tiny data with the CPU."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from s3_server import free_port

TINY = ["--device=cpu", "--arch", "resnet18", "--image-size", "32", "--stem", "imagenet", "--epochs", "1",
        "--workers", "1", "--print-freq", "2", "--loss-scale", "dynamic"]


def run_script(name: str, *args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), ASCEND_DEVICE_ID="7", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(["bash", str(ROOT / "test" / name), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def clean_output():
    yield ROOT / "test" / "output" / "7"
    shutil.rmtree(ROOT / "test" / "output" / "7", ignore_errors=True)


def final(stdout: str, what: str) -> str:
    m = re.search(rf"Final {what} : (\S*)", stdout)
    assert m, stdout
    return m.group(1)


def test_performance_1p_script(colour_shards, clean_output):
    r = run_script("train_performance_1p.sh", f"--data_path={colour_shards}", *TINY, "--batch-size", "6",
                   "--max-steps", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert float(final(r.stdout, "Performance images/sec")) > 0
    log = (clean_output / "train_7.log").read_text()
    assert "Epoch: [0][" in log and "FPS@all" in log


def test_full_8p_and_eval_8p_scripts_with_two_processes(colour_shards, clean_output):
    r = run_script("train_full_8p.sh", f"--data_path={colour_shards}", "--nproc=2", *TINY, "--batch-size", "6",
                   env_extra={"MASTER_PORT": str(free_port())})
    assert r.returncode == 0, r.stdout + r.stderr
    acc = float(final(r.stdout, "Train Accuracy"))
    assert 0.0 <= acc <= 100.0
    ckpt = clean_output / "full_8p" / "checkpoint.pth.tar"
    assert ckpt.is_file()
    e = run_script("train_eval_8p.sh", f"--data_path={colour_shards}", "--nproc=2", f"--resume={ckpt}", *TINY,
                   "--batch-size", "6", env_extra={"MASTER_PORT": str(free_port())})
    assert e.returncode == 0, e.stdout + e.stderr
    assert float(final(e.stdout, "Train Accuracy")) == acc  # same weights, same val set, counted once


def test_script_without_data_path_fails_clearly():
    r = run_script("train_full_1p.sh")
    assert r.returncode == 2 and "--data_path" in r.stderr


def test_device_check_rehearses_on_cpu(tmp_path):
    """benchmarks/device_check.sh with DRY=1: every step of the GPU check at tiny sizes on the CPU,
    so the script a GPU task runs once has run here, whole, in CI."""
    out = tmp_path / "out"
    env = dict(os.environ, DRY="1", OUT=str(out), WORK=str(tmp_path / "work"), WORKERS="2", PY=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # Only a few files come back from a lent machine: the check leaves exactly these three.
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "logs.tar.gz", "summary.txt"]
    found = json.loads((out / "device_check.json").read_text())
    assert re.match(r"\d+ passed", found["tests"]) and "failed" not in found["tests"]
    import torchvision

    assert f"python {platform.python_version()} torchvision {torchvision.__version__}\n" in found["machine"]
    configs = {(row["what"].split(",")[0], row["config"].split(",")[0]) for row in found["rows"]}
    assert {("loader alone", "nvjpeg"), ("loader alone", "cpu"), ("end to end", "synthetic"),
            ("end to end", "nvjpeg"), ("end to end", "cpu")} <= configs
    assert sum(row["what"].startswith("train step") for row in found["rows"]) == 2
    assert all(row["img_s"] > 0 for row in found["rows"])
