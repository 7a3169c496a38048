"""Several nodes and elastic restart as torchrun runs them, on this one machine with gloo: a 2-node
run equals a 1-node x 2-process run, and a rank SIGKILLed mid-epoch costs at most --save-every
steps and leaves the run bit-identical to an uninterrupted one."""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, descendants, proc_state, start_cli
from s3_server import env_for, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; gloo on loopback")

# 60 train samples, 4 per rank and 2 ranks: 7 steps an epoch, 14 in all; checkpoints at steps 3, 6,
# 9 and 12 (mid-epoch) and 7 and 14 (epoch ends). Every step logs its loss.
SAVE_EVERY = 3
ARGS = ["--arch", "resnet18", "--image-size", "32", "--stem", "imagenet", "--device", "cpu", "-j", "1", "-b", "4",
        "--epochs", "2", "--lr", "0.02", "--warm-up-epochs", "0", "-p", "1", "--seed", "7",
        "--save-every", str(SAVE_EVERY)]
# A store of its own for each group torchrun starts: a restarted group that shares the dead one's
# store can read its addresses and hang in init (pytorch/pytorch#135712; train.run warns).
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def shards(colour_shards) -> str:
    """Where every run here reads its shards: the one place to point them at another store."""
    return str(colour_shards)


def torchrun(port: int, *, nnodes: int = 1, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """torchrun's arguments for a c10d rendezvous on loopback (one per node), up to `-m train.run`."""
    return ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}",
            "-m", "train.run"]


def start(args: list, log: Path, warm: bool = True, **env: str):
    """`torchrun *args` in the background, output to `log`: warm, it and its ranks start with their
    imports done (conftest.run_cli); cold, as a user starts it."""
    return start_cli("torch.distributed.run", *args, log=log, warm=warm, env={**ENV, **env})


def finish(proc, log: Path) -> None:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-4000:]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> loss, step -> val top-1) of a run, asserting no step was logged twice."""
    r = rows(run)
    loss = {x["step"]: x["loss"] for x in r if "loss" in x}
    val = {x["step"]: x["val_acc1"] for x in r if "val_acc1" in x}
    assert len(loss) + len(val) == len(r), "a step logged twice"
    return loss, val


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pth.tar", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 1-node x 2-process run."""
    out = tmp_path_factory.mktemp("reference")
    proc = start([*torchrun(free_port()), "--shards", shards, *ARGS, "--output", out / "run"], out / "log")
    finish(proc, out / "log")
    return out / "run"


def test_reference_run_is_what_the_tests_below_assume(reference):
    cfg = json.loads((reference / "config.json").read_text())
    assert cfg["world_size_effective"] == 2 and cfg["steps_per_epoch"] == 7 and cfg["resume"] == "auto"
    loss, val = curve(reference)
    assert sorted(loss) == list(range(1, 15)) and sorted(val) == [7, 14]
    assert "--resume auto: no checkpoint" in (reference / "train.log").read_text()


def test_torchrun_restarts_a_killed_rank_and_the_run_stays_bit_identical(shards, reference, tmp_path):
    out = tmp_path / "run"
    # Cold: the rank to kill is found by the RANK in its /proc environ, which a forked rank lacks.
    agent = start([*torchrun(free_port(), max_restarts=1), "--shards", shards, *ARGS, "--output", out],
                  tmp_path / "log", warm=False)
    # Once step 10 is logged, the checkpoint of step 9 (epoch 1, mid-epoch) is on disk: kill rank 1.
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and agent.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= 10 for r in rows(out)):
            break
        time.sleep(0.05)
    ranks = {}
    for pid in descendants(agent.pid):
        if proc_state(pid) and proc_state(pid)[1] == agent.pid:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks.update({int(e[5:]): pid for e in env if e.startswith(b"RANK=")})
    assert sorted(ranks) == [0, 1], (ranks, (tmp_path / "log").read_text()[-3000:])
    family = descendants(ranks[1])  # its loader workers and their fork server
    assert family, "rank 1 runs its loader workers in processes"
    os.kill(ranks[1], signal.SIGKILL)
    finish(agent, tmp_path / "log")

    log = (out / "train.log").read_text()
    resumed = [x for x in log.splitlines() if x.startswith("=> resumed from")]
    assert len(resumed) == 1 and "(torchrun restart 1)" in resumed[0], resumed
    at = int(resumed[0].split(": step ")[1].split(",")[0])
    assert at in (9, 12) and "after batch" in resumed[0], resumed  # a mid-epoch checkpoint past step 7
    lost = int(resumed[0].split("; ")[1].split(" step")[0]) if "redone" in resumed[0] else 0
    assert lost <= SAVE_EVERY, resumed  # at most --save-every steps lost
    # Bit-identical: every loss (logged once per step), every val top-1 and the final weights.
    assert curve(out) == curve(reference)
    assert_same_weights(final_weights(out), final_weights(reference))
    left = [p for p in family if proc_state(p) is not None]
    assert not left, f"the killed rank's loader processes outlived it: {left}"


