"""`python -m train.run --demo`: the built-in default job.

Generates the learnable synthetic dataset (cached), converts it to shards (cached), and trains a
ResNet-18 at 48 px. The run is sized to the machine: the step is timed once on random data, and
the demo trains as many epochs (5 to 12) as fit about 55 s, so it takes about a minute on a
2-core CPU with or without bf16 units, and seconds on a GPU. Flags given on the command line
override the demo's choices (an explicit --epochs skips the timing).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig

DEMO_DATA = Path(os.environ.get("RESNET_SHARDS_DEMO_DATA", "data/demo"))

# Small enough for a CPU minute, large enough that accuracy far above chance means learning. A
# short run learns faster with milder crops (areas from 25 %), label smoothing, wd 5e-4 and lr 0.03:
# 5 fp32 epochs at 48 px gave 84.0-85.0 % here over three seeds; the earlier settings (all crop
# areas, lr 0.05, wd 5e-5) gave 76.7-85.7 % in 6 epochs.
DEMO = dict(arch="resnet18", image_size=48, batch_size=64, lr=0.03, weight_decay=5e-4, label_smoothing=0.1,
            min_crop_scale=0.25, workers=2, print_freq=10, output="runs/demo", no_bn_wd=True)
TRAIN_BUDGET_S = 55.0
MIN_EPOCHS, MAX_EPOCHS = 5, 12
DATASET = dict(classes=10, per_class=160, val_per_class=30, size=112)


def prepare_demo(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, set[str]]:
    """The demo's config, and the flags now set (the demo's choices count as given)."""
    from convert.imagenet_to_shards import convert
    from convert.synthetic import COMPLETE_MARKER, SyntheticConfig, generate
    from pipeline.shard_format import is_complete

    synthetic = SyntheticConfig(**DATASET)
    src = generate(DEMO_DATA / "images", synthetic, progress=True)
    # The shards are named after what they were made from, so new images never meet old shards.
    tag = hashlib.sha256((src / COMPLETE_MARKER).read_bytes()).hexdigest()[:12]
    shards = DEMO_DATA / f"shards-{tag}"
    if not is_complete(shards):
        _, summary = convert(src, shards, shard_size_mb=8, progress=True)
        print(summary)
    overrides = {k: v for k, v in DEMO.items() if k not in given}
    if "device" not in given:
        overrides["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = overrides.get("device", cfg.device)
    if "amp" not in given and (device != "cpu" or _cpu_has_fast_bf16()):
        overrides["amp"] = True  # O2 bf16: the product's default step; a CPU without bf16 units stays fp32
    cfg = replace(cfg, shards=str(shards), **overrides)
    if "epochs" not in given:
        img_s = measure_step(cfg)
        epochs = int(TRAIN_BUDGET_S * img_s / (DATASET["classes"] * DATASET["per_class"]))
        overrides["epochs"] = min(MAX_EPOCHS, max(MIN_EPOCHS, epochs))
        cfg = replace(cfg, epochs=overrides["epochs"])
        print(f"=> demo: the step runs at {img_s:.0f} img/s here; {cfg.epochs} epochs fit about "
              f"{TRAIN_BUDGET_S:.0f} s of training (at least {MIN_EPOCHS}, at most {MAX_EPOCHS})")
    return cfg, given | set(overrides) | {"shards"}


def measure_step(cfg: TrainConfig, steps: int = 4) -> float:
    """Images per second the demo's run can expect: its training step timed alone on random data
    (after one warm-up step), with the precision and device the run will use, less a tenth for
    the loader's workers, which share the cores during the run."""
    import time

    from .devices import resolve_device
    from .precision import Precision
    from .step import build, train_step

    device = resolve_device(cfg.device)
    amp_dtype = torch.bfloat16 if device.supports_bf16() else torch.float16
    precision = Precision(cfg.opt_level if cfg.amp else "O0", amp_dtype, cfg.loss_scale, device.kind)
    model, opt, _ = build(cfg.arch, DATASET["classes"], device, precision, cfg.lr, cfg.momentum, cfg.weight_decay,
                          seed=cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device.torch_device,
                    dtype=precision.input_dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, DATASET["classes"], (cfg.batch_size,), device=device.torch_device)
    loss = torch.nn.CrossEntropyLoss()
    for i in range(steps + 1):
        if i == 1:
            device.synchronize()
            t0 = time.perf_counter()
        train_step(model, x, y, loss, precision, opt)
    device.synchronize()
    return 0.9 * steps * cfg.batch_size / (time.perf_counter() - t0)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
