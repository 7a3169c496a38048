"""Train a torchvision ResNet on WebDataset shards: `python -m train.run --shards DIR [flags]`.

The seed's flags and log lines (the Ascend ModelZoo ResNet-152 port of pytorch/examples'
imagenet/main.py) are kept; see train/config.py. The step: channels_last model, AMP at the
seed's opt levels (train/precision.py), fused SGD, zero_grad(set_to_none), the next batch
prefetched before backward, the LR set per step (linear warmup, then cosine), and no host sync
except at --print-freq. DDP comes from torchrun's environment, or from the seed's own
--multiprocessing-distributed launch. Under torchrun a restarted group continues from the newest
checkpoint (--resume auto; train/resume.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.objstore import ObjectStoreError
from pipeline.shard_format import ManifestError, MissingSplit, ShardError

from . import checkpoint, recipes
from .checkpoint import strip_module_prefix
from .config import TrainConfig, UsageError, parse_args
from .devices import Device, DeviceError, resolve_device
from .metrics import AverageMeter, MetricsWriter, drop_rows_after, progress_line, setup_logging, topk_correct
from .precision import Precision
from .resume import CheckpointError, agree, describe, describe_world_change
from .step import build, train_step

FPS_SKIP_STEPS = 5  # the seed leaves the first steps (allocator and cuDNN warm-up) out of FPS


def lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    """The lr at a fractional epoch: linear warmup, then cosine to zero (the seed's), or with
    --schedule linear a straight line to zero (FFCV's triangular schedule)."""
    w = cfg.warm_up_epochs
    if w > 0 and epoch_float < w:
        return cfg.lr * (epoch_float + 1) / (w + 1)
    span = max(cfg.epochs - w, 1e-9)
    done = min(epoch_float - w, span) / span
    if cfg.schedule == "linear":
        return cfg.lr * (1 - done)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))


def code_version() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class DistInfo:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int | None = None):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig, spawn_index: int | None) -> tuple[DistInfo, Device]:
    env = os.environ
    if spawn_index is not None:  # the seed's --multiprocessing-distributed
        devices = [d for d in cfg.device_list.split(",") if d != ""]
        nodes = max(cfg.world_size, 1)
        info = DistInfo(max(cfg.rank, 0) * len(devices) + spawn_index, nodes * len(devices), spawn_index)
        local_device = int(devices[spawn_index])
    elif "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        local_device = info.local_rank
    elif cfg.world_size > 1:  # the seed's manual launch: one process per --rank
        info = DistInfo(cfg.rank, cfg.world_size, cfg.gpu)
        local_device = cfg.gpu
    else:
        info = DistInfo()
        local_device = cfg.gpu
    device = resolve_device(cfg.device, local_device)
    device.set_current()
    if info.world > 1:
        backend = cfg.dist_backend or device.dist_backend
        init = cfg.dist_url if cfg.dist_url != "env://" or "MASTER_ADDR" in env else "env://"
        dist.init_process_group(backend, init_method=init, rank=info.rank, world_size=info.world)
    return info, device


