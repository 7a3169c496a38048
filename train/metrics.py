"""Meters and log lines in the seed's format (users grep them), plus metrics.jsonl."""
from __future__ import annotations

import json
import logging
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


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path is not None else None

    def write(self, **row) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
