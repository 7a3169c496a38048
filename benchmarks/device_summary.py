"""The short table at the end of device_check.sh, and one JSON with every figure behind it:

    python -m benchmarks.device_summary WORK [--json PATH]

WORK is the check's folder: machine.txt (and machine.json, `benchmarks.machine`'s description),
tests.log, loader_*.json, train_step_*.json, fast_step.json (the fast recipe's BlurPool models at
its progressive sizes) and the end-to-end logs e2e_<backend>.log. A step that failed or ran out of
time shows as "failed".
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PEAK_NOTE = ("MFU: a train step counted as 3 x forward FLOPs, against the dense (non-sparse) peak from NVIDIA's "
             "datasheets that each row names")


def mfu_note(row: dict) -> str:
    """'MFU 31.0% of 989.4 TFLOP/s (H100 SXM dense bf16)', 'MFU unknown (why)', or '' without MFU."""
    if "peak_name" not in row:  # a CPU row, or one written before rows named their peak
        return f"MFU {row['mfu']:.1%} (peak not recorded)" if row.get("mfu") else ""
    if row.get("mfu") is None:
        return f"MFU unknown ({row['peak_name']})"
    return f"MFU {row['mfu']:.1%} of {row['peak_tflops']:g} TFLOP/s ({row['peak_name']})"


def collect(work: Path) -> dict:
    """Everything the check measured, read back from its outputs."""
    machine = work / "machine.txt"
    tests = work / "tests.log"
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", tests.read_text(errors="replace"), re.M) \
        if tests.exists() else []
    described = work / "machine.json"
    found = {"machine": machine.read_text().strip() if machine.exists() else "",
             "machine_info": json.loads(described.read_text()) if described.exists() else None,
             "tests": summary[-1] if summary else "failed or not run", "rows": []}
    rows = found["rows"]
    for path in sorted(work.glob("loader_*.json")):
        for r in json.loads(path.read_text())["rows"]:
            rows.append({"what": "loader alone", "config": r["name"], "img_s": r.get("img_s"),
                         "note": r.get("note", ""), "loader_gpu_bytes": r.get("loader_gpu_bytes")})
    for pattern, what in (("train_step_*.json", "train step (synthetic)"),
                          ("fast_step.json", "fast recipe step (BlurPool, synthetic)")):
        for path in sorted(work.glob(pattern)):
            for r in json.loads(path.read_text())["rows"]:
                rows.append({"what": what,
                             "config": f"{r['arch']} b{r['batch']} {r['image']}px {r['precision']} "
                                       f"compile={r['compile']}",
                             "img_s": r.get("img_s"), "mfu": r.get("mfu"), "peak_tflops": r.get("peak_tflops"),
                             "peak_name": r.get("peak_name"), "note": mfu_note(r) or r.get("error") or ""})
    for step, what in (("loader", "loader alone"), ("train_step", "train step (synthetic)"),
                       ("fast_step", "fast recipe step (BlurPool, synthetic)")):
        log = work / f"{step}.log"
        if log.exists() and "\nwrote " not in log.read_text(errors="replace"):
            # The benchmark never reached its end: rows above are what it measured before it stopped.
            rows.append({"what": what, "config": "the rest", "img_s": None,
                         "note": f"stopped early (time limit or error): see {step}.log"})
    fps, archs = {}, []
    # synthetic first: it is what the other backends are compared with
    for log in sorted(work.glob("e2e_*.log"), key=lambda f: (f.stem != "e2e_synthetic", f.stem)):
        text = log.read_text(errors="replace")
        values = re.findall(r"FPS@all ([0-9.]+)", text)
        fps[log.stem[4:]] = float(values[-1]) if values else None
        archs += re.findall(r"=> (\w+) on ", text)[:1]
    what = f"end to end, {archs[0] if archs else 'model'} O2 bf16"
    base = fps.get("synthetic")
    for backend, v in fps.items():
        note = f"{v / base:.1%} of synthetic" if v and base and backend != "synthetic" else ""
        rows.append({"what": what, "config": backend, "img_s": v, "vs_synthetic": v / base if v and base else None,
                     "note": note})
    return found


def render(found: dict) -> str:
    rows = found["rows"]
    lines = [found["machine"], f"tests: {found['tests']}"]
    w1 = max([len(r["what"]) for r in rows] + [4])
    w2 = max([len(r["config"]) for r in rows] + [6])
    lines.append(f"{'what':{w1}}  {'config':{w2}}  {'img/s':>9}  note")
    for r in rows:
        v = f"{r['img_s']:.1f}" if r["img_s"] else "failed"
        lines.append(f"{r['what']:{w1}}  {r['config']:{w2}}  {v:>9}  {r['note']}")
    lines.append(PEAK_NOTE)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_summary", description=__doc__.split("\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--check", action="store_true", help="exit 1 when a test or a measurement failed")
    a = p.parse_args(argv)
    found = collect(a.work)
    print(render(found))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(found, indent=1))
    failed = " failed" in found["tests"] or not found["tests"][0].isdigit() or not found["rows"] \
        or any(not r["img_s"] for r in found["rows"])
    return 1 if a.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
