"""Which checkpoint a run continues from, agreed by every rank before any of them trains.

`--resume auto` (the default under torchrun): every rank reports the newest complete checkpoint
in its own `--output`. On one machine the ranks share that folder; on several nodes each node may
have its own disk, and torchrun may give rank 0 to another node after a restart, so the node that
holds the newest checkpoint is not always rank 0's. The rank holding the newest one (the lowest
such rank on a tie, so rank 0 where it has it) reads it and broadcasts its contents. Every rank so
resumes from the same bytes, a node without the file needs none, and no rank can pick a file that
is still being written: all ranks are here, and only rank 0 writes checkpoints, while training.

An explicit `--resume PATH` is read by rank 0 and broadcast the same way, as is the newest
checkpoint of an `--output` in a bucket (`s3://...`), which every rank sees alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from . import checkpoint
from .checkpoint import CheckpointError


@dataclass
class Resumed:
    path: str  # as the reading rank sees it
    reader: int  # the rank that read it
    state: dict


def newest_rank(reports: list[tuple[str, dict] | None]) -> int | None:
    """The rank whose report (path, peek) is the newest checkpoint, the lowest on a tie; None when
    no rank has one."""
    best = None
    for rank, report in enumerate(reports):
        if report is not None and (best is None or report[1]["step"] > reports[best][1]["step"]):
            best = rank
    return best


def raise_together(error: str | None, rank: int, world: int) -> None:
    """Collective: raise CheckpointError on every rank when any rank has an error (the lowest
    rank's message, naming the rank). A rank that fails alone before a collective would leave the
    others waiting in it: a launch without torchrun's agent has nobody to stop them."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    for r, e in enumerate(errors):
        if e is not None:
            raise CheckpointError(e if world == 1 or r == rank else f"rank {r}: {e}")


def agree(resume: str, output: str | os.PathLike, rank: int, world: int, error: str | None = None) -> Resumed | None:
    """The checkpoint every rank resumes from (None: start afresh). Collective: every rank calls it.
    `error` is a failure of this rank's preparation (fetching the run's record): every rank then
    raises, rather than one rank dying while the others wait."""
    if resume == "auto":
        # A bucket is one store that every rank sees: rank 0 alone looks (and downloads).
        mine = None
        if error is None and (rank == 0 or not checkpoint.is_remote(output)):
            try:
                mine = checkpoint.newest(output)
            except checkpoint.CheckpointUnavailable as e:
                error = str(e)
        raise_together(error, rank, world)
        reports = [mine]
        if world > 1:
            reports = [None] * world
            dist.all_gather_object(reports, mine)
        reader = newest_rank(reports)
        if reader is None:
            return None
        path = reports[reader][0]
    else:
        raise_together(error, rank, world)
        reader, path = 0, resume
    state = error = None
    if rank == reader:
        try:
            state = checkpoint.load(path)
        except (FileNotFoundError, checkpoint.CheckpointUnavailable) as e:
            error = str(e)
        except checkpoint.DAMAGED as e:
            error = f"checkpoint {path} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}"
    if world > 1:
        box = [(state, error)]
        dist.broadcast_object_list(box, src=reader)
        state, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return Resumed(str(path), reader, state)


def describe(resumed: Resumed, redone: list[dict] | None, world: int) -> str:
    """The log line of a resume: which checkpoint, where in the run, and (`redone`: the metrics rows
    a dead attempt logged after it) how many steps were lost and are redone."""
    s = resumed.state
    line = f"=> resumed from {resumed.path}" + (f", read by rank {resumed.reader}" if world > 1 else "")
    loader = s.get("loader", {})
    if loader.get("epoch", s["epoch"]) < s["epoch"] or not loader.get("batch"):
        line += f": step {s['step']}, the start of epoch {s['epoch']}"
    else:
        line += f": step {s['step']}, epoch {s['epoch']} after batch {loader['batch']}"
    if redone is not None:
        logged = [r["step"] for r in redone if "loss" in r]
        lost = max(logged, default=s["step"]) - s["step"]
        steps = f"step {s['step'] + 1}" if lost == 1 else f"steps {s['step'] + 1}..{s['step'] + lost}"
        line += (f"; {lost} step{'s' * (lost != 1)} the previous attempt had logged after it ({steps}) "
                 f"{'are' if lost != 1 else 'is'} redone" if lost else "; no logged step after it is lost")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return line + (f" (torchrun restart {restart})" if restart != "0" else "")


def describe_world_change(old: int, new: int, batch: int, steps_per_epoch: int, epoch: int, offset: int | None,
                          steps_left: int) -> str:
    """The log line of a resume at another world size: what it does to the global batch and the
    steps, and (`offset`: where the resumed epoch goes on in its sample order; None when the
    checkpoint ended an epoch) what is left of the resumed epoch."""
    line = (f"=> world changed from {old} to {new} processes: global batch {old * batch} -> {new * batch} "
            f"({batch} per process, kept), {steps_per_epoch} steps/epoch; the LR schedule stays by epoch")
    if offset is not None:
        line += (f"; epoch {epoch} goes on after its first {offset} samples, "
                 f"{steps_left} step{'s' * (steps_left != 1)} left in it")
    return line