def test_two_nodes_from_a_bucket_train_like_one_node_with_two_processes(s3_env, s3_colour_shards, reference,
                                                                        tmp_path):
    """The bucket-to-2-node recipe: two torchrun agents, one per "node" (each with its own disk,
    here its own cache folder), read their shares of the shards from an S3 server and write the run
    (checkpoints, metrics, log) to the bucket. c10d ranks the nodes itself (--node-rank is for the
    static rendezvous only). Same data as the reference, read from the local copy."""
    from conftest import new_bucket
    from pipeline import objstore

    output = f"{new_bucket()}/run"
    port = free_port()
    nodes = [start([*torchrun(port, nnodes=2, nproc=1), "--shards", s3_colour_shards, *ARGS, "--output", output],
                   tmp_path / f"node{n}.log", RESNET_RUN_CACHE=str(tmp_path / f"disk{n}"), **env_for(s3_env.endpoint))
             for n in (0, 1)]
    for n, proc in enumerate(nodes):
        finish(proc, tmp_path / f"node{n}.log")
    assert {"checkpoint.pth.tar", "checkpoint.prev.pth.tar", "model_best.pth.tar", "metrics.jsonl", "train.log",
            "config.json"} <= set(objstore.listdir(output))
    run = tmp_path / "from-bucket"
    run.mkdir()
    for name in ("checkpoint.pth.tar", "metrics.jsonl", "config.json"):  # what the checks below read
        objstore.get_file(f"{output}/{name}", run / name)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size_effective"] == 2 and cfg["steps_per_epoch"] == 7
    assert curve(run) == curve(reference)  # the loss of every step, and val top-1
    assert_same_weights(final_weights(run), final_weights(reference))
    assert sum((tmp_path / f"disk{n}").exists() for n in (0, 1)) == 1, "only rank 0 keeps a local mirror"


def test_a_restart_resumes_from_the_newest_checkpoint_on_any_ranks_disk(shards, reference, tmp_path):
    # torchrun does not keep RANK across restarts: rank 0 may come back on a node whose disk has
    # no checkpoint. Two processes, each with its own --output, stand in for two nodes.
    def launch(outputs: list[Path], *extra) -> None:
        port = free_port()
        procs = [start_cli("train.run", "--shards", shards, *ARGS, "--world-size", "2", "--rank", r, "--dist-url",
                           f"tcp://127.0.0.1:{port}", "--output", outputs[r], *extra, log=tmp_path / f"rank{r}.log",
                           warm=True, env=ENV) for r in (0, 1)]
        for r, proc in enumerate(procs):
            finish(proc, tmp_path / f"rank{r}.log")

    a, b = tmp_path / "disk_a", tmp_path / "disk_b"
    launch([a, b], "--max-steps", "10")
    assert (a / "checkpoint.pth.tar").exists() and not b.exists()
    b.mkdir()
    launch([b, a], "--resume", "auto")  # now rank 1 runs where the checkpoint is
    log = (b / "train.log").read_text()
    assert f"resumed from {a / 'checkpoint.pth.tar'}, read by rank 1: step 10," in log, log[:2000]
    ref_loss, ref_val = curve(reference)
    loss, val = curve(b)
    assert loss == {s: v for s, v in ref_loss.items() if s > 10} and val == {14: ref_val[14]}
    assert_same_weights(final_weights(b), final_weights(reference))


