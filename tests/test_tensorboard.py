"""--tensorboard: the scalars of metrics.jsonl, at the same steps, read back from the event files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold for metrics.jsonl's rows (it stores float32)."""
    from train.metrics import TENSORBOARD_TAGS

    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key not in ("step", "epoch"):
                out.setdefault(TENSORBOARD_TAGS[key], []).append((r["step"], float(np.float32(value))))
    return out


def test_tensorboard_holds_what_metrics_jsonl_holds(colour_shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train.run", "--shards", colour_shards, "--arch", "resnet18", "--image-size", "32", "--stem", "imagenet",
                "--device", "cpu", "-j", "1", "-b", "8", "--epochs", "1", "--lr", "0.02", "-p", "2", "--tensorboard", "--output", run,
                timeout=300, warm=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "img_s", "data_wait"} <= set(rows[0]) and any("val_acc1" in x for x in rows)
    got = scalars(run / "tensorboard")
    assert set(got) == {"train/loss", "train/lr", "train/img_s", "train/data_wait", "val/acc1", "val/train_s",
                        "train/image_size"}
    assert got == expected(rows)
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 7] and [s for s, _ in got["val/acc1"]] == [7]
    from train.plot import main as plot_main

    assert plot_main([str(run)]) == 0 and (run / "curves.png").stat().st_size > 10_000  # train.plot stays


def test_a_resumed_run_hides_the_scalars_of_redone_steps(tmp_path):
    from train.metrics import MetricsWriter, drop_rows_after

    first = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    for step in range(1, 6):
        first.write(step=step, epoch=0, loss=float(step), lr=0.1)
    first.close()  # as if it died after step 5, its newest checkpoint being step 3's
    assert [r["step"] for r in drop_rows_after(tmp_path / "metrics.jsonl", 3)] == [4, 5]
    again = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb", purge_step=4)
    for step in (4, 5):
        again.write(step=step, epoch=0, loss=10.0 * step, lr=0.1)
    again.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0]
    assert scalars(tmp_path / "tb") == expected(rows)


def test_without_tensorboard_the_flag_fails_at_startup_naming_the_package(colour_shards, tmp_path):
    # The package hidden from the import system: the run stops before it trains anything.
    code = ("import sys; sys.modules['tensorboard'] = None; from train.run import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--shards", str(colour_shards), "--device", "cpu",
                        "--tensorboard", "--output", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensorboard" in lines[0] and "pip install tensorboard" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
