"""What the shard backends (cpu, nvjpeg, dali, resident) share: `PlannedLoader`, with the epoch plan,
len, set_epoch and the resume state; and `ResumableLoader`, the epoch, position and state that every
backend (synthetic too) keeps.

Every shard backend follows the same plan (`pipeline.plan`: which samples each rank sees in which
batch) and draws every sample's crop and flip from the same counter-based RNG (`Transform`), so
their batches hold the same samples with the same augmentation, and one backend's state resumes
another's. This module sits below the backend registry: backends import it, and it imports none
of them.
"""
from __future__ import annotations

import os
import sys
import weakref

import numpy as np

from . import plan
from .contract import LoaderConfig
from .source import SampleTable
from .stats import LoaderStats

# 3: "offset", where the current world size's plan of the epoch starts in its permutation (a
# state may then resume on another world size). 2 is read as offset 0.
STATE_VERSION = 3
READABLE_STATE_VERSIONS = (2, 3)
OPTIONAL_PLAN_KEYS = ("block_shuffle",)  # in a state only when on


class ResumableLoader:
    """The epoch, the position in it and the resume state, for every backend. A subclass says
    what its state must match (`_plan_key`: at least seed, world_size, batch_size, samples,
    split and drop_last), its plan of the current epoch starts `self._offset` samples into the
    epoch's permutation, and its iteration starts at `_start()` and advances `self._position` by
    one as it yields each batch.

    A train state saved at another world size continues the epoch's global order: the ranks of
    the world that saved it consumed the permutation up to `plan.consumed`, and this world deals
    the rest (its `offset`) from its first batch. On its own world size a state keeps its offset
    and batch, so it resumes bitwise as before."""

    def __init__(self):
        self.epoch = 0
        self._resume_batch = 0
        self._position = 0
        self._offset = 0

    def _plan_key(self) -> dict:
        raise NotImplementedError

    @property
    def epoch_offset(self) -> int:
        """Samples of the current epoch's permutation that earlier world sizes consumed before
        this loader's plan of it begins: 0, unless a state saved at another world size was loaded."""
        return self._offset

    @property
    def image_size(self) -> int:
        """The side of the current epoch's images: the config's schedule at this epoch."""
        return self.cfg.size_at(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_batch = self._position = self._offset = 0
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Resume right after the last batch this loader yielded."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self._position, "offset": self._offset,
                **self._plan_key()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` (from any rank of this world size or of another) left off; a
        state of another dataset, seed, batch size, split or drop_last raises ValueError."""
        if state.get("version") not in READABLE_STATE_VERSIONS:
            raise ValueError(f"loader state version {state.get('version')!r}, this loader reads "
                             f"{' or '.join(map(str, READABLE_STATE_VERSIONS))}")
        key = self._plan_key()
        # A plan option left out of a key when off (block_shuffle) must still match when a state has it.
        for k in [*key, *(k for k in OPTIONAL_PLAN_KEYS if k in state and k not in key)]:
            mine = key.get(k)
            if k != "world_size" and state.get(k) != mine:
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r}, this loader has {k}={mine!r}")
        batch, offset, world = int(state["batch"]), int(state.get("offset", 0)), state.get("world_size")
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"loader state has no valid world_size ({world!r})")
        if world != key["world_size"]:
            why = None
            if not self.cfg.train:  # val plans ignore the offset
                why = "a val split is dealt to ranks by world size and is never resumed mid-epoch" if batch else None
                offset = 0
            else:
                count = self._batch_count(int(state["epoch"]), world, offset)
                offset = plan.consumed(key["samples"], offset, world, key["batch_size"], batch, count)
                if 0 < offset < key["samples"]:
                    why = self._fixed_world()
            if why is not None:
                raise ValueError(f"loader state was saved with world_size={world} mid-epoch, "
                                 f"this loader has world_size={key['world_size']!r}: {why}")
            batch = 0
        self.epoch = int(state["epoch"])
        self._offset = offset
        self._resume_batch = self._position = batch

    def _batch_count(self, epoch: int, world: int, offset: int) -> int:
        """Train batches per rank of `epoch` on `world` ranks, from `offset` on: where that world's
        epoch ended."""
        c = self.cfg
        return plan.train_batch_count(self._plan_key()["samples"], world, c.batch_size, c.drop, offset)

    def _fixed_world(self) -> str | None:
        """Why this train plan cannot continue, mid-epoch, an epoch begun at another world size
        (None: it can)."""
        return None

    def _start(self) -> int:
        """Where an iteration starts: where `load_state_dict` pointed, else the epoch's first batch."""
        start, self._resume_batch = self._resume_batch, 0
        self._position = start
        return start

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A child forked while loaders live (a ProcessPoolExecutor's worker, say) gets copies whose threads,
# worker processes and DALI pipelines are the parent's: finalizing one there would wait on threads
# it does not have (DALI's shutdown crashed such a child). The child keeps them all reachable.
_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()
_FORKED_COPIES: list = []
os.register_at_fork(after_in_child=lambda: _FORKED_COPIES.extend(_LIVE_LOADERS))


class PlannedLoader(ResumableLoader):
    """What every shard backend shares: the epoch plan, len and the resume state.

    A subclass implements `__iter__` with `_begin()` (the epoch, its batches, the shard order for
    remote streaming, and the first batch), advancing `self._position` by one as it yields each
    batch, and `close()`.
    """

    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        super().__init__()
        self._owner_pid = os.getpid()
        _LIVE_LOADERS.add(self)
        self.table = table
        self.cfg = cfg
        self._plans: dict[int, tuple[list[np.ndarray], list[int] | None]] = {}
        self.stats = LoaderStats()
        if cfg.block_shuffle and table.streamed:
            raise ValueError("block_shuffle is for random-access shards (local or object store); streamed (http) "
                             "shards are read whole, in order, through a shuffle buffer")
        if len(self) == 0:
            raise ValueError(f"split {cfg.split!r}: {len(table)} samples give no batch of {cfg.batch_size} "
                             f"on each of {cfg.world_size} rank(s)")

    # -- plan ---------------------------------------------------------------------------
    def _plan(self, epoch: int):
        offset = self._offset if epoch == self.epoch else 0
        if (epoch, offset) not in self._plans:
            c = self.cfg
            if not c.train:
                batches = plan.val_batches(len(self.table), c.rank, c.world_size, c.batch_size)
                mine = np.concatenate(batches) if batches else np.zeros(0, np.int64)
                p = (batches, sorted(set(self.table.shard[mine].tolist())))  # natural order, own shards
            elif self.table.streamed:
                # A streamed epoch changes world size only where it is over (`_fixed_world`).
                p = ([], []) if offset else plan.train_batches_remote(
                    self.table.shard_sizes, c.seed, epoch, c.rank, c.world_size, c.batch_size, c.shuffle_buffer,
                    c.drop)
            else:
                order = None
                if c.block_shuffle:
                    order = plan.block_permutation(self.table.shard_sizes, c.seed, epoch, c.block_shuffle)
                p = (plan.train_batches_local(len(self.table), c.seed, epoch, c.rank, c.world_size, c.batch_size,
                                              c.drop, offset, order), None)
            self._plans = {(epoch, offset): p}
        return self._plans[(epoch, offset)]

    def batch_sample_ids(self, epoch: int | None = None) -> list[np.ndarray]:
        """The sample ids (rows of `table`) of each batch this rank yields in `epoch` (default: the
        current one, from `epoch_offset` on), before any corrupt sample is replaced."""
        return [b.copy() for b in self._plan(self.epoch if epoch is None else epoch)[0]]

    def __len__(self) -> int:
        return len(self._plan(self.epoch)[0])

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (val: its share of the exactly-once split)."""
        return sum(len(b) for b in self._plan(self.epoch)[0])

    @property
    def num_classes(self) -> int | None:
        return self.table.num_classes

    def _plan_key(self) -> dict:
        """What a saved state must match. Random-access tables (local or object store) share one
        plan, so a state resumes on either copy of a dataset; a streamed one's plan also depends
        on its shuffle buffer."""
        c = self.cfg
        key = {"seed": c.seed, "world_size": c.world_size, "batch_size": c.batch_size, "samples": len(self.table),
               "split": c.split, "drop_last": c.drop}
        if self.table.streamed and c.train:
            key["shuffle_buffer"] = c.shuffle_buffer
        elif c.train and c.block_shuffle:
            key["block_shuffle"] = c.block_shuffle
        return key

    def _batch_count(self, epoch: int, world: int, offset: int) -> int:
        c = self.cfg
        if self.table.streamed and not offset:  # (a streamed epoch's offset is 0, or n once it is over)
            return plan.train_batch_count_remote(self.table.shard_sizes, c.seed, epoch, world, c.batch_size, c.drop)
        return super()._batch_count(epoch, world, offset)

    def _fixed_world(self) -> str | None:
        if self.table.streamed:
            return ("streamed (http) shards are dealt to ranks whole, so their epoch continues only on the world "
                    "size it began on; restart at an epoch's end, or read the shards by random access (a local "
                    "copy or an object store)")
        return None

    def _begin(self):
        """Start an iteration: (epoch, batches, shard order, first batch). An iteration starts
        where `load_state_dict` pointed, else at the epoch's first batch."""
        batches, shard_order = self._plan(self.epoch)
        start = self._start()
        if self.table.cache is not None:  # fill the node-local cache in the order the plan reads
            me = weakref.ref(self)  # the filler's threads must not keep the loader alive

            def position() -> int:
                loader = me()
                return loader._position - start if loader is not None else len(batches)

            self.table.cache.follow([self.table.shard[b] for b in batches[start:]], position)
        return self.epoch, batches, shard_order, start

    def __del__(self):
        if sys.is_finalizing():
            return  # daemon threads are frozen, perhaps holding locks: the OS frees what is left
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer has no caller to report to
            pass
