"""Which samples each rank sees in which batch, per epoch, computed before any data moves.

An epoch's plan is a pure function of (table, seed, epoch, rank, world size, batch size), so
every rank agrees on it without communicating, and a resumed run recomputes it exactly.

- Train, random-access shards (local files, or objects read by range): a full permutation of all
  samples each epoch, which does not depend on the world size. Rank r takes every world-th
  sample of it, cut to the same length on every rank, so the slices are disjoint, every rank runs
  the same number of batches, and after k batches the ranks together have consumed exactly its
  first k * world * batch samples. A run that goes on at another world size mid-epoch deals the
  rest of the permutation (from `consumed`) the same way.
- Train, streamed shards (http): a per-epoch shard shuffle, shards dealt to ranks to balance sample
  counts, each rank's stream passed through a seeded shuffle buffer; ranks are cut to the
  shortest one, so the batch count is again equal.
- Val: natural order, each sample exactly once across ranks and no padding. The split is cut
  into world * nb near-equal chunks (nb batches per rank), chunk b * world + r being rank r's
  batch b, so every rank has nb batches and the last ones may be a little smaller.
"""
from __future__ import annotations

import math

import numpy as np


def shard_starts(shard_sizes) -> np.ndarray:
    """(shards + 1,) first sample id of each shard, then the total."""
    return np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED])).permutation(n)


def block_permutation(shard_sizes, seed: int, epoch: int, window: int) -> np.ndarray:
    """An epoch's order of every sample that keeps each stretch of it within `window` shards: the
    shards in a random order, cut into blocks of `window` shards, each block's samples permuted
    together (MosaicML streaming's py1b, with blocks of whole shards). A node-local cache of a few
    blocks then holds what the next batches need; the price is randomness: a batch draws from
    `window` shards, not from all of them."""
    if window < 1:
        raise ValueError(f"block shuffle window {window}: expected >= 1 shard")
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0xB10C]))
    starts = shard_starts(shard_sizes)
    order = rng.permutation(len(shard_sizes))
    parts = [rng.permutation(np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order[i:i + window]]))
             for i in range(0, len(order), window)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def train_batches_local(n: int, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                        drop_last: bool = True, start: int = 0, order: np.ndarray | None = None) -> list[np.ndarray]:
    """Rank `rank`'s batches of the epoch's permutation (or of `order`, an epoch's order of all n
    samples, such as `block_permutation`'s) from position `start` on (0 but where earlier world
    sizes consumed its head: see `consumed`)."""
    perm = (epoch_permutation(n, seed, epoch) if order is None else order)[start:]
    per_rank = len(perm) // world
    mine = perm[rank::world][:per_rank]
    return _batch(mine, batch_size, drop_last)


def train_batch_count(n: int, world: int, batch_size: int, drop_last: bool, start: int = 0) -> int:
    """len(train_batches_local(n, ..., start=start)), on every rank."""
    return _count((n - start) // world, batch_size, drop_last)


def consumed(n: int, start: int, world: int, batch_size: int, batches: int, count: int) -> int:
    """How far into the epoch's permutation the ranks of a world have read together once each has
    yielded `batches` of its `count` batches of `train_batches_local(..., start=start)`: where the
    next world, of any size, starts dealing. Every batch before a rank's last is full, so that is
    start + batches * world * batch_size; once the ranks have yielded all their batches the epoch
    is over (n): its cut to equal ranks and drop_last remainder are left out, as in any epoch."""
    return n if batches >= count else start + batches * world * batch_size


def train_batches_remote(shard_sizes: list[int], seed: int, epoch: int, rank: int, world: int, batch_size: int,
                         buffer: int, drop_last: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """(batches of sample ids, the rank's shard order to stream)."""
    starts = shard_starts(shard_sizes)
    assigned, loads = _deal_shards(shard_sizes, seed, epoch, world)
    per_rank = min(loads)
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in assigned[rank]] or [np.zeros(0, np.int64)])
    shuffled = shuffle_buffer_order(stream, buffer, np.random.Generator(np.random.PCG64([seed, epoch, rank, 0xB0F])))
    return _batch(shuffled[:per_rank], batch_size, drop_last), assigned[rank]


def train_batch_count_remote(shard_sizes: list[int], seed: int, epoch: int, world: int, batch_size: int,
                             drop_last: bool) -> int:
    """len(train_batches_remote(...)[0]), on every rank."""
    return _count(min(_deal_shards(shard_sizes, seed, epoch, world)[1]), batch_size, drop_last)


def _deal_shards(shard_sizes: list[int], seed: int, epoch: int, world: int) -> tuple[list[list[int]], list[int]]:
    """(each rank's shards in stream order, each rank's sample count) of a streamed epoch."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5A4D]))
    order = rng.permutation(len(shard_sizes))
    loads = [0] * world
    assigned: list[list[int]] = [[] for _ in range(world)]
    for s in order:  # deal each shard to the least loaded rank: ranks differ by at most a shard
        r = min(range(world), key=lambda k: (loads[k], k))
        assigned[r].append(int(s))
        loads[r] += shard_sizes[s]
    return assigned, loads


def shuffle_buffer_order(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a webdataset-style shuffle buffer of `size` emits `stream` in."""
    if size <= 1:
        return stream.copy()
    out = np.empty_like(stream)
    buf = list(stream[:size])
    picks = rng.integers(0, 1 << 62, size=max(len(stream) - len(buf), 0))
    for i, incoming in enumerate(stream[size:]):
        k = int(picks[i] % len(buf))
        out[i] = buf[k]
        buf[k] = incoming
    tail = np.asarray(buf, dtype=stream.dtype)
    rng.shuffle(tail)
    out[len(stream) - len(tail):] = tail
    return out


def val_batches(n: int, rank: int, world: int, batch_size: int) -> list[np.ndarray]:
    nb = max(1, math.ceil(n / (world * batch_size)))
    slots = world * nb
    bounds = np.linspace(0, n, slots + 1).round().astype(np.int64)
    return [np.arange(bounds[b * world + rank], bounds[b * world + rank + 1]) for b in range(nb)]


def _batch(ids: np.ndarray, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    n = len(ids) // batch_size * batch_size if drop_last else len(ids)
    return [ids[i:i + batch_size] for i in range(0, n, batch_size)]


def _count(per_rank: int, batch_size: int, drop_last: bool) -> int:
    """len(_batch(ids, ...)) for `per_rank` ids."""
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)
