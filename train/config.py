"""Training configuration: one dataclass, and the command line generated from it.

The seed's flags (the Ascend ModelZoo ResNet-152 main.py, itself pytorch/examples'
imagenet/main.py) keep their names, aliases and meanings; our own flags follow. Each field's
metadata holds its flags and help, so the CLI cannot drift from the dataclass. Unknown and
conflicting flags raise UsageError, which the CLI prints as one line naming the flag.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


class UsageError(ValueError):
    pass


def opt(*flags: str, help: str, **kw):
    return field(metadata={"flags": flags, "help": help, **kw.pop("meta", {})}, **kw)


@dataclass
class TrainConfig:
    # -- the seed's flags ------------------------------------------------------------------
    shards: str | None = opt("--shards", "--data", default=None,
                             help="shard folder (manifest.json), manifest URL, s3://bucket/prefix or tar pattern")
    arch: str = opt("-a", "--arch", help="any torchvision ResNet", default="resnet152")
    workers: int = opt("-j", "--workers", help="loader workers per process", default=min(8, os.cpu_count() or 1))
    epochs: int = opt("--epochs", "--epoch", help="total epochs", default=90)
    start_epoch: int = opt("--start-epoch", help="epoch to start at (a resume sets it)", default=0)
    batch_size: int = opt("-b", "--batch-size", help="batch size per process", default=256)
    lr: float = opt("--lr", "--learning-rate", help="peak learning rate", default=0.1)
    momentum: float = opt("--momentum", "--mom", help="SGD momentum", default=0.9)
    weight_decay: float = opt("--wd", "--weight-decay", help="weight decay", default=1e-4)
    print_freq: int = opt("-p", "--print-freq", help="log every N steps (the only host syncs)", default=10)
    resume: str = opt("--resume", help="checkpoint to resume from, or auto: the newest complete one in --output "
                      "(the default under torchrun; --resume '' starts afresh)", default="")
    evaluate: bool = opt("-e", "--evaluate", help="evaluate the --resume checkpoint on val and exit", default=False)
    world_size: int = opt("--world-size", help="nodes (with --multiprocessing-distributed) or processes",
                          default=-1)
    rank: int = opt("--rank", help="node rank (with --multiprocessing-distributed) or process rank", default=-1)
    dist_url: str = opt("--dist-url", help="rendezvous URL, tcp://host:port", default="env://")
    dist_backend: str = opt("--dist-backend", help="nccl, hccl or gloo (default: by device)", default="")
    gpu: int | None = opt("--gpu", help="device index for a single-process run", default=None)
    multiprocessing_distributed: bool = opt("--multiprocessing-distributed",
                                            help="spawn one process per device in --device-list", default=False)
    seed: int = opt("--seed", help="seed of model init, data order and augmentation", default=49)
    device: str = opt("--device", help="cuda, gpu, npu or cpu", default="cuda")
    addr: str = opt("--addr", help="master address for --multiprocessing-distributed", default="127.0.0.1")
    device_list: str = opt("--device-list", "--device_list", help="devices for --multiprocessing-distributed",
                           default="0")
    amp: bool = opt("--amp", help="mixed precision at --opt-level (without it: fp32, as in the seed)",
                    default=False)
    loss_scale: str = opt("--loss-scale", help="fp16 loss scale: a number, or dynamic", default="dynamic")
    opt_level: str = opt("--opt-level", help="O0, O1 or O2 (apex meanings)", default="O2")
    warm_up_epochs: float | None = opt("--warm-up-epochs", "--warm_up_epochs",
                                       help="linear warmup epochs (default: 5, at most a tenth of the run)",
                                       default=None)
    label_smoothing: float = opt("--label-smoothing", help="cross-entropy label smoothing", default=0.0)
    # -- our flags --------------------------------------------------------------------------
    recipe: str = opt("--recipe", help="auto (from the shards' manifest), imagenet, cifar, or fast (FFCV's "
                      "time-to-accuracy bundle: progressive resizing, label smoothing, no BN/bias wd, BlurPool, "
                      "test-time flip, linear schedule, eval above the train size)", default="auto",
                      meta={"choices": ("auto", "imagenet", "cifar", "fast")})
    image_size: int = opt("--image-size", help="train crop size (default: the recipe's, 224 or 32)", default=0)
    val_split: str = opt("--val-split", help="split to evaluate on (default: the recipe's, val or test)", default="")
    min_crop_scale: float = opt("--min-crop-scale", help="RandomResizedCrop's smallest area, as a fraction (0.08)",
                                default=0.08)
    crop: str = opt("--crop", help="resized (RandomResizedCrop) or padded (CIFAR's RandomCrop); default: the recipe's",
                    default="", meta={"choices": ("resized", "padded")})
    stem: str = opt("--stem", help="auto (cifar at 40 px or less), imagenet, or cifar (3x3 stride-1 conv, no max-pool)",
                    default="auto", meta={"choices": ("auto", "imagenet", "cifar")})
    val_resize: int | None = opt("--val-resize", help="val resize before the centre crop (default size*256/224)",
                                 default=None)
    amp_dtype: str = opt("--amp-dtype", help="bf16 or fp16 (default bf16 where supported)", default="")
    compile: bool = opt("--compile", help="torch.compile the model", default=False)
    cuda_graph: bool = opt("--cuda-graph", help="CUDA graphs through torch.compile(mode='reduce-overhead')",
                           default=False)
    no_bn_wd: bool = opt("--no-bn-wd", help="no weight decay on BatchNorm and bias", default=False)
    # -- time to accuracy (the fast recipe's parts, each its own flag) --------------------------
    schedule: str = opt("--schedule", help="lr after the warm-up: cosine (the seed's) or linear decay to 0",
                        default="cosine", meta={"choices": ("cosine", "linear")})
    blurpool: bool = opt("--blurpool", help="anti-aliased downsampling (BlurPool) before the strided convs",
                         default=False)
    tta_flip: bool = opt("--tta-flip", help="evaluate on each image and its mirror (mean of logits)", default=False)
    val_size: int = opt("--val-size", help="val crop size (default: the recipe's; --image-size, or x 256/224 for "
                        "fast)", default=0)
    start_image_size: int = opt("--start-image-size", help="progressive resizing: the first epochs' train size, "
                                "ramping to --image-size (0: none; fast: about 0.7 x --image-size)", default=0)
    ramp_start_epoch: int = opt("--ramp-start-epoch", help="progressive resizing: the last epoch at the start "
                                "size (default 70 %% of --epochs)", default=-1)
    ramp_end_epoch: int = opt("--ramp-end-epoch", help="progressive resizing: the first epoch at --image-size "
                              "(default 85 %% of --epochs)", default=-1)
    size_step: int = opt("--size-step", help="progressive resizing: sizes are multiples of this (default 32, "
                         "or 8 below 128 px)", default=0)
    backend: str = opt("--backend", help="loader backend: auto, cpu, nvjpeg, dali or synthetic", default="auto")
    synthetic: bool = opt("--synthetic", "--dummy", help="synthetic data (model speed alone)", default=False)
    max_steps: int = opt("--max-steps", help="stop after N optimizer steps (0: no limit)", default=0)
    save_every: int = opt("--save-every", help="also checkpoint every N steps (0: only at epoch ends)", default=0)
    output: str = opt("--output", help="run folder (or s3://bucket/run): config, log, metrics.jsonl, checkpoints",
                      default="runs/run")
    demo: bool = opt("--demo", help="generate, convert and train on the built-in synthetic dataset", default=False)
    optimizer: str = opt("--optimizer", help="fused or foreach SGD", default="fused",
                         meta={"choices": ("fused", "foreach")})
    eval_every: int = opt("--eval-every", help="evaluate every N epochs (0: only at the end)", default=1)
    tensorboard: bool = opt("--tensorboard", help="also write metrics.jsonl's metrics to OUTPUT/tensorboard "
                            "(needs the tensorboard package)", default=False)
    cache_dir: str = opt("--cache-dir", help="node-local folder caching whole shards of an object store dataset, "
                         "shared by the node's ranks and workers (default: range requests only)", default="")
    cache_limit: str = opt("--cache-limit", help="bound of --cache-dir, e.g. 500G (least recently used shards "
                           "are evicted; default: none)", default="")
    cache_fill: str = opt("--cache-fill", help="a sample of a shard not yet cached: read by range (ranged) or "
                          "wait for its download (wait)", default="ranged", meta={"choices": ("ranged", "wait")})
    block_shuffle: int = opt("--block-shuffle", help="K > 0: each stretch of a train epoch draws from blocks of K "
                             "shards, not the whole set (for a --cache-limit below the dataset; default 0: a full "
                             "permutation)", default=0)
    fetch_ahead: int = opt("--fetch-ahead", help="object store: batches whose ranges each loader worker fetches "
                           "while it decodes", default=2)
    # -- resolved from the recipe (no flags) --------------------------------------------------
    mean: tuple = field(default=(), metadata={})
    std: tuple = field(default=(), metadata={})

    def to_dict(self) -> dict:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we raise one line instead
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train.run", description="Train a torchvision ResNet on WebDataset shards.",
                allow_abbrev=False)
    p.add_argument("data", nargs="?", default=None, help="shard folder (the seed's positional DIR)")
    for f in fields(TrainConfig):
        meta = f.metadata
        if "flags" not in meta:
            continue  # resolved later, never given on the command line
        kw = {"dest": f.name, "help": meta["help"], "default": argparse.SUPPRESS}
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        else:
            t = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            kw["type"] = t
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        p.add_argument(*meta["flags"], **kw)
    return p


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, set[str]]:
    """Parse the command line; return the config and the names of the flags given explicitly."""
    ns = vars(build_parser().parse_args(argv))
    data = ns.pop("data", None)
    if data is not None:
        if "shards" in ns:
            raise UsageError("give the dataset once: positional DIR or --shards/--data, not both")
        ns["shards"] = data
    given = set(ns)
    defaults = {f.name: (f.default if f.default is not MISSING else None) for f in fields(TrainConfig)}
    cfg = TrainConfig(**{**defaults, **ns})
    validate(cfg, given)
    if "resume" not in given and not cfg.evaluate and under_torchrun():
        cfg.resume = "auto"  # a group torchrun restarts continues from the newest checkpoint
    return cfg, given


def under_torchrun() -> bool:
    """True in a process that torchrun's elastic agent started (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def validate(cfg: TrainConfig, given: set[str]) -> None:
    if cfg.arch not in RESNETS:
        raise UsageError(f"--arch {cfg.arch!r}: expected one of {', '.join(RESNETS)}")
    if cfg.opt_level not in ("O0", "O1", "O2"):
        raise UsageError(f"--opt-level {cfg.opt_level!r}: expected O0, O1 or O2")
    if cfg.amp_dtype not in ("", "bf16", "fp16"):
        raise UsageError(f"--amp-dtype {cfg.amp_dtype!r}: expected bf16 or fp16")
    if cfg.loss_scale != "dynamic":
        try:
            if float(cfg.loss_scale) <= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"--loss-scale {cfg.loss_scale!r}: expected a positive number or 'dynamic'") from None
    for name in ("batch_size", "epochs", "print_freq"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if "image_size" in given and cfg.image_size < 8:
        raise UsageError("--image-size must be >= 8")
    for name in ("val_size", "start_image_size"):
        if name in given and getattr(cfg, name) < 8:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 8")
    for name in ("ramp_start_epoch", "ramp_end_epoch"):
        if name in given and getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if {"ramp_start_epoch", "ramp_end_epoch"} <= given and cfg.ramp_start_epoch > cfg.ramp_end_epoch:
        raise UsageError(f"--ramp-start-epoch {cfg.ramp_start_epoch} is after --ramp-end-epoch {cfg.ramp_end_epoch}")
    if "size_step" in given and cfg.size_step < 1:
        raise UsageError("--size-step must be >= 1")
    for name in ("workers", "max_steps", "save_every", "start_epoch", "eval_every", "fetch_ahead",
                 "block_shuffle"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if cfg.cache_limit:
        from pipeline.shard_cache import parse_size

        try:
            parse_size(cfg.cache_limit)
        except ValueError as e:
            raise UsageError(f"--cache-limit: {e}") from None
        if not cfg.cache_dir:
            raise UsageError("--cache-limit needs --cache-dir")
    if cfg.warm_up_epochs is not None and cfg.warm_up_epochs < 0:
        raise UsageError("--warm-up-epochs must be >= 0")
    from pipeline.backends import BACKENDS

    if cfg.backend != "auto" and cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r}: expected auto or one of {', '.join(sorted(BACKENDS))}")
    if cfg.synthetic and "backend" in given and cfg.backend != "synthetic":
        raise UsageError(f"--synthetic conflicts with --backend {cfg.backend}")
    if cfg.demo and "shards" in given:
        raise UsageError("--demo makes its own dataset; it conflicts with --shards/--data")
    if cfg.device.split(":")[0] not in ("cuda", "gpu", "npu", "cpu"):
        raise UsageError(f"--device {cfg.device!r}: expected cuda, gpu, npu or cpu")
    if cfg.cuda_graph and cfg.device.split(":")[0] not in ("cuda", "gpu"):
        raise UsageError(f"--cuda-graph needs --device cuda, not {cfg.device}")
    if cfg.multiprocessing_distributed and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        raise UsageError("--multiprocessing-distributed conflicts with torchrun (which already spawned the ranks)")
    if cfg.evaluate and not cfg.resume:
        raise UsageError("--evaluate needs --resume CHECKPOINT")
    if not (cfg.shards or cfg.demo or cfg.synthetic):
        raise UsageError("no data: give --shards DIR (or --data DIR), --synthetic, or --demo")
    if not 0 < cfg.min_crop_scale <= 1:
        raise UsageError("--min-crop-scale must be in (0, 1]")
    if cfg.label_smoothing < 0 or cfg.label_smoothing >= 1:
        raise UsageError("--label-smoothing must be in [0, 1)")
    if cfg.tensorboard:
        from .metrics import summary_writer_class

        try:  # at startup, not at the first metrics row an epoch later
            summary_writer_class()
        except ImportError as e:
            raise UsageError(str(e)) from None
