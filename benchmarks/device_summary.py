"""The short table at the end of device_check.sh: `python -m benchmarks.device_summary OUT`."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PEAK_NOTE = "MFU against 790 TFLOP/s dense bf16, 69 GFLOP per ResNet-152 training image"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    rows = []
    loader = out / "loader_cuda.json"
    if loader.exists():
        for r in json.loads(loader.read_text())["rows"]:
            rows.append(("loader alone", r["name"], r.get("img_s"), ""))
    step = out / "train_step_cuda.json"
    if step.exists():
        for r in json.loads(step.read_text())["rows"]:
            name = f"{r['arch']} b{r['batch']} {r['precision']} compile={r['compile']}"
            rows.append(("train step (synthetic)", name, r.get("img_s"),
                         f"MFU {r['mfu']:.1%}" if r.get("mfu") else (r.get("error") or "")))
    fps = {}
    for log in sorted(out.glob("e2e_*.log")):
        found = re.findall(r"FPS@all ([0-9.]+)", log.read_text(errors="replace"))
        fps[log.stem[4:]] = float(found[-1]) if found else None
    base = fps.get("synthetic")
    for backend, v in fps.items():
        note = f"{v / base:.1%} of synthetic" if v and base and backend != "synthetic" else ""
        rows.append(("end to end, ResNet-152 O2 bf16", backend, v, note))
    w = max(len(r[1]) for r in rows) if rows else 10
    print(f"{'what':32} {'config':{w}} {'img/s':>10}  note")
    for what, name, v, note in rows:
        print(f"{what:32} {name:{w}} {('%.1f' % v) if v else 'failed':>10}  {note}")
    print(PEAK_NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
