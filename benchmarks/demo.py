"""The README's promise, measured: `python -m train.run --demo` from a fresh data folder, in wall time.

    python -m benchmarks.demo                          # this machine as it is
    python -m benchmarks.demo --slow 0.2 --cap avx2    # as slow as a 2-core AVX2-only CPU

Each run starts from an empty data folder (so the data generation and the conversion count, as
on a fresh machine) and reports its wall time, top-1, the step rate the demo measured and the
epochs it chose, with the CPU time the rest of the machine used meanwhile: a figure taken while
other jobs ran is marked by it, not hidden. `--cap avx2` gives torch and oneDNN AVX2 kernels only
(no bf16 units); `--slow SHARE` runs the demo under `benchmarks.slowdown` (its process group gets
SHARE of the wall time), which together make this machine about as slow as the AVX2 one.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import print_machine, table, write_json

CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def run_demo(data: Path, env_extra: dict, slow: float | None, output: Path) -> dict:
    """One demo run from an empty `data` folder; what it printed, timed, and the machine's other load."""
    cmd = [sys.executable, "-m", "train.run", "--demo", "--output", str(output)]
    if slow is not None:
        cmd = [sys.executable, "-m", "benchmarks.slowdown", "--share", str(slow), "--", *cmd]
    shutil.rmtree(data, ignore_errors=True)  # a folder of this benchmark's own (see main)
    env = {**os.environ, "RESNET_SHARDS_DEMO_DATA": str(data), **env_extra}
    busy0, ours0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t
    busy1, ours1 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (ours1.ru_utime + ours1.ru_stime) - (ours0.ru_utime + ours0.ru_stime)
    others = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - ours)
    acc = re.findall(r"\* Acc@1 ([0-9.]+)", r.stdout)
    step = re.search(r"the step runs at (\d+) img/s here; (\d+) epochs", r.stdout)
    prec = re.search(r"x1, (O\d) \((\w+)\)", r.stdout)
    return {"returncode": r.returncode, "wall_s": wall, "top1": float(acc[-1]) if acc else None,
            "step_img_s": int(step.group(1)) if step else None, "epochs": int(step.group(2)) if step else None,
            "precision": f"{prec.group(1)} {prec.group(2)}" if prec else None, "cpu_s": ours,
            "others_cores": None if others is None else others / wall,
            "stderr_tail": r.stderr[-2000:] if r.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="runs, each from an empty data folder (default 1)")
    p.add_argument("--slow", type=float, default=None, metavar="SHARE",
                   help="run under benchmarks.slowdown with this share of wall time (0.2: 5x slower)")
    p.add_argument("--cap", choices=sorted(CAPS), default=None, help="limit torch and oneDNN to this ISA")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.slow is not None and not 0 < a.slow <= 1:
        p.error(f"--slow must be in (0, 1], got {a.slow}")
    caps = CAPS.get(a.cap, {})
    machine = print_machine(environ={**os.environ, **caps})  # the caps the demo runs under
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo-bench-") as tmp:
        for i in range(a.repeats):
            row = run_demo(Path(tmp) / "data", caps, a.slow, Path(tmp) / f"run{i}")
            rows.append(row)
            if row["returncode"]:
                print(row["stderr_tail"], file=sys.stderr)
    print(table(rows, [("wall_s", "wall s", ".1f"), ("top1", "top-1 %", ".1f"), ("step_img_s", "step img/s", "d"),
                       ("epochs", "epochs", "d"), ("precision", "precision", "s"), ("cpu_s", "CPU s", ".1f"),
                       ("others_cores", "others' cores", ".2f")]))
    path = write_json("demo", {"rows": rows, "slow": a.slow, "cap": a.cap,
                               "command": "python -m benchmarks.demo " + " ".join(argv)}, machine=machine)
    print(f"wrote {path}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
