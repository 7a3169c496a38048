"""Run a command as if on a slower CPU: `python -m benchmarks.slowdown --share 0.2 -- CMD ...`.

A promise to users (the demo's minute, the test suite's time) must hold on the slowest machine
they have, which is not always at hand. `ATEN_CPU_CAPABILITY=avx2` with `ONEDNN_MAX_CPU_ISA=AVX2`
give this machine an AVX2 machine's kernels but not its speed: on the 2-core AVX-512 EPYC the
demo's step ran at about 150 img/s so capped, against 30 on a 2-core AVX2-only EPYC. This runs the
command's whole process group in a duty cycle (SIGCONT for `share` of each period, SIGSTOP for the
rest), so every part of it (imports, data generation, conversion, the step, the loader's workers)
gets that share of wall time. It slows the Python and I/O parts as much as the kernels, which a
slower CPU does less: a run that fits its budget so slowed fits it on the real machine too.

Exit status: the command's own (128 + signal if a signal ended it).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def run_throttled(cmd: list[str], share: float, period: float = 0.05) -> int:
    """Run `cmd` in a session of its own, letting its process group run for `share` of each
    `period` seconds; its return code."""
    child = subprocess.Popen(cmd, start_new_session=True)
    group = child.pid
    on, off = share * period, (1.0 - share) * period

    def signal_group(sig):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:  # the group is gone: the command has ended
            pass

    def forward(signum, _frame):  # an interrupt must reach a running command, not a stopped one
        signal_group(signal.SIGCONT)
        signal_group(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while child.poll() is None:
            if off > 0:
                signal_group(signal.SIGSTOP)
                time.sleep(off)
            signal_group(signal.SIGCONT)
            time.sleep(on)
    finally:
        signal_group(signal.SIGCONT)  # never leave a stopped process behind
        for s, handler in previous.items():
            signal.signal(s, handler)
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.slowdown", description=__doc__.split("\n")[0])
    p.add_argument("--share", type=float, required=True,
                   help="fraction of wall time the command may run (0 < share <= 1); 0.2 is 5x slower")
    p.add_argument("--period", type=float, default=0.05, help="seconds per stop/run cycle (default 0.05)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not 0 < a.share <= 1:
        p.error(f"--share must be in (0, 1], got {a.share}")
    if not 0.001 <= a.period <= 10:
        p.error(f"--period must be in [0.001, 10] seconds, got {a.period}")
    if not cmd:
        p.error("no command given (put it after --)")
    return run_throttled(cmd, a.share, a.period)


if __name__ == "__main__":
    sys.exit(main())
