"""`python -m train.run --demo`: the built-in default job.

Generates the learnable synthetic dataset (cached), converts it to shards (cached), and trains a
small ResNet at low resolution, about a minute on a 2-core CPU. Flags given on the command line
override the demo's choices.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig

DEMO_DATA = Path(os.environ.get("RESNET_SHARDS_DEMO_DATA", "data/demo"))

# Small enough for a CPU minute, large enough that accuracy far above chance means learning.
DEMO = dict(arch="resnet18", image_size=64, batch_size=64, epochs=12, lr=0.05, warm_up_epochs=1,
            workers=2, print_freq=10, output="runs/demo", weight_decay=5e-5, no_bn_wd=True)


def prepare_demo(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, set[str]]:
    """The demo's config, and the flags now set (the demo's choices count as given)."""
    from convert.imagenet_to_shards import convert
    from convert.synthetic import COMPLETE_MARKER, SyntheticConfig, generate
    from pipeline.shard_format import is_complete

    synthetic = SyntheticConfig(classes=10, per_class=160, val_per_class=30, size=112)
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
    return replace(cfg, shards=str(shards), **overrides), given | set(overrides) | {"shards"}


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