def torchrun_restart_hazard() -> str | None:
    """Why a group torchrun restarts may hang in init, or None. torchrun's c10d rendezvous shares
    one store with every group it starts, across restarts; a restarted group can read the dead
    group's gloo/NCCL addresses there and hang or fail connecting (pytorch/pytorch#135712; seen
    here in about half of the restarts). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every group gets
    a store of its own."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return ("warning: torchrun --max-restarts shares its store with every restarted group, which can then "
                "hang in init; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun for reliable restarts")
    return None


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def build_loaders(cfg: TrainConfig, device: Device, info: DistInfo, input_dtype: torch.dtype):
    from pipeline import create_loader

    backend = "synthetic" if cfg.synthetic else cfg.backend
    common = dict(device=str(device.torch_device), workers=cfg.workers, seed=cfg.seed,
                  rank=info.rank, world_size=info.world, dtype=input_dtype, channels_last=True, crop=cfg.crop,
                  mean=cfg.mean, std=cfg.std, scale=(cfg.min_crop_scale, 1.0))
    if backend != "synthetic":  # object store shards: the node-local cache and the requests ahead
        common.update(cache_dir=cfg.cache_dir or None, cache_limit=cfg.cache_limit or None,
                      cache_fill=cfg.cache_fill, fetch_ahead=cfg.fetch_ahead)
    train_only = dict(block_shuffle=cfg.block_shuffle) if cfg.block_shuffle else {}
    # The train size is a function of the epoch (progressive resizing): every rank, and a resumed
    # run, computes the same size for the same epoch. Val keeps its own size.
    train = create_loader(cfg.shards, split="train", batch_size=cfg.batch_size, backend=backend,
                          image_size=recipes.train_sizes(cfg), **common, **train_only)
    val = None
    if cfg.shards is not None and backend != "synthetic":
        try:
            val = create_loader(cfg.shards, split=cfg.val_split, batch_size=cfg.batch_size, backend=backend,
                                image_size=cfg.val_size or cfg.image_size, val_resize=cfg.val_resize, **common)
        except MissingSplit as e:  # a dataset without val trains without evaluation, and says so; a val
            if info.main:          # split that exists but cannot be read is an error (ShardError) naming it
                print(f"warning: no {cfg.val_split} split ({e}); training without evaluation", file=sys.stderr)
    return train, val


def num_classes(loader) -> int:
    """Classes of the dataset behind a loader; an error when the shards cannot tell."""
    n = loader.num_classes
    if n is None:
        raise ShardError("the shards carry no class list (no manifest.json beside them, and their labels "
                         "arrive only while streaming): put the converter's manifest.json beside them")
    return n


def validate(model, loader, criterion, precision: Precision, info: DistInfo, log,
             tta_flip: bool = False) -> tuple[float, float]:
    """Top-1/top-5 over the val split, every sample counted once across ranks, with rank 0's
    BatchNorm statistics on every rank. With `tta_flip`, each image's logits are averaged with its
    mirror's (FFCV's test-time augmentation sums them: the same prediction, and a loss on the
    usual scale)."""
    dev = next(model.parameters()).device
    if info.world > 1:
        # DDP runs with broadcast_buffers=False, so each rank's running statistics drift apart.
        # Rank 0's are the ones its checkpoint saves: broadcasting them (rather than averaging)
        # makes this val score exactly the model that `-e --resume` on the checkpoint scores.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():  # one collective per dtype, not one per buffer
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            torch._foreach_copy_(bufs, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in bufs]), bufs)])
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # correct@1, correct@5, loss sum, count
    with torch.no_grad(), precision.autocast():
        for x, y in loader:
            if not len(y):
                continue  # a rank past the end of a split smaller than the world: its mean loss would be NaN
            out = model(x).float()
            if tta_flip:
                out = (out + model(x.flip(3)).float()) / 2
            c1, c5 = topk_correct(out, y)
            sums += torch.stack([c1.double(), c5.double(), criterion(out, y).double() * len(y),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
    all_reduce_sum(sums, info)
    c1, c5, loss_sum, n = sums.tolist()
    acc1, acc5 = 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1)
    log.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}  (val loss {loss_sum / max(n, 1):.4f}, {int(n)} samples)")
    model.train()
    return acc1, acc5


def save_checkpoint(output: str, cfg: TrainConfig, model, optimizer, precision, loader_state: dict, epoch: int,
                    step: int, best_acc1: float, device: Device, world: int) -> None:
    # The RNG state is rank 0's: every rank seeds it alike in build() and no step draws from it
    # (augmentation has its own counter-based RNG), so it is every rank's.
    checkpoint.save({
        "epoch": epoch, "arch": cfg.arch, "state_dict": model.state_dict(), "best_acc1": best_acc1,
        "optimizer": optimizer.state_dict(), "precision": precision.state_dict(), "loader": loader_state,
        "step": step, "rng": {"cpu": torch.get_rng_state(), "device": device.rng_state()},
        "config": cfg.to_dict(), "world_size": world,
    }, output)


def train(cfg: TrainConfig, spawn_index: int | None = None) -> dict:
    """Train with a config resolved by `resolve` (its recipe applied)."""
    if not cfg.mean or cfg.warm_up_epochs is None:
        raise ValueError("train() needs a config resolved by train.run.resolve (the recipe applied)")
    info, device = setup_distributed(cfg, spawn_index)
    # The run folder, or for --output s3://... its local mirror (checkpoints go to the bucket, and
    # the log, metrics and config follow each one there).
    out = checkpoint.local_folder(cfg.output)
    record_error = None
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            try:  # the bucket holds the record: the mirror continues the bucket's log and metrics
                checkpoint.fetch_record(cfg.output)
            except ObjectStoreError as e:
                record_error = f"the run's record in {cfg.output} could not be read ({e})"
    log = setup_logging(out if info.main else None, info.rank)
    if (hazard := torchrun_restart_hazard()) is not None:
        log.info(hazard)
    # Before anything is built: every rank agrees on the checkpoint (a collective), and a resumed
    # run drops the rows its dead attempt logged after it, as the steps are redone.
    resumed = agree(cfg.resume, cfg.output, info.rank, info.world, record_error) if cfg.resume else None
    redone: list[dict] = []
    if resumed is None and cfg.resume == "auto":
        if cfg.evaluate:
            raise CheckpointError(f"--evaluate --resume auto: no checkpoint in {cfg.output}")
        log.info(f"=> --resume auto: no checkpoint in {cfg.output}; starting afresh")
    elif resumed is not None and not cfg.evaluate and info.main:
        redone = drop_rows_after(out / "metrics.jsonl", resumed.state["step"])
    metrics = MetricsWriter(out / "metrics.jsonl" if info.main else None,
                            tensorboard=out / "tensorboard" if cfg.tensorboard else None,
                            purge_step=resumed.state["step"] + 1 if resumed is not None and not cfg.evaluate else None)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp_dtype) or \
        (torch.bfloat16 if device.supports_bf16() else torch.float16)
    opt_level = cfg.opt_level if cfg.amp else "O0"
    if opt_level != "O0" and amp_dtype == torch.bfloat16 and device.kind == "cpu" and not device.has_fast_bf16():
        log.info("=> --amp: this CPU has no bf16 kernels (they need AVX-512), so torch emulates bf16, "
                 "several times slower than fp32; leave out --amp for speed")
    precision = Precision(opt_level, amp_dtype, cfg.loss_scale, device.kind)
    train_loader, val_loader = build_loaders(cfg, device, info, precision.input_dtype)
    model, optimizer, opt_name = build(cfg.arch, num_classes(train_loader), device, precision, cfg.lr, cfg.momentum,
                                       cfg.weight_decay, cfg.no_bn_wd, cfg.optimizer, seed=cfg.seed, stem=cfg.stem,
                                       blurpool=cfg.blurpool)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bare = model
    if info.world > 1:
        ids = [device.index] if device.kind in ("cuda", "npu") else None
        # No per-step buffer broadcast: validate() gives every rank rank 0's BatchNorm statistics.
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                                          broadcast_buffers=False)
    step_model = model
    if cfg.compile or cfg.cuda_graph:
        step_model = torch.compile(model, mode="reduce-overhead" if cfg.cuda_graph else None)

    steps_per_epoch = len(train_loader)
    start_epoch, step, best_acc1 = cfg.start_epoch, cfg.start_epoch * steps_per_epoch, 0.0
    if resumed is not None:
        ckpt = resumed.state
        bare.load_state_dict(strip_module_prefix(ckpt["state_dict"]))
        if not cfg.evaluate:
            optimizer.load_state_dict(ckpt["optimizer"])
            precision.load_state_dict(ckpt["precision"])
            train_loader.load_state_dict(ckpt["loader"])
            torch.set_rng_state(ckpt["rng"]["cpu"])
            device.set_rng_state(ckpt["rng"]["device"])
            start_epoch, step, best_acc1 = ckpt["epoch"], ckpt["step"], ckpt.get("best_acc1", 0.0)
        log.info(describe(resumed, None if cfg.evaluate else redone, info.world))
        # (Checkpoints written before they recorded it: the loader state's world size.)
        saved_world = ckpt.get("world_size", ckpt.get("loader", {}).get("world_size", info.world))
        if saved_world != info.world and not cfg.evaluate:
            mid_epoch = train_loader.epoch == start_epoch
            log.info(describe_world_change(saved_world, info.world, cfg.batch_size, steps_per_epoch, start_epoch,
                                           train_loader.epoch_offset if mid_epoch else None, len(train_loader)))
        resumed = ckpt = None  # its tensors are copied into the model and optimizer now

    world_batch = cfg.batch_size * info.world
    if info.main:
        resolved = {**cfg.to_dict(), "opt_level_effective": opt_level, "amp_dtype_effective": str(amp_dtype),
                    "optimizer_impl": opt_name, "world_size_effective": info.world, "device_name": device.name(),
                    "torch": torch.__version__, "code_version": code_version(), "steps_per_epoch": steps_per_epoch}
        (out / "config.json").write_text(json.dumps(resolved, indent=1))
    log.info(recipes.describe(cfg, info.world))
    precision_name = str(amp_dtype).replace("torch.", "") if opt_level != "O0" else "fp32"
    log.info(f"=> {cfg.arch} on {device.name()} x{info.world}, {opt_level} ({precision_name}), "
             f"optimizer {opt_name}, batch {cfg.batch_size}/process, {steps_per_epoch} steps/epoch, "
             f"loader {train_loader.__class__.__name__}")
    if (notice := precision.loss_scale_notice()) is not None:
        log.info(notice)

    if cfg.evaluate:
        acc1, acc5 = validate(bare, val_loader, criterion, precision, info, log, cfg.tta_flip) if val_loader \
            else (0.0, 0.0)
        return {"acc1": acc1, "acc5": acc5, "fps": 0.0, "epochs": 0, "opt_level": opt_level, "device": device}

    fps, acc1 = 0.0, 0.0
    epoch = start_epoch
    stop = False
    train_s = 0.0  # wall seconds in training epochs (not evaluation) in this process: time to accuracy
    train_sizes = recipes.train_sizes(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        if epoch == start_epoch or train_loader.image_size != train_sizes.size(epoch - 1):
            log.info(f"=> epoch {epoch}: train images {train_loader.image_size} px")
        epoch_t0 = time.perf_counter()
        first = train_loader.state_dict()["batch"]  # > 0 when resuming mid-epoch
        epoch_steps = len(train_loader)  # fewer when the world size changed mid-epoch: what is left of it
        # The LR follows the epoch's samples: those that other world sizes ran of it (0 but after a
        # world change), in this world's steps.
        done_before = train_loader.epoch_offset / world_batch
        batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
        losses = AverageMeter("Loss", ":.4e")
        top1, top5 = AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")
        model.train()
        it = iter(train_loader)
        waited = [0.0]  # host seconds blocked on the loader since the last log line
        # The loader's state after the batch being trained: the next batch is fetched before that
        # batch's step ends, and a checkpoint must resume at the fetched one, not after it.
        resume_state = [train_loader.state_dict()]

        def fetch():
            t = time.perf_counter()
            resume_state[0] = train_loader.state_dict()
            nxt = next(it, None)
            waited[0] += time.perf_counter() - t
            return nxt

        batch = fetch()
        t_last, steps_since = time.perf_counter(), 0
        fps_t0, fps_steps = None, 0
        i = first
        while batch is not None:
            x, y = batch
            lr = lr_at(cfg, epoch + (done_before + i) / steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # Prefetch before backward: the next batch's copy runs on the loader's stream meanwhile.
            output, loss, batch = train_step(step_model, x, y, criterion, precision, optimizer, before_backward=fetch)
            step += 1
            i += 1
            steps_since += 1
            if i - first == FPS_SKIP_STEPS:
                device.synchronize()  # one sync, to start the FPS clock after warm-up
                fps_t0, fps_steps = time.perf_counter(), 0
            elif fps_t0 is not None:
                fps_steps += 1
            if i % cfg.print_freq == 0 or batch is None:
                c1, c5 = topk_correct(output.detach().float(), y)
                loss_v = float(loss.item())  # host sync: only here, every --print-freq steps
                now = time.perf_counter()
                n = len(y)
                losses.update(loss_v, n)
                top1.update(100.0 * float(c1) / n, n)
                top5.update(100.0 * float(c5) / n, n)
                batch_time.update((now - t_last) / steps_since, steps_since)
                data_time.update(waited[0] / steps_since, steps_since)
                log.info(progress_line(epoch, i, epoch_steps, [batch_time, data_time, losses, top1, top5]))
                metrics.write(step=step, epoch=epoch, loss=loss_v, lr=lr,
                              img_s=world_batch * steps_since / (now - t_last), data_wait=waited[0] / (now - t_last))
                t_last, steps_since, waited[0] = now, 0, 0.0
            # Not at the epoch's (or the run's) last step: the end-of-epoch checkpoint follows, after
            # validation, so a checkpoint's step is never one a later row of metrics.jsonl shares.
            ends = batch is None or (cfg.max_steps and step >= cfg.max_steps)
            if info.main and cfg.save_every and step % cfg.save_every == 0 and not ends:
                metrics.flush()
                save_checkpoint(cfg.output, cfg, bare, optimizer, precision, resume_state[0], epoch, step, best_acc1,
                                device, info.world)
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
        device.synchronize()
        train_s += time.perf_counter() - epoch_t0
        if fps_t0 is not None and fps_steps > 0:
            fps = world_batch * fps_steps / (time.perf_counter() - fps_t0)
            log.info(f"[{device.kind} id: {device.index or 0}] batch_size: {world_batch} "
                     f"Time: {world_batch / fps:.3f} * FPS@all {fps:.3f}")
        last = epoch + 1 == cfg.epochs or stop
        if val_loader is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            acc1, _ = validate(bare, val_loader, criterion, precision, info, log, cfg.tta_flip)
            metrics.write(step=step, epoch=epoch, val_acc1=acc1, train_s=round(train_s, 3),
                          image_size=train_loader.image_size)
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        if info.main:
            # A finished epoch resumes at the next one; a --max-steps stop resumes mid-epoch. The
            # loader's state is stored as it gave it: set_epoch on resume moves to the next epoch.
            metrics.flush()
            save_checkpoint(cfg.output, cfg, bare, optimizer, precision, resume_state[0],
                            epoch if stop else epoch + 1, step, best_acc1, device, info.world)
            if is_best:  # the same bytes: copy them rather than serialize the model twice
                checkpoint.save_best(cfg.output)
        if stop:
            break
    metrics.close()
    if info.main:
        checkpoint.upload_record(cfg.output)  # the last lines of a run in a bucket
    train_loader.close()
    if val_loader is not None:
        val_loader.close()
    return {"acc1": best_acc1, "fps": fps, "epochs": epoch + 1, "opt_level": opt_level, "device": device,
            "amp_dtype": amp_dtype}


def results_table(result: dict) -> str:
    dev = result["device"]
    amp = result["opt_level"]
    if amp != "O0":
        amp += " " + str(result.get("amp_dtype", "")).replace("torch.", "")
    rows = [("DEVICE", "PT version", "Acc@1", "FPS", "Epochs", "AMP_Type"),
            (dev.name(), torch.__version__.split("+")[0], f"{result['acc1']:.3f}", f"{result['fps']:.3f}",
             str(result["epochs"]), amp)]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    line = "| " + " | ".join("-" * w for w in widths) + " |"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), line, fmt(rows[1])])


def _spawn_entry(index: int, cfg: TrainConfig) -> None:
    result = train(cfg, spawn_index=index)
    if index == 0:
        print(results_table(result))


def resolve(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """The recipe the shards' manifest asks for, applied where the command line left a choice open."""
    from pipeline.source import read_manifest

    manifest = read_manifest(cfg.shards) if cfg.shards and not cfg.synthetic else None
    return recipes.apply(cfg, given, manifest)[0]


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, given = parse_args(argv)
        if cfg.demo:
            from .demo import prepare_demo

            cfg, given = prepare_demo(cfg, given)
        cfg = resolve(cfg, given)
        if cfg.multiprocessing_distributed:
            devices = [d for d in cfg.device_list.split(",") if d != ""]
            port = cfg.dist_url.rsplit(":", 1)[-1] if cfg.dist_url.startswith("tcp://") else "29688"
            os.environ.setdefault("MASTER_ADDR", cfg.addr)
            os.environ.setdefault("MASTER_PORT", port)
            torch.multiprocessing.spawn(_spawn_entry, args=(cfg,), nprocs=len(devices))
            return 0
        result = train(cfg)
    # ImportError: an optional extra a flag needs (s3fs for s3://, tensorboard), named in the message.
    except (UsageError, DeviceError, FileNotFoundError, ShardError, ManifestError, CheckpointError, ImportError,
            ObjectStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume auto (or OUTPUT/checkpoint.pth.tar) to continue", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        print(results_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
