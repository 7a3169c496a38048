"""train.run stores the loader's state as the backend gave it and never edits it: a run stopped
mid-epoch and resumed trains on exactly the batches of an uninterrupted run, with every backend.
(It used to overwrite the state's batch index, which lost a batch with the dali backend.)"""
from __future__ import annotations

import pytest

from conftest import run_cli
from test_train import losses

ARGS = ["--arch", "resnet18", "--image-size", "32", "--stem", "imagenet", "--device", "cpu", "-j", "2", "-b", "8",
        "--epochs", "2", "--lr", "0.02", "--warm-up-epochs", "0", "-p", "1", "--seed", "7"]


@pytest.mark.parametrize("backend", ["cpu", "nvjpeg", "dali"])
def test_stopped_and_resumed_run_trains_on_the_same_batches(colour_shards, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda130) is not installed")
    args = ["--shards", colour_shards, "--backend", backend, *ARGS]
    whole = run_cli("train.run", *args, "--output", tmp_path / "whole", timeout=600, warm=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # Stopped after 4 of epoch 0's 7 steps, with the 5th batch already fetched, then resumed.
    part = run_cli("train.run", *args, "--max-steps", "4", "--output", tmp_path / "part", timeout=600, warm=True)
    assert part.returncode == 0, part.stderr[-2000:]
    rest = run_cli("train.run", *args, "--resume", tmp_path / "part" / "checkpoint.pth.tar",
                   "--output", tmp_path / "part", timeout=600, warm=True)
    assert rest.returncode == 0, rest.stderr[-2000:]
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert sorted(ref) == sorted(got) == list(range(1, 15))
    assert got == ref  # bitwise: the same batches, in the same order