@pytest.mark.parametrize("old,new,stop", [(2, 1, 3), (1, 2, 5)], ids=["2to1", "1to2"])
def test_a_run_stopped_at_one_world_size_goes_on_at_another(shards, tmp_path, old, new, stop):
    """torchrun's --nnodes MIN:MAX restarts a job with fewer or more processes: the resumed run
    finishes the epoch with the samples the old world left (the loader's conformance suite checks
    which samples), keeps the batch per process and the LR schedule by epoch, and says so."""
    from types import SimpleNamespace

    from train.run import lr_at

    out = tmp_path / "run"
    args = ["--shards", shards, *ARGS, "--epochs", "1", "--output", out]  # (the later --epochs wins)
    first = start([*torchrun(free_port(), nproc=old), *args, "--max-steps", str(stop)], tmp_path / "first.log")
    finish(first, tmp_path / "first.log")
    second = start([*torchrun(free_port(), nproc=new), *args], tmp_path / "second.log")
    finish(second, tmp_path / "second.log")

    spe_old, spe_new = 60 // old // 4, 60 // new // 4
    offset = stop * old * 4  # the samples of epoch 0 the old world consumed
    left = (60 - offset) // new // 4
    log = (out / "train.log").read_text()
    assert (f"=> world changed from {old} to {new} processes: global batch {old * 4} -> {new * 4} (4 per process, "
            f"kept), {spe_new} steps/epoch; the LR schedule stays by epoch; epoch 0 goes on after its first "
            f"{offset} samples, {left} steps left in it") in log, log[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size_effective"] == new
    loss, val = curve(out)
    assert sorted(loss) == list(range(1, stop + left + 1)) and sorted(val) == [stop, stop + left]  # --max-steps: val
    # The LR at each step is the schedule's at the fraction of the epoch's samples used before it.
    cfg = SimpleNamespace(lr=0.02, warm_up_epochs=0, epochs=1, schedule="cosine")  # ARGS: the default schedule
    want = [lr_at(cfg, s / spe_old) for s in range(stop)]
    want += [lr_at(cfg, (offset / (new * 4) + s) / spe_new) for s in range(left)]
    assert [r["lr"] for r in rows(out) if "loss" in r] == pytest.approx(want, rel=1e-12)


# -- the pieces, in process -----------------------------------------------------------------

def _state(step: int) -> dict:
    return {"step": step, "epoch": 0, "loader": {"batch": step}, "state_dict": {"w": torch.full((3,), float(step))}}


def test_checkpoints_rotate_and_a_damaged_newest_falls_back_to_the_previous(tmp_path):
    from train import checkpoint

    assert checkpoint.newest(tmp_path) is None and checkpoint.newest(tmp_path / "absent") is None
    for step in (3, 6, 9):
        checkpoint.save(_state(step), tmp_path)
    paths = checkpoint.candidates(tmp_path)
    assert [Path(p).name for p in paths] == ["checkpoint.pth.tar", "checkpoint.prev.pth.tar"]
    assert [checkpoint.peek(p)["step"] for p in paths] == [9, 6]
    assert checkpoint.newest(tmp_path) == (paths[0], {"step": 9, "epoch": 0, "batch": 9})
    assert not list(tmp_path.glob(".*partial"))
    raw = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(raw[: len(raw) // 2])  # a torn file
    with pytest.warns(RuntimeWarning, match="checkpoint.pth.tar is damaged"):
        assert checkpoint.newest(tmp_path) == (paths[1], {"step": 6, "epoch": 0, "batch": 6})
    Path(paths[1]).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert checkpoint.newest(tmp_path) is None
    assert torch.equal(checkpoint.load(checkpoint.save(_state(12), tmp_path))["state_dict"]["w"], torch.full((3,), 12.))


def test_checkpoints_in_a_bucket_rotate_resume_and_carry_the_run_record(s3_env, tmp_path, monkeypatch):
    """--output s3://...: the same rotation and fallback as a folder, through PUTs and server-side
    copies; the log and metrics follow each checkpoint; a resume on a machine without the local
    mirror downloads what it needs."""
    from conftest import new_bucket
    from pipeline import objstore
    from train import checkpoint

    monkeypatch.setenv("RESNET_RUN_CACHE", str(tmp_path / "disk0"))
    output = f"{new_bucket()}/run"
    assert checkpoint.newest(output) is None
    mirror = checkpoint.local_folder(output)
    mirror.mkdir(parents=True)
    for step in (3, 6, 9):
        (mirror / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                      for s in range(1, step + 1)))
        assert checkpoint.save(_state(step), output) == f"{output}/checkpoint.pth.tar"
    assert checkpoint.candidates(output) == [f"{output}/checkpoint.pth.tar", f"{output}/checkpoint.prev.pth.tar"]
    assert not list(mirror.glob("*.pth.tar*")) and not list(mirror.glob(".*.partial"))  # the bucket holds them
    assert checkpoint.save_best(output) == f"{output}/model_best.pth.tar"
    assert torch.load(io.BytesIO(objstore.get(f"{output}/model_best.pth.tar")), weights_only=True)["step"] == 9
    assert objstore.get(f"{output}/metrics.jsonl") == (mirror / "metrics.jsonl").read_bytes()

    monkeypatch.setenv("RESNET_RUN_CACHE", str(tmp_path / "disk1"))  # another machine
    assert checkpoint.newest(output) == (f"{output}/checkpoint.pth.tar", {"step": 9, "epoch": 0, "batch": 9})
    assert torch.equal(checkpoint.load(f"{output}/checkpoint.pth.tar")["state_dict"]["w"], torch.full((3,), 9.0))
    checkpoint.fetch_record(output)
    assert len(next((tmp_path / "disk1").rglob("metrics.jsonl")).read_text().splitlines()) == 9
    raw = objstore.get(f"{output}/checkpoint.pth.tar")
    objstore.put(f"{output}/checkpoint.pth.tar", raw[: len(raw) // 2])  # a torn upload
    with pytest.warns(RuntimeWarning, match="checkpoint.pth.tar is damaged"):
        assert checkpoint.newest(output) == (f"{output}/checkpoint.prev.pth.tar", {"step": 6, "epoch": 0, "batch": 6})
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint.load(f"{output}/nothing.pth.tar")


def test_the_rank_with_the_newest_checkpoint_is_the_reader():
    from train.resume import newest_rank

    peek = lambda step: ("x", {"step": step})  # noqa: E731
    assert newest_rank([None, None]) is None
    assert newest_rank([None, peek(9)]) == 1
    assert newest_rank([peek(6), peek(9), peek(9)]) == 1  # the newest, the lowest rank on a tie
    assert newest_rank([peek(9), peek(9)]) == 0


def test_a_resume_drops_the_metrics_rows_of_redone_steps(tmp_path):
    from train.metrics import drop_rows_after

    path = tmp_path / "metrics.jsonl"
    assert drop_rows_after(path, 3) == []
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3)] + [json.dumps({"step": 3, "val_acc1": 5.0})]
    lines += [json.dumps({"step": s, "loss": s / 10}) for s in (4, 5)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the writer died mid-line
    dropped = drop_rows_after(path, 3)
    assert [r["step"] for r in dropped] == [4, 5]
    assert path.read_text() == "".join(x + "\n" for x in lines[:4])


def test_resume_auto_is_the_default_under_torchrun_only(monkeypatch):
    from train.config import parse_args

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert parse_args(["--shards", "x", "--device", "cpu"])[0].resume == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert parse_args(["--shards", "x", "--device", "cpu"])[0].resume == "auto"
    assert parse_args(["--shards", "x", "--device", "cpu", "--resume", ""])[0].resume == ""
    assert parse_args(["--shards", "x", "--device", "cpu", "--resume", "c.pth.tar"])[0].resume == "c.pth.tar"


def test_restarts_over_a_shared_torchrun_store_are_warned_about(monkeypatch):
    from train.run import torchrun_restart_hazard

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert torchrun_restart_hazard() is None  # no restart, no hazard
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in torchrun_restart_hazard()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun set
    assert torchrun_restart_hazard() is None
