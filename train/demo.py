"""`python -m train.run --demo`: the built-in default job.

Times the training step once on random data, generates the learnable synthetic dataset (cached),
converts it to shards (cached), and trains a ResNet-18 at 48 px for as many epochs as fit about
45 s (at least one, at most eight), evaluating once at the end. The floor is sized for a 2-core
AVX2 CPU whose step runs at about 30 img/s: one epoch of a small task (5 classes, 1,200 training
images) learns it to 84-91 % top-1 in fp32, and the whole demo took 74 s on a machine slowed to
that rate (README, "The demo's minute"). A faster machine trains more epochs of the same task.
Flags given on the command line override the demo's choices (an explicit --epochs skips the
timing).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import TrainConfig
from .devices import Device

DEMO_DATA = Path(os.environ.get("RESNET_SHARDS_DEMO_DATA", "data/demo"))

# On a slow CPU the number of steps, not the resolution, sets the cost: with 2 AVX2 cores a step
# of ResNet-18 costs about 95 ms whatever its batch (its 11.7M parameters) plus 3.8 ms per 48 px
# image (fp32); 32 px saves a third per image but learned far less in one epoch (79-87 % against
# 92-94 % with 320 images a class). The former task (10 classes, 1,600 images) needed 5 epochs
# of 64 for 84 %, 4x the time budget where the step runs at 30 img/s. One epoch of this one (37
# steps of 32) gave 88.0, 91.3, 88.0, 88.0 and 84.0 % top-1 in fp32 (seeds 49, 1-4; 150 val
# images, chance 20 %). Milder crops (areas from 50 %) learn faster in a short run; lr 0.05 gave
# 80-81 %.
DEMO = dict(arch="resnet18", image_size=48, batch_size=32, lr=0.03, weight_decay=5e-4, label_smoothing=0.1,
            min_crop_scale=0.5, workers=1, print_freq=10, eval_every=0, output="runs/demo", no_bn_wd=True)
TRAIN_BUDGET_S = 45.0
MIN_EPOCHS, MAX_EPOCHS = 1, 8
DATASET = dict(classes=5, per_class=240, val_per_class=30, size=64)


def prepare_demo(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, set[str]]:
    """The demo's config, and the flags now set (the demo's choices count as given)."""
    from convert.imagenet_to_shards import convert
    from convert.synthetic import COMPLETE_MARKER, SyntheticConfig, generate
    from pipeline.shard_format import is_complete

    overrides = {k: v for k, v in DEMO.items() if k not in given}
    if "device" not in given:
        overrides["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = overrides.get("device", cfg.device)
    if "amp" not in given and (device != "cpu" or Device("cpu").has_fast_bf16()):
        overrides["amp"] = True  # O2 bf16: the product's default step; a CPU without bf16 units stays fp32
    cfg = replace(cfg, **overrides)
    if "epochs" not in given:  # timed first: it needs no data, and the data needs no timing
        img_s = measure_step(cfg)
        epochs = int(TRAIN_BUDGET_S * img_s / (DATASET["classes"] * DATASET["per_class"]))
        overrides["epochs"] = min(MAX_EPOCHS, max(MIN_EPOCHS, epochs))
        cfg = replace(cfg, epochs=overrides["epochs"])
        print(f"=> demo: the step runs at {img_s:.0f} img/s here; {cfg.epochs} epochs fit about "
              f"{TRAIN_BUDGET_S:.0f} s of training (at least {MIN_EPOCHS}, at most {MAX_EPOCHS})", flush=True)
    synthetic = SyntheticConfig(**DATASET)
    # A folder per dataset config: a cache of another config (the former 10 classes) keeps its
    # files, and its extra class folders must not join this dataset.
    key = hashlib.sha256(json.dumps(asdict(synthetic), sort_keys=True).encode()).hexdigest()[:12]
    src = generate(DEMO_DATA / f"images-{key}", synthetic, progress=True)
    # The shards are named after what they were made from, so new images never meet old shards.
    tag = hashlib.sha256((src / COMPLETE_MARKER).read_bytes()).hexdigest()[:12]
    shards = DEMO_DATA / f"shards-{tag}"
    if not is_complete(shards):
        _, summary = convert(src, shards, shard_size_mb=8, progress=True)
        print(summary)
    return replace(cfg, shards=str(shards)), given | set(overrides) | {"shards"}


def measure_step(cfg: TrainConfig, steps: int = 2) -> float:
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

