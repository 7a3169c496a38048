"""Training-step throughput on synthetic data, side by side: precision (O0/O1/O2 with
bf16/fp16), channels_last on/off, torch.compile on/off, fused/foreach SGD, per arch and batch.

    python -m benchmarks.train_step                                  # CPU: small models
    python -m benchmarks.train_step --device cuda --arch resnet152 --batch-size 256 --image-size 224

It runs train.step.train_step, the step train.run trains with, on one resident batch (the
synthetic backend's idea: model speed alone). Each configuration warms up, then reports the
median of repeated timed windows; the only syncs are at window edges. On a GPU it also reports
MFU against the card's dense bf16 peak (--peak-tflops).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from .common import table, write_json

# Forward GFLOPs (2 x multiply-adds) at 224 px; a training step is about 3x forward.
FWD_GFLOPS_224 = {"resnet18": 3.64, "resnet34": 7.34, "resnet50": 8.18, "resnet101": 15.6, "resnet152": 23.1}


def measure(arch: str, batch: int, image: int, device_name: str, opt_level: str, amp: str, channels_last: bool,
            compile_: bool, optimizer: str, warmup: int, steps: int, repeats: int) -> float:
    from train.devices import resolve_device
    from train.precision import Precision
    from train.step import build, train_step

    device = resolve_device(device_name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[amp]
    precision = Precision(opt_level, dtype, "dynamic", device.kind)
    model, opt, _ = build(arch, 1000, device, precision, 0.01, 0.9, 1e-4, optimizer=optimizer,
                          channels_last=channels_last)
    step_model = torch.compile(model) if compile_ else model
    crit = torch.nn.CrossEntropyLoss()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image, image, device=device.torch_device)
    x = x.to(precision.input_dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device.torch_device)
    for _ in range(warmup):
        train_step(step_model, x, y, crit, precision, opt)
    device.synchronize()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            _, loss, _ = train_step(step_model, x, y, crit, precision, opt)
        loss.item()  # the window's one sync
        rates.append(batch * steps / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", nargs="+", default=None)
    p.add_argument("--batch-size", type=int, nargs="+", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--levels", nargs="+", default=["O0:fp32", "O1:bf16", "O2:bf16", "O1:fp16", "O2:fp16"],
                   help="LEVEL:DTYPE pairs")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--optimizers", nargs="+", default=["fused", "foreach"])
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H100 SXM: ~790)")
    p.add_argument("--full-grid", action="store_true", help="every combination (default: vary one axis at a time)")
    a = p.parse_args(argv)
    gpu = a.device != "cpu"
    archs = a.arch or (["resnet152"] if gpu else ["resnet18"])
    batches = a.batch_size or ([256] if gpu else [32])
    image = a.image_size or (224 if gpu else 64)
    steps = a.steps or (20 if gpu else 4)
    warmup = 8 if gpu else 2
    cl = {"on": [True], "off": [False], "both": [True, False]}[a.channels_last]
    comp = {"on": [True], "off": [False], "both": [False, True]}[a.compile]
    base = ("O2:bf16" if "O2:bf16" in a.levels else a.levels[0], True, False, a.optimizers[0])
    if a.full_grid:
        # Uncompiled first: if a time limit cuts the run, the quick rows are already written.
        configs = sorted(itertools.product(a.levels, cl, comp, a.optimizers), key=lambda c: c[2])
    else:
        # The baseline, then each axis varied alone: readable, and affordable on a CPU.
        configs = [base] + [(lv, *base[1:]) for lv in a.levels if lv != base[0]]
        configs += [(base[0], c, base[2], base[3]) for c in cl if c != base[1]]
        configs += [(base[0], base[1], c, base[3]) for c in comp if c != base[2]]
        configs += [(*base[:3], o) for o in a.optimizers if o != base[3]]
    rows = []

    def save(rows: list[dict]):
        return write_json(f"train_step_{a.device.split(':')[0]}", {
            "rows": rows, "device": a.device, "command": "python -m benchmarks.train_step " + " ".join(argv or [])})

    for arch, batch in itertools.product(archs, batches):
        for level, channels_last, compile_, optimizer in configs:
            opt_level, amp = level.split(":")
            try:
                rate = measure(arch, batch, image, a.device, opt_level, amp, channels_last, compile_, optimizer,
                               warmup, steps, a.repeats)
                err = None
            except (RuntimeError, NotImplementedError) as e:  # e.g. fp16 kernels missing on a CPU
                rate, err = None, str(e).splitlines()[0][:60]
            row = {"arch": arch, "batch": batch, "image": image, "precision": level,
                   "channels_last": channels_last, "compile": compile_, "optimizer": optimizer, "img_s": rate,
                   "error": err}
            if rate and gpu and arch in FWD_GFLOPS_224:
                flops = 3 * FWD_GFLOPS_224[arch] * 1e9 * (image / 224) ** 2
                row["mfu"] = rate * flops / (a.peak_tflops * 1e12)
            rows.append(row)
            print(f"{arch} b{batch} {level} cl={channels_last} compile={compile_} {optimizer}: "
                  f"{'%.1f img/s' % rate if rate else err}", flush=True)
            save(rows)  # after every row: a run cut short by a time limit keeps what it measured
    ref = rows[0]["img_s"] or 1.0
    for r in rows:
        r["vs_base"] = r["img_s"] / ref if r["img_s"] else None
    path = save(rows)
    print(table(rows, [("arch", "arch", "s"), ("batch", "batch", "d"), ("precision", "precision", "s"),
                       ("channels_last", "channels_last", ""), ("compile", "compile", ""), ("optimizer", "SGD", "s"),
                       ("img_s", "img/s", ".1f"), ("vs_base", "x first row", ".2f"), ("mfu", "MFU", ".1%"),
                       ("error", "note", "s")]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
