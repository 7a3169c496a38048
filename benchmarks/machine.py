"""The machine a figure was measured on: CPU model, cores, ISA level, torch build and the caps set.

    python -m benchmarks.machine [--device cuda] [--json PATH]

Every benchmark prints `header()` first and records `describe()` under "machine" in its JSON
(`common.write_json`). The same CPU runs torch's kernels at different speeds by ISA: ATen picks
AVX2 or AVX-512 kernels (`torch.backends.cpu.get_cpu_capability()`), oneDNN uses AVX-512 bf16 or
AMX for bf16 convolutions where the CPU has them, and ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA cap
both. So a figure names the CPU's own level (from /proc/cpuinfo's flags), what torch uses, and
the caps that were set.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

# The /proc/cpuinfo flags that decide torch's CPU speed, in the order of the levels below.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

# Highest first: (level, the flags it needs).
ISA_LEVELS = (("AMX bf16", ("amx_tile", "amx_bf16")), ("AVX-512 bf16", ("avx512f", "avx512_bf16")),
              ("AVX-512", ("avx512f",)), ("AVX2", ("avx2",)))

# Environment variables that change which kernels run: ATen's dispatch level, oneDNN's ISA
# (DNNL_ is its older name), numba's LLVM target (the name alone keeps the host's features, so
# NUMBA_CPU_NAME=haswell still emits AVX-512 without NUMBA_CPU_FEATURES=+avx2), numpy's dispatch,
# and the thread count.
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
            "NPY_DISABLE_CPU_FEATURES", "OMP_NUM_THREADS")


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo's text; (None, set()) if absent."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def isa_level(flags: set[str]) -> str:
    """The highest of AMX bf16, AVX-512 bf16, AVX-512 and AVX2 that the CPU flags allow."""
    for level, needs in ISA_LEVELS:
        if all(f in flags for f in needs):
            return level
    return "below AVX2"


def torch_build() -> dict:
    """torch's version and what it was built for: CUDA x.y, ROCm x.y, or CPU only."""
    import torch

    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU only"
    return {"version": torch.__version__, "build": build}


def torchvision_version() -> str | None:
    """torchvision.__version__ (with its build tag, e.g. 0.29.1+cu130), read from torchvision's
    version.py without importing torchvision, which pulls in torch._dynamo (seconds); its
    distribution metadata lacks the tag. None where torchvision is not installed."""
    import ast
    import importlib.util
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"].__version__
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
            return str(node.value.value)
    return None


def describe(device: str | None = None, cpuinfo: Path = Path("/proc/cpuinfo"),
             environ: dict | None = None) -> dict:
    """The machine as a JSON-able dict: cpu, cores, cores_usable, isa, torch, torchvision, caps, python,
    platform, commit, and gpu when `device` names a CUDA device.

    isa["cpu"] is the CPU's own level and isa["flags"] the deciding flags it has; isa["torch"] is
    the level ATen dispatches to and isa["onednn_bf16"] whether oneDNN runs bf16 natively, both
    after any caps. A GPU is queried only when asked: it would initialize CUDA in this process.
    """
    import torch

    environ = os.environ if environ is None else environ
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:  # not Linux: the model from platform, no flags
        model, flags = None, set()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        usable = os.cpu_count()
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        onednn_bf16 = None
    info = {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "isa": {"cpu": isa_level(flags) if flags else "unknown (no cpuinfo flags)",
                "flags": [f for f in ISA_FLAGS if f in flags],
                "torch": torch.backends.cpu.get_cpu_capability(),
                "onednn_bf16": onednn_bf16},
        "torch": torch_build(),
        "torchvision": torchvision_version(),
        "caps": {k: environ[k] for k in CAP_VARS if environ.get(k)},
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device is not None and device.split(":")[0] == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    commit = _commit()
    if commit:
        info["commit"] = commit
    return info


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
    except OSError:  # no git
        return None
    return out.stdout.strip() or None


def header(info: dict) -> str:
    """One line naming the machine, printed before a benchmark's figures, e.g.

    machine: AMD EPYC, 2 cores (2 usable), AVX-512 bf16 [avx2 avx512f avx512_bf16], torch kernels
    AVX512, oneDNN bf16 yes, torch 2.14.1 (CUDA 13.0 build), caps ATEN_CPU_CAPABILITY=avx2
    """
    isa = info["isa"]
    onednn = {True: "yes", False: "no", None: "unknown"}[isa["onednn_bf16"]]
    parts = [info["cpu"], f"{info['cores']} cores ({info['cores_usable']} usable)",
             f"{isa['cpu']} [{' '.join(isa['flags']) or 'none of ' + ' '.join(ISA_FLAGS)}]",
             f"torch kernels {isa['torch']}", f"oneDNN bf16 {onednn}",
             f"torch {info['torch']['version']} ({info['torch']['build']} build)"]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    parts.append("caps " + " ".join(f"{k}={v}" for k, v in info["caps"].items()) if info["caps"] else "no caps")
    return "machine: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="also name this CUDA device's GPU (e.g. cuda)")
    p.add_argument("--json", type=Path, default=None, help="also write the description here")
    a = p.parse_args(argv)
    info = describe(a.device)
    print(header(info))
    if a.json:
        from pipeline.shard_format import atomic_write_bytes

        a.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(a.json, json.dumps(info, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
