"""A command for tests/test_run_cli.py to start cold and warm: `python -m tests.cli_probe MODE [ARG]`.
MODE `report` prints what the process sees (argv, environment, paths, random generators); the
others end it in each way a Python program can."""
import json
import os
import sys
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "report"
ARG = sys.argv[2] if len(sys.argv) > 2 else ""

if MODE == "report":
    import logging
    import signal

    import numpy as np
    import torch

    print(json.dumps({"argv": sys.argv, "env": dict(os.environ), "name": __name__, "path0": sys.path[0],
                      "cwd": os.getcwd(), "torch_seed": torch.initial_seed(), "torch": torch.rand(3).tolist(),
                      "numpy": np.random.random(3).tolist(), "threads": torch.get_num_threads(), "ppid": os.getppid(),
                      "cmdline": open("/proc/self/cmdline").read().split("\0")[:4],
                      "stdout_unbuffered": sys.stdout.write_through,
                      "signals": {s.name: str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT,
                                                                            signal.SIGHUP, signal.SIGPIPE)},
                      "log_handlers": {name: len(lg.handlers) for name, lg in
                                       [("", logging.root), *logging.Logger.manager.loggerDict.items()]
                                       if getattr(lg, "handlers", None)}}))
    print("to stderr", file=sys.stderr)
elif MODE == "exit-none":
    raise SystemExit(None)
elif MODE == "exit-int":
    print("out before exit")
    raise SystemExit(int(ARG))
elif MODE == "exit-str":
    raise SystemExit(ARG)
elif MODE == "raise":
    raise ValueError(ARG)
elif MODE == "sleep":
    print("sleeping", flush=True)
    time.sleep(float(ARG))
elif MODE == "atexit":
    import atexit

    atexit.register(print, "atexit ran")
else:
    raise SystemExit(f"unknown mode {MODE}")
