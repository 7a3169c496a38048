"""Training-step throughput on synthetic data, side by side: precision (O0/O1/O2 with
bf16/fp16), channels_last on/off, torch.compile on/off, fused/foreach SGD, per arch and batch.

    python -m benchmarks.train_step                                  # CPU: small models
    python -m benchmarks.train_step --device cuda --arch resnet152 --batch-size 256 --image-size 224

It runs train.step.train_step, the step train.run trains with, on one resident batch (the
synthetic backend's idea: model speed alone). Each configuration warms up, then reports the
median of repeated timed windows; the only syncs are at window edges. On a GPU it also reports
MFU against the card's dense (non-sparse) datasheet peak for the row's precision, and names
that peak on every row; a card missing from DENSE_PEAK_TFLOPS gets no MFU (--peak-tflops
supplies one).
"""
from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time

import torch

from .common import print_machine, table, write_json
from .device_summary import mfu_note

# Forward GFLOPs (2 x multiply-adds) at 224 px; a training step is about 3x forward.
FWD_GFLOPS_224 = {"resnet18": 3.64, "resnet34": 7.34, "resnet50": 8.18, "resnet101": 15.6, "resnet152": 23.1}

# Dense (non-sparse) peaks in TFLOP/s from NVIDIA's datasheets, which print the 2:4-sparsity
# figures (twice these, with an asterisk). bf16/fp16/tf32 are tensor-core rates, fp32 the plain
# rate; a format the card lacks is absent. Matched against torch.cuda.get_device_name, first
# match wins; a name that matches nothing gets no MFU rather than a guessed peak.
DENSE_PEAK_TFLOPS = [
    (r"GH200", "GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0}),
    (r"\bH200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0}),
    (r"\bH100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"\bH100 (80GB HBM3|SXM)", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0}),
    (r"\bA100\b", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bA30\b", "A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"\bA40\b", "A40", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"\bV100-SXM2", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bV100-PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
]


def dense_peak(device_name: str, precision: str, allow_tf32: bool | None = None) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, its name) for bf16, fp16 or fp32 on this card, or (None, why not).

    fp32 takes the TF32 peak where the card has one and cuDNN may use it (torch's default:
    torch.backends.cudnn.allow_tf32), since a ResNet's fp32 FLOPs are almost all convolutions."""
    for pattern, card, peaks in DENSE_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            fmt = precision
            tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32
            if precision == "fp32" and tf32 and "tf32" in peaks:
                fmt = "tf32"
            if fmt not in peaks:
                return None, f"no {precision} peak for the {card}"
            return peaks[fmt], f"{card} dense {fmt}"
    return None, f"no peak known for {device_name!r}"


def card_name(device: str) -> str:
    """torch's name for the device, the key of its peak; the flag itself where there is none."""
    from train.devices import DeviceError, resolve_device

    try:
        return resolve_device(device).name()
    except DeviceError:
        return device  # measure() records the error on every row


def measure(arch: str, batch: int, image: int, device_name: str, opt_level: str, amp: str, channels_last: bool,
            compile_: bool, optimizer: str, warmup: int, steps: int, repeats: int,
            cpu_rates: list | None = None, blurpool: bool = False) -> float:
    """Median img/s over `repeats` windows of `steps` steps. cpu_rates, if given, receives the
    median img per second of this process's CPU time (all threads): on a CPU shared with other
    jobs, the figure their load does not move (run with OMP_NUM_THREADS=1, or idle threads'
    spinning counts too)."""
    from train.devices import resolve_device
    from train.precision import Precision
    from train.step import build, train_step

    device = resolve_device(device_name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[amp]
    precision = Precision(opt_level, dtype, "dynamic", device.kind)
    model, opt, _ = build(arch, 1000, device, precision, 0.01, 0.9, 1e-4, optimizer=optimizer,
                          channels_last=channels_last, blurpool=blurpool)
    step_model = torch.compile(model) if compile_ else model
    crit = torch.nn.CrossEntropyLoss()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image, image, device=device.torch_device)
    x = x.to(precision.input_dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device.torch_device)
    for _ in range(warmup):
        train_step(step_model, x, y, crit, precision, opt)
    device.synchronize()
    rates, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _, loss, _ = train_step(step_model, x, y, crit, precision, opt)
        loss.item()  # the window's one sync
        rates.append(batch * steps / (time.perf_counter() - t))
        cpu.append(batch * steps / max(time.process_time() - c, 1e-9))
    if cpu_rates is not None:
        cpu_rates.append(statistics.median(cpu))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv  # the JSON's command, also when run from the shell
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", nargs="+", default=None)
    p.add_argument("--batch-size", type=int, nargs="+", default=None)
    p.add_argument("--image-size", type=int, nargs="+", default=None,
                   help="one or more sizes (the fast recipe's progressive sizes: 160 192 224)")
    p.add_argument("--blurpool", action="store_true", help="the fast recipe's BlurPool model (train.blurpool)")
    p.add_argument("--name", default=None, help="JSON name under BENCH_OUT (default train_step_<device>)")
    p.add_argument("--levels", nargs="+", default=["O0:fp32", "O1:bf16", "O2:bf16", "O1:fp16", "O2:fp16"],
                   help="LEVEL:DTYPE pairs")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--optimizers", nargs="+", default=["fused", "foreach"])
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for every row's MFU (default: the card's dense datasheet peak per precision)")
    p.add_argument("--full-grid", action="store_true", help="every combination (default: vary one axis at a time)")
    a = p.parse_args(argv)
    machine = print_machine(a.device)
    gpu = a.device != "cpu"
    card = card_name(a.device) if gpu else "CPU"
    archs = a.arch or (["resnet152"] if gpu else ["resnet18"])
    batches = a.batch_size or ([256] if gpu else [32])
    images = a.image_size or [224 if gpu else 64]
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
        return write_json(a.name or f"train_step_{a.device.split(':')[0]}", {
            "rows": rows, "device": a.device, "device_name": card, "blurpool": a.blurpool,
            "command": "python -m benchmarks.train_step " + " ".join(argv or [])}, machine=machine)

    for arch, batch, image in itertools.product(archs, batches, images):
        for level, channels_last, compile_, optimizer in configs:
            opt_level, amp = level.split(":")
            cpu_rates = []
            try:
                rate = measure(arch, batch, image, a.device, opt_level, amp, channels_last, compile_, optimizer,
                               warmup, steps, a.repeats, cpu_rates=cpu_rates, blurpool=a.blurpool)
                err = None
            except (RuntimeError, NotImplementedError) as e:  # e.g. fp16 kernels missing on a CPU
                rate, err = None, str(e).splitlines()[0][:60]
            row = {"arch": arch, "batch": batch, "image": image, "precision": level,
                   "channels_last": channels_last, "compile": compile_, "optimizer": optimizer, "img_s": rate,
                   "cpu_img_s": cpu_rates[0] if cpu_rates and not gpu else None, "error": err}
            if rate and gpu:
                peak, row["peak_name"] = (a.peak_tflops, "--peak-tflops") if a.peak_tflops else \
                    dense_peak(card, amp)
                row["peak_tflops"], row["mfu"] = peak, None
                if arch not in FWD_GFLOPS_224:
                    row["peak_tflops"], row["peak_name"] = None, f"no FLOP count for {arch}"
                elif peak:
                    flops = 3 * FWD_GFLOPS_224[arch] * 1e9 * (image / 224) ** 2
                    row["mfu"] = rate * flops / (peak * 1e12)
            rows.append(row)
            print(f"{arch} b{batch} {level} cl={channels_last} compile={compile_} {optimizer} {image}px: "
                  f"{'%.1f img/s' % rate if rate else err}{', ' + mfu_note(row) if 'peak_name' in row else ''}"
                  f"{', %.1f img/CPU-s' % row['cpu_img_s'] if row['cpu_img_s'] else ''}", flush=True)
            save(rows)  # after every row: a run cut short by a time limit keeps what it measured
    ref = rows[0]["img_s"] or 1.0
    for r in rows:
        r["vs_base"] = r["img_s"] / ref if r["img_s"] else None
    path = save(rows)
    shown = [{**r, "peak": f"{r['peak_tflops']:g} TFLOP/s ({r['peak_name']})" if r.get("peak_tflops")
              else r.get("peak_name")} for r in rows]
    print(table(shown, [("arch", "arch", "s"), ("batch", "batch", "d"), ("precision", "precision", "s"),
                        ("channels_last", "channels_last", ""), ("compile", "compile", ""), ("optimizer", "SGD", "s"),
                        ("img_s", "img/s", ".1f"), ("vs_base", "x first row", ".2f"), ("cpu_img_s", "img/CPU-s", ".1f"),
                        ("mfu", "MFU", ".1%"),
                        ("peak", "MFU peak", "s"), ("error", "note", "s")]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
