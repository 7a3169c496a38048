"""run_cli(warm=True) stands in for `python -m MODULE` (conftest.Forker): the same exit status,
output, argv and environment as a cold start, a timeout like subprocess.run's, and a settings
change that only a new interpreter can honour gets one. Warm torchrun forks its ranks, which see
what cold ranks see."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import conftest
from conftest import ROOT, cli_env, proc_state, run_cli
from s3_server import free_port

PROBE = "tests.cli_probe"


@pytest.mark.parametrize("mode,arg", [("exit-none", ""), ("exit-int", "3"), ("exit-int", "300"),
                                      ("exit-str", "bad thing"), ("raise", "boom"), ("atexit", "")])
def test_a_warm_child_ends_as_python_m_does(mode, arg):
    cold, warm = (run_cli(PROBE, mode, arg, warm=w, timeout=120) for w in (False, True))
    assert warm.args == cold.args
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    if mode == "raise":  # the frames above the module's are runpy's, cold or warm
        assert cold.stderr.startswith("Traceback") and warm.stderr.startswith("Traceback")
        assert warm.stderr.splitlines()[-3:] == cold.stderr.splitlines()[-3:]
    else:
        assert warm.stderr == cold.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--arch", "nope", "--synthetic"], ["--help"]])
def test_train_run_exits_the_same_warm_and_cold(args):
    cold, warm = (run_cli("train.run", *args, warm=w, timeout=120) for w in (False, True))
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert warm.returncode == (0 if args == ["--help"] else 2)


def test_a_warm_child_sees_what_a_cold_process_sees(tmp_path):
    env = cli_env(WARM_PROBE="x")
    cold, warm, again = (json.loads(run_cli(PROBE, "report", warm=w, env=env, timeout=120).stdout)
                         for w in (False, True, True))
    for key in ("argv", "env", "name", "path0", "cwd", "threads"):
        assert warm[key] == cold[key], key
    assert warm["argv"][0] == str(ROOT / "tests" / "cli_probe.py") and warm["name"] == "__main__"
    # Fresh random generators in each child, as in each new interpreter.
    assert again["torch_seed"] != warm["torch_seed"] and again["numpy"] != warm["numpy"]


def test_an_import_time_setting_gets_a_forker_of_its_own():
    threads = "2" if cli_env().get("OMP_NUM_THREADS") == "1" else "1"
    env = cli_env(OMP_NUM_THREADS=threads)
    assert conftest.warm_forker(env) is not conftest.warm_forker(cli_env())
    # (with this process's setting: test_a_warm_child_sees_what_a_cold_process_sees)
    cold, warm = (json.loads(run_cli(PROBE, "report", warm=w, env=env, timeout=120).stdout) for w in (False, True))
    assert warm["threads"] == cold["threads"] == int(threads) and warm["env"] == cold["env"]


def test_a_warm_child_past_its_timeout_is_killed_and_raises():
    forker = conftest.warm_forker(cli_env())
    before = conftest.descendants(forker.proc.pid)
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run_cli(PROBE, "sleep", "60", warm=True, timeout=1)
    assert e.value.stdout == "sleeping\n" and e.value.cmd[-3:] == [PROBE, "sleep", "60"]
    assert conftest.descendants(forker.proc.pid) == before


def test_closing_a_forker_kills_its_children(tmp_path):
    forker = conftest.Forker(["json"])
    child = forker.start_module(PROBE, ["sleep", "60"], tmp_path / "out", None, cli_env())
    assert proc_state(child.pid) is not None
    forker.close()
    assert proc_state(child.pid) is None


def torchrun_probe(warm: bool, log_dir: Path, *probe: str):
    """torchrun with two ranks of the probe, each rank's output in its own file under `log_dir`."""
    return run_cli("torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(), "--log-dir",
                   log_dir, "--redirects", "3", "-m", PROBE, *probe, warm=warm, env=cli_env(OMP_NUM_THREADS="1"),
                   timeout=120)


def rank_outputs(log_dir: Path, name: str) -> dict[int, str]:
    """rank -> what it wrote to `name` (stdout.log, stderr.log) in torchrun's --log-dir."""
    return {int(p.parent.name): p.read_text() for p in log_dir.rglob(name)}


def test_warm_torchrun_forks_its_ranks_and_they_see_what_cold_ranks_see(tmp_path):
    runs = {w: torchrun_probe(w, tmp_path / str(w), "report") for w in (False, True)}
    assert all(r.returncode == 0 for r in runs.values()), {w: r.stderr[-2000:] for w, r in runs.items()}
    seen = {w: {rank: json.loads(out) for rank, out in rank_outputs(tmp_path / str(w), "stdout.log").items()}
            for w in (False, True)}
    assert sorted(seen[False]) == sorted(seen[True]) == [0, 1]
    for rank in (0, 1):
        cold, warm = seen[False][rank], seen[True][rank]
        for key in ("argv", "name", "path0", "cwd", "threads", "stdout_unbuffered", "signals", "log_handlers"):
            assert warm[key] == cold[key], key
        ignore = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}  # a port and files of their own
        assert {k: v for k, v in warm["env"].items() if k not in ignore} == \
               {k: v for k, v in cold["env"].items() if k not in ignore}
        assert warm["env"]["RANK"] == str(rank) and warm["stdout_unbuffered"]
        assert cold["cmdline"][1:] == ["-u", "-m", PROBE] and warm["cmdline"][1] == "-c"  # forked, not started
    assert seen[True][0]["ppid"] == seen[True][1]["ppid"]  # both the agent's children
    assert seen[True][0]["torch"] != seen[True][1]["torch"]  # each its own random state
    assert rank_outputs(tmp_path / "True", "stderr.log") == rank_outputs(tmp_path / "False", "stderr.log")


def test_a_failing_warm_rank_fails_torchrun_as_a_cold_one_does(tmp_path):
    # What a cold torchrun gives (the exit status, the failure report, each rank's output),
    # written out rather than run: a cold start costs three interpreters here.
    r = torchrun_probe(True, tmp_path, "exit-int", "3")
    assert r.returncode == 1 and "exitcode  : 3" in r.stderr and "ChildFailedError" in r.stderr, r.stderr[-2000:]
    assert rank_outputs(tmp_path, "stdout.log") == {0: "out before exit\n", 1: "out before exit\n"}
