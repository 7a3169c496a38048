"""Draw a run's loss, accuracy and throughput curves: `python -m train.plot RUN_DIR [--out PNG]`.

Reads RUN_DIR/metrics.jsonl; needs matplotlib (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # A resumed run appends: keep the last record of each step.
    train = {r["step"]: r for r in rows if "loss" in r}
    val = {r["step"]: r for r in rows if "val_acc1" in r}
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def plot(run: Path, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("train.plot needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run)
    if not train:
        raise RuntimeError(f"{run}/metrics.jsonl has no training records")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set(title="train loss", xlabel="step", yscale="log")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_acc1"] for r in val], marker="o")
    axes[1].set(title="val Acc@1 (%)", xlabel="step")
    axes[2].plot(steps, [r["img_s"] for r in train], lw=1, label="img/s (all ranks)")
    ax2 = axes[2].twinx()
    ax2.plot(steps, [100 * r["data_wait"] for r in train], lw=1, color="tab:red", label="waiting on data (%)")
    axes[2].set(title="throughput", xlabel="step", ylabel="img/s")
    ax2.set_ylabel("% of step time waiting on data")
    fig.suptitle(str(run.name))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="run folder (--output of train.run)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/curves.png)")
    a = p.parse_args(argv)
    if not (a.run / "metrics.jsonl").is_file():
        print(f"error: {a.run}: no metrics.jsonl (not a train.run --output folder)", file=sys.stderr)
        return 2
    try:
        out = plot(a.run, a.out or a.run / "curves.png")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
