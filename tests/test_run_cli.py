"""run_cli(warm=True) stands in for `python -m MODULE` (conftest.Forker): the same exit status,
output, argv and environment as a cold start, a timeout like subprocess.run's, and a settings
change that only a new interpreter can honour gets one."""
from __future__ import annotations

import json
import subprocess

import pytest

import conftest
from conftest import ROOT, cli_env, proc_state, run_cli

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
    for key in ("argv", "env", "name", "path0", "cwd"):
        assert warm[key] == cold[key], key
    assert warm["argv"][0] == str(ROOT / "tests" / "cli_probe.py") and warm["name"] == "__main__"
    # Fresh random generators in each child, as in each new interpreter.
    assert again["torch_seed"] != warm["torch_seed"] and again["numpy"] != warm["numpy"]


def test_an_import_time_setting_gets_a_forker_of_its_own():
    threads = "2" if cli_env().get("OMP_NUM_THREADS") == "1" else "1"
    env = cli_env(OMP_NUM_THREADS=threads)
    assert conftest.warm_forker(env) is not conftest.warm_forker(cli_env())
    for e in (cli_env(), env):
        cold, warm = (json.loads(run_cli(PROBE, "report", warm=w, env=e, timeout=120).stdout) for w in (False, True))
        assert warm["threads"] == cold["threads"] and warm["env"] == cold["env"]
    assert warm["threads"] == int(threads)


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
