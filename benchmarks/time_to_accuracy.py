"""Time to accuracy: the seed's recipe against `--recipe fast`, side by side on the same shards and seeds.

    python -m benchmarks.time_to_accuracy [--epochs 16 --fast-epochs 16 --seeds 1,2,3 --plot PNG]

Both recipes train `python -m train.run` from scratch on the real-photo set as a classification
task (`benchmarks.photos` with labels="photo": class k is cut from photo k), evaluating after
every epoch. The runs alternate recipe by recipe, seed by seed, so a shared machine's load falls on
both alike. Reported:

- each recipe's final top-1 (mean of the seeds) and training wall time (the epochs' own time,
  `train_s` in metrics.jsonl: the per-epoch evaluation that draws the curve is left out of both);
- the fast recipe's time to the seed's final top-1 (mean, less `--tolerance` points): the first
  epoch at which the fast runs' mean top-1 reaches it, and that time over the seed's whole run
  (the goal: <= 0.6);
- FLOPs-weighted epochs, which do not depend on the machine: each epoch counts the model's forward
  FLOPs at that epoch's size (BlurPool included) over the seed model's at the seed's size.

The plot draws top-1 against training time and against FLOPs-weighted epochs (matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import DEFAULT_CACHE, print_machine, table, write_json

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("imagenet", "fast")  # the seed's recipe, then the fast one
GOAL_RATIO = 0.6


def photo_task(classes: int, per_class: int, val_per_class: int, cache: Path = DEFAULT_CACHE) -> Path:
    """Shards of the real-photo set labelled by photo (cached): the generated JPEGs, converted."""
    from convert.imagenet_to_shards import convert
    from pipeline.shard_format import is_complete

    from .photos import PhotoConfig, generate

    cfg = PhotoConfig(classes=classes, per_class=per_class, val_per_class=val_per_class, labels="photo")
    base = cache / f"photo_task_{classes}x{per_class}+{val_per_class}_s{cfg.seed}"
    src = generate(base / "images", cfg)
    shards = base / "shards"
    if not is_complete(shards):
        convert(src, shards, shard_size_mb=16, progress=False)
    return shards


def model_flops(arch: str, size: int, stem: str, blurpool: bool, classes: int) -> float:
    """Forward FLOPs of one image at `size` (torch's FLOP counter), as train.step builds the model."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from train.step import cifar_stem

    model = torchvision.models.__dict__[arch](num_classes=classes)
    if stem == "cifar":
        model = cifar_stem(model)
    if blurpool:
        from train.blurpool import apply_blurpool

        apply_blurpool(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def resolved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def curve(run: Path) -> list[dict]:
    """The run's per-epoch evaluations: epoch, train_s, val_acc1, image_size."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("epoch", "train_s", "val_acc1", "image_size")} for r in rows if "val_acc1" in r]


def flops_epochs(runs: list[Path], reference: float, arch: str, classes: int) -> list[float]:
    """Cumulative FLOPs-weighted epochs at the end of each epoch of a recipe's run."""
    cfg = resolved(runs[0])
    cache: dict[int, float] = {}
    out, total = [], 0.0
    for row in curve(runs[0]):
        size = row["image_size"]
        if size not in cache:
            cache[size] = model_flops(arch, size, cfg["stem"], cfg["blurpool"], classes)
        total += cache[size] / reference
        out.append(total)
    return out


def train(shards: Path, recipe: str, seed: int, epochs: int, out: Path, a) -> tuple[Path, float]:
    run = out / f"{recipe}_seed{seed}"
    args = [sys.executable, "-m", "train.run", "--shards", str(shards), "--recipe", recipe, "--arch", a.arch,
            "--image-size", str(a.image_size), "--epochs", str(epochs), "--seed", str(seed), "-b", str(a.batch_size),
            "--lr", str(a.lr), "-j", str(a.workers), "--device", "cpu", "-p", "1000", "--eval-every", "1",
            "--output", str(run), "--resume", "", *a.extra]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{recipe} seed {seed} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return run, wall


def mean_curve(curves: list[list[dict]], key: str) -> list[float]:
    return [statistics.mean(c[i][key] for c in curves) for i in range(min(len(c) for c in curves))]


def summarize(runs: dict[str, list[Path]], walls: dict[str, list[float]], a) -> dict:
    curves = {r: [curve(p) for p in runs[r]] for r in RECIPES}
    seed_cfg = resolved(runs["imagenet"][0])
    reference = model_flops(a.arch, a.image_size, seed_cfg["stem"], False, a.classes)
    out: dict = {"recipes": {}}
    for r in RECIPES:
        cs = curves[r]
        acc, secs = mean_curve(cs, "val_acc1"), mean_curve(cs, "train_s")
        fe = flops_epochs(runs[r], reference, a.arch, a.classes)
        cfg = resolved(runs[r][0])
        out["recipes"][r] = {
            "final_top1_mean": acc[-1], "final_top1": [c[-1]["val_acc1"] for c in cs],
            "train_s_mean": secs[-1], "train_s": [c[-1]["train_s"] for c in cs], "process_wall_s": walls[r],
            "flops_epochs": fe[-1], "epochs": len(acc), "sizes": [row["image_size"] for row in cs[0]],
            "val_size": cfg["val_size"], "curve": {"epoch": list(range(1, len(acc) + 1)), "top1_mean": acc,
                                                   "train_s_mean": secs, "flops_epochs": fe},
            "config": {k: cfg[k] for k in ("label_smoothing", "no_bn_wd", "blurpool", "tta_flip", "schedule",
                                           "warm_up_epochs", "start_image_size", "ramp_start_epoch",
                                           "ramp_end_epoch", "size_step", "lr", "weight_decay", "stem")},
        }
    seed, fast = out["recipes"]["imagenet"], out["recipes"]["fast"]
    target = seed["final_top1_mean"] - a.tolerance
    hit = next((i for i, v in enumerate(fast["curve"]["top1_mean"]) if v >= target), None)
    out["target_top1"] = target
    if hit is None:
        out["fast_reaches_target"] = False
        out["time_ratio"] = out["flops_ratio"] = None
    else:
        out["fast_reaches_target"] = True
        out["fast_epochs_to_target"] = hit + 1
        out["fast_train_s_to_target"] = fast["curve"]["train_s_mean"][hit]
        out["time_ratio"] = fast["curve"]["train_s_mean"][hit] / seed["train_s_mean"]
        out["flops_ratio"] = fast["curve"]["flops_epochs"][hit] / seed["flops_epochs"]
        # Each seed's own pair, run back to back: the ratio a shared machine's changing load moves least.
        out["time_ratio_per_seed"] = [fc[hit]["train_s"] / sc[-1]["train_s"]
                                      for fc, sc in zip(curves["fast"], curves["imagenet"])]
    # Whole runs, fast over seed, each seed's pair: what a run costs whether or not it reaches the target.
    out["full_run_time_ratio_per_seed"] = [fc[-1]["train_s"] / sc[-1]["train_s"]
                                           for fc, sc in zip(curves["fast"], curves["imagenet"])]
    out["full_run_flops_ratio"] = fast["flops_epochs"] / seed["flops_epochs"]
    out["goal_met"] = out["time_ratio"] is not None and out["time_ratio"] <= GOAL_RATIO
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = {"imagenet": "seed recipe (cosine, one size)", "fast": "--recipe fast"}
    for r, rec in result["recipes"].items():
        c = rec["curve"]
        axes[0].plot(c["train_s_mean"], c["top1_mean"], marker="o", ms=3, label=names[r])
        axes[1].plot(c["flops_epochs"], c["top1_mean"], marker="o", ms=3, label=names[r])
    for ax in axes:
        ax.axhline(result["target_top1"], color="grey", lw=0.8, ls="--")
        ax.set_ylabel("val top-1 (%), mean of seeds")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_xlabel("training wall time (s)")
    axes[1].set_xlabel("FLOPs-weighted epochs")
    seeds = len(result["recipes"]["imagenet"]["final_top1"])
    fig.suptitle(f"Time to accuracy: {result['arch']} at {result['image_size']} px on the photo task "
                 f"({result['classes']} classes), {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=10, help="photo task classes (at most 16)")
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64, help="the seed's train size and fast's final one")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=16, help="the seed recipe's epochs")
    p.add_argument("--fast-epochs", type=int, default=0, help="the fast recipe's epochs (default: --epochs)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1.0, help="points below the seed's final top-1 that count")
    p.add_argument("--out", type=Path, default=None, help="run folders (default: BENCH_OUT or benchmarks/out)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of top-1 against time and FLOPs")
    p.add_argument("--name", default="time_to_accuracy", help="JSON name under BENCH_OUT")
    p.add_argument("--reuse", action="store_true", help="summarize and plot the run folders in --out again, "
                   "without training")
    p.add_argument("extra", nargs="*", help="more train.run flags for both recipes, after --")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: expected comma-separated integers")
    if not seeds:
        p.error("--seeds: give at least one seed")
    for name in ("epochs", "batch_size", "per_class", "val_per_class", "image_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= a.classes <= 16:
        p.error("--classes must be 1 to 16 (one photo per class)")
    machine = print_machine("cpu")
    shards = None if a.reuse else photo_task(a.classes, a.per_class, a.val_per_class)
    out = a.out or Path(os.environ.get("BENCH_OUT", ROOT / "benchmarks" / "out")) / "time_to_accuracy_runs"
    runs: dict[str, list[Path]] = {r: [] for r in RECIPES}
    walls: dict[str, list[float]] = {r: [] for r in RECIPES}
    for seed in seeds:
        for recipe in RECIPES:  # in turns: a shared machine's load falls on both alike
            epochs = (a.fast_epochs or a.epochs) if recipe == "fast" else a.epochs
            if a.reuse:
                run, wall = out / f"{recipe}_seed{seed}", None
            else:
                run, wall = train(shards, recipe, seed, epochs, out, a)
            runs[recipe].append(run)
            walls[recipe].append(wall)
            last = curve(run)[-1]
            print(f"{recipe:8s} seed {seed}: top-1 {last['val_acc1']:.2f} % after {last['train_s']:.1f} s of "
                  f"training" + (f" ({wall:.0f} s with evaluation and start-up)" if wall else ""), flush=True)
    result = {"arch": a.arch, "image_size": a.image_size, "classes": a.classes, "per_class": a.per_class,
              "val_per_class": a.val_per_class, "batch_size": a.batch_size, "seeds": seeds,
              "extra_flags": a.extra, **summarize(runs, walls, a)}
    rows = [{"recipe": r, "epochs": v["epochs"], "top1": v["final_top1_mean"], "train_s": v["train_s_mean"],
             "flops_epochs": v["flops_epochs"]} for r, v in result["recipes"].items()]
    print(table(rows, [("recipe", "recipe", "s"), ("epochs", "epochs", "d"), ("top1", "top-1 %", ".2f"),
                       ("train_s", "train s", ".1f"), ("flops_epochs", "FLOPs-epochs", ".2f")]))
    if result["fast_reaches_target"]:
        print(f"fast reaches {result['target_top1']:.2f} % (the seed's final, less {a.tolerance:g}) at epoch "
              f"{result['fast_epochs_to_target']}: {result['time_ratio']:.2f}x the seed's time (per seed: "
              f"{', '.join(f'{r:.2f}' for r in result['time_ratio_per_seed'])}), "
              f"{result['flops_ratio']:.2f}x its FLOPs (goal <= {GOAL_RATIO}x time: "
              f"{'met' if result['goal_met'] else 'missed'})")
    else:
        print(f"fast never reaches {result['target_top1']:.2f} % (the seed's final, less {a.tolerance:g}): "
              f"goal missed")
    print(f"whole runs, fast / seed: {result['full_run_flops_ratio']:.2f}x the FLOPs, time per seed pair "
          f"{', '.join(f'{r:.2f}' for r in result['full_run_time_ratio_per_seed'])}")
    if a.plot:
        print(f"plot: {plot(result, a.plot)}")
    print(f"wrote {write_json(a.name, result, machine=machine)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
