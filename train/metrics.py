"""Meters and log lines in the seed's format (users grep them), plus metrics.jsonl (and, with
--tensorboard, the same rows as TensorBoard scalars)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch


class AverageMeter:
    def __init__(self, name: str, fmt: str = ":f"):
        self.name, self.fmt = name, fmt
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


def progress_line(epoch: int, i: int, n: int, meters: list[AverageMeter]) -> str:
    width = len(str(n))
    return f"Epoch: [{epoch}][{i:>{width}}/{n}]\t" + "\t".join(str(m) for m in meters)


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Counts (as device tensors, no sync) of samples whose label is in the top-k."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices.t()
    hit = pred.eq(target.view(1, -1))
    return [hit[:min(k, maxk)].any(0).sum() for k in ks]


def setup_logging(output: Path | None, rank: int) -> logging.Logger:
    log = logging.getLogger("train")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank == 0:
        fmt = logging.Formatter("%(message)s")
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        log.addHandler(h)
        if output is not None:
            fh = logging.FileHandler(output / "train.log")
            fh.setFormatter(fmt)
            log.addHandler(fh)
    return log


# metrics.jsonl key -> TensorBoard tag (train/ and val/ become two groups of charts).
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "img_s": "train/img_s", "data_wait": "train/data_wait",
                    "val_acc1": "val/acc1", "train_s": "val/train_s", "image_size": "train/image_size"}


def summary_writer_class():
    """torch's SummaryWriter, which needs the optional tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]')") from None
    return SummaryWriter


def drop_rows_after(path: Path, step: int) -> list[dict]:
    """Rewrite metrics.jsonl (atomically) without the rows of steps after `step`, and return them:
    a run resumed at `step` redoes those steps and logs them again, so each step keeps one row.
    A torn last line (a writer killed mid-line) is dropped too."""
    if not path.is_file():
        return []
    kept, dropped = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        (kept if row["step"] <= step else dropped).append(row)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes (the others pass path None). With
    `tensorboard` (a folder), every numeric field of a row is also a scalar at the row's step;
    `purge_step` (a resumed run's first step) hides the scalars a dead attempt logged from it on."""

    def __init__(self, path: Path | None, tensorboard: Path | None = None, purge_step: int | None = None):
        self.f = open(path, "a", buffering=1) if path is not None else None
        self.tb = None
        if path is not None and tensorboard is not None:
            self.tb = summary_writer_class()(log_dir=str(tensorboard), purge_step=purge_step)

    def write(self, **row) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(TENSORBOARD_TAGS.get(key, key), value, global_step=row["step"])

    def flush(self) -> None:
        """Make every row so far durable: called before a checkpoint, so a restart's rows after it
        join the rows before it without a gap."""
        if self.f is not None:
            self.f.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
