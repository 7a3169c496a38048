"""Plan shards, encode their images in parallel, resume what an interrupted run finished.

The plan (which samples go into which shard, in which order) is fixed before any image is read.
With many shards, each worker process writes whole shards. With fewer shards than that keeps
busy (a resized dataset often fits in one), the unit of parallel work is a chunk of images:
workers only encode, and this process writes the shards one by one in plan order. Either way
the output does not depend on the worker count, and an interrupted run loses at most the
shards being written.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pipeline import objstore
from pipeline.shard_format import VERSION, Sample, ShardWriter, new_manifest, shard_entry, shard_name

from .destination import ConvertError, destination, entries_by_name
from .images import RejectedImage

# An encoder turns one planned item into its sample and the source bytes it read, or raises
# RejectedImage. It must be a module-level function so that worker processes can receive it.
Encoder = Callable[[object, dict], tuple[Sample, int]]
# A source reader turns a shard's planned items into the same items, in order, with the
# `source` the encoder reads (a parquet row's bytes, say), lazily: see plan_shards. Like an
# encoder it must pickle, to reach the worker that writes the shard.
SourceReader = Callable[[list["Item"]], Iterator["Item"]]


@dataclass
class Item:
    key: str        # sample key in the shard: no dots
    path: str       # display path, "<split>/<wnid>/<file>"
    label: int
    size: int       # estimated stored bytes, used only to cut shards
    source: object  # what the encoder reads: a file path, or raw pixels


@dataclass
class ShardJob:
    split: str
    name: str
    items: list[Item]
    plan: str
    encoder: Encoder
    options: dict
    read_sources: SourceReader | None = None


@dataclass
class SplitReport:
    samples: int = 0
    shards: int = 0
    kept_shards: int = 0
    written: int = 0  # samples written by this run (not kept from an earlier one)
    bytes_in: int = 0
    bytes_out: int = 0
    rejects: list = field(default_factory=list)
    ignored: int = 0


def plan_shards(split: str, items: list[Item], shard_bytes: int, encoder: Encoder,
                options: dict, read_sources: SourceReader | None = None) -> list[ShardJob]:
    """Cut the ordered items into shards of about `shard_bytes` each.

    With `read_sources`, the items' sources are references that the process writing a shard (its
    worker, or this process when workers encode chunks) reads as it goes: sources that would not
    fit in memory, or are cheaper read in bulk (a parquet row group), are read there once, in order.
    """
    jobs, current, acc = [], [], 0
    for item in items:
        current.append(item)
        acc += item.size
        if acc >= shard_bytes:
            jobs.append(current)
            current, acc = [], 0
    if current:
        jobs.append(current)
    out = []
    for i, shard_items in enumerate(jobs):
        name = shard_name(split, i)
        out.append(ShardJob(split, name, shard_items, _fingerprint(name, shard_items, options), encoder, options,
                            read_sources))
    return out


def _fingerprint(name: str, items: list[Item], options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([VERSION, name, options], sort_keys=True).encode())
    for it in items:
        h.update(f"\n{it.key}\t{it.path}\t{it.label}".encode())
    return h.hexdigest()[:32]


# -- worker side ------------------------------------------------------------------------------

# Images per task. Small enough that a single shard still spreads over every core, large
# enough that the per-task overhead (pickling, a pipe round trip) stays under 1 % of encoding.
CHUNK = 16
# Tasks in flight per worker: keeps every worker busy across shard boundaries while bounding
# the encoded bytes held in memory.
AHEAD = 4
# Shards per worker from which whole shards become the unit of work (see split_by_shard):
# enough that the last, uneven wave of shards costs little.
SHARDS_PER_WORKER = 4


def stored_ratio(probes: list[Item], options: dict, encoder: Encoder,
                 read_sources: SourceReader | None = None) -> float:
    """Stored/source bytes of `probes` as `encoder` writes them (1.0 when none is accepted): how a
    converter that re-encodes estimates its shards' sizes before writing any."""
    src = out = 0
    for item in (probes if read_sources is None else read_sources(probes)):
        try:
            sample, n = encoder(item, options)
        except RejectedImage:
            continue
        src += n
        out += len(sample.image)
    return out / src if src else 1.0


def encode_chunk(encoder: Encoder, options: dict, items: list[Item]) -> list[tuple]:
    """Encode items; one (sample or None, source bytes, reject reason or None) per item."""
    out = []
    for item in items:
        try:
            sample, nbytes_in = encoder(item, options)
        except RejectedImage as e:
            out.append((None, 0, e.reason))
        else:
            out.append((sample, nbytes_in, None))
    return out


_progress_queue = None


def _init_shard_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _report(n: int, bytes_in: int, bytes_out: int) -> None:
    _progress_queue.put((n, bytes_in, bytes_out))


def write_whole_shard(job: ShardJob, out: Path, strict: bool) -> dict:
    """Worker side of the per-shard mode: encode and write one shard."""
    return _write_shard(job, out, strict, _encoded_chunks([job], None, 0), _report)


# -- main side --------------------------------------------------------------------------------

def run_conversion(out: Path | str, tool: str, classes: list[str], splits: dict[str, list[ShardJob]],
                   options: dict, workers: int, strict: bool, ignored: dict[str, list[str]] | None = None,
                   unplanned_rejects: dict[str, list[dict]] | None = None, extra: dict | None = None,
                   progress: bool = True, staging: Path | str | None = None) -> tuple[dict, dict[str, SplitReport]]:
    """Write every planned shard that is not already finished, keeping the manifest current.

    `out` is a folder or an object store URL (`s3://bucket/prefix`: shards are written in the
    local `staging` folder and uploaded one by one, the manifest last; see convert.destination).
    `unplanned_rejects` are files turned away before planning (an unlabelled val image, say);
    they are reported with the rest. `extra` adds fixed top-level keys to the manifest.
    """
    dest = destination(out, staging)
    dest.prepare()
    previous_manifest = dest.previous_manifest()
    previous = entries_by_name(previous_manifest)
    ignored = ignored or {}
    unplanned_rejects = unplanned_rejects or {}
    entries: dict[str, dict[str, dict]] = {s: {} for s in splits}
    reports = {s: SplitReport(ignored=len(ignored.get(s, []))) for s in splits}
    todo: list[ShardJob] = []
    for split, jobs in splits.items():
        reports[split].shards = len(jobs)
        for job in jobs:
            old = previous.get(job.name)
            if dest.still_valid(old, job):
                entries[split][job.name] = old
                reports[split].kept_shards += 1
            else:
                todo.append(job)
    kept, extra = kept_splits(previous_manifest, splits, classes, dest), dict(extra or {})
    if kept:  # what an earlier conversion recorded of a split it kept (train's image_size, pixel_stats)
        extra = {**{k: v for k, v in previous_manifest.items() if k not in MANIFEST_KEYS}, **extra}
    if todo:
        dest.retract()
    for split, jobs in splits.items():
        dest.remove_unplanned(split, {j.name for j in jobs}, set(previous))

    def manifest(complete: bool) -> dict:
        info = dict(kept)
        for split, jobs in splits.items():
            done = [entries[split][j.name] for j in jobs if j.name in entries[split]]
            info[split] = {
                "shards": done,
                "rejects": unplanned_rejects.get(split, []) + [r for e in done for r in e["rejects"]],
                "ignored": {"count": len(ignored.get(split, [])), "examples": ignored.get(split, [])[:20]},
            }
        if kept:  # one order, whichever split was converted first
            info = dict(sorted(info.items(), key=lambda kv: (SPLIT_ORDER.get(kv[0], len(SPLIT_ORDER)), kv[0])))
        return new_manifest(tool, options, classes, info, complete, extra)

    total_items = sum(len(j.items) for j in todo)
    bar = _bar(total_items, progress)
    start = time.perf_counter()
    moved = [0, 0]

    def on_progress(n, b_in, b_out):
        moved[0] += b_in
        moved[1] += b_out
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{moved[0] / elapsed / 1e6:.1f} MB/s in", refresh=False)
        bar.update(n)

    def on_done(job: ShardJob, entry: dict):
        entries[job.split][job.name] = entry
        reports[job.split].written += entry["samples"]
        dest.write_manifest(manifest(False))
        dest.publish(job.name, entry)  # a bucket: upload it (a rerun uploads one left staged)

    try:
        _write_all(todo, dest.folder, strict, workers, on_progress, on_done)
    except OSError as e:
        if e.errno not in objstore.LOCAL_WRITE_ERRNOS:
            raise
        raise ConvertError(f"{dest.flag}: {objstore.local_write_error(e, dest.folder)}; the shards finished "
                           f"so far are kept: free space and rerun the same command to resume") from None
    finally:
        bar.close()
    final = manifest(True)
    dest.write_manifest(final)  # last: a bucket's readers see the dataset only now

    for split in splits:
        rep = reports[split]
        done = entries[split].values()
        rep.samples = sum(e["samples"] for e in done)
        rep.bytes_in = sum(e.get("bytes_in", 0) for e in done)
        rep.bytes_out = sum(e["bytes"] for e in done)
        rep.rejects = unplanned_rejects.get(split, []) + [r for e in done for r in e["rejects"]]
    return final, reports


# A manifest's own top-level keys; any other was added by a converter (`extra`).
MANIFEST_KEYS = {"format", "version", "complete", "tool", "options", "classes", "splits", "rejects"}
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def kept_splits(previous: dict | None, splits: dict, classes: list[str], dest) -> dict[str, dict]:
    """The splits of an earlier conversion into the same place that this run does not convert
    (`--splits val` after `--splits train`), as their manifest entries, where every shard is intact
    and the classes are the same; the others are left out of the manifest, with a warning."""
    kept = {}
    for split, info in (previous or {}).get("splits", {}).items():
        if split in splits:
            continue
        if previous.get("classes") != classes:
            why = "it was converted with other classes"
        elif not all(dest.intact(e) for e in info["shards"]):
            why = "some of its shards are missing or altered"
        else:
            kept[split] = {k: v for k, v in info.items() if k != "samples"}
            continue
        print(f"warning: split {split!r} of the earlier conversion in {dest.name} is left out of the manifest: "
              f"{why}; convert it again with --splits {split}", file=sys.stderr)
    return kept


def split_by_shard(n_shards: int, workers: int) -> bool:
    """Whether whole shards are the unit of parallel work (else chunks of images).

    With plenty of shards, each worker writes whole shards itself: no image bytes cross a
    process boundary and this process does no per-image work, which matters for passthrough
    (cheap per image) on many cores. With few shards (a resized dataset often fits in one),
    workers encode chunks of images and this process writes them in plan order. Both write
    the same bytes.
    """
    return workers > 1 and n_shards >= SHARDS_PER_WORKER * workers


def _write_all(todo: list[ShardJob], out: Path, strict: bool, workers: int, on_progress, on_done) -> None:
    """Write every shard of `todo` with `workers` processes; the output cannot depend on the
    worker count or on which worker finishes first."""
    if split_by_shard(len(todo), workers):
        return _run_shard_pool(todo, out, strict, workers, on_progress, on_done)
    n_chunks = sum(math.ceil(len(j.items) / CHUNK) for j in todo)
    pool = None
    if workers > 1 and n_chunks > 1:
        pool = ProcessPoolExecutor(min(workers, n_chunks), mp_context=_mp_context())
    try:
        results = _encoded_chunks(todo, pool, AHEAD * workers)
        for job in todo:
            on_done(job, _write_shard(job, out, strict, results, on_progress))
    finally:
        if pool is not None:
            # On error or Ctrl-C: drop the queued chunks; the shard being written removed its
            # partial files on the way out.
            pool.shutdown(wait=True, cancel_futures=True)


def _mp_context():
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _run_shard_pool(todo, out, strict, workers, on_progress, on_done) -> None:
    ctx = _mp_context()
    q = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_shard_worker, initargs=(q,))
    try:
        futures = {pool.submit(write_whole_shard, job, out, strict): job for job in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, on_progress)
            for f in done:
                on_done(futures[f], f.result())  # re-raises a worker's ConvertError here
    finally:
        # On error or Ctrl-C: drop queued shards; those in flight clean up their partial files.
        pool.shutdown(wait=True, cancel_futures=True)
        _drain(q, on_progress)


def _drain(q, on_progress) -> None:
    while True:
        try:
            on_progress(*q.get_nowait())
        except queue.Empty:
            return


def _encoded_chunks(todo: list[ShardJob], pool, depth: int):
    """Yield (job, items, encode_chunk results) for every chunk in plan order, with up to
    `depth` chunks submitted ahead of the one being written."""
    specs = ((job, items) for job in todo for items in _job_chunks(job))
    ahead: deque = deque()

    def submit() -> None:
        while pool is not None and len(ahead) < depth:
            spec = next(specs, None)
            if spec is None:
                return
            ahead.append((*spec, pool.submit(encode_chunk, spec[0].encoder, spec[0].options, spec[1])))

    if pool is None:
        for job, items in specs:
            yield job, items, encode_chunk(job.encoder, job.options, items)
        return
    submit()
    while ahead:
        job, items, future = ahead.popleft()
        submit()
        yield job, items, future.result()


def _job_chunks(job: ShardJob) -> Iterator[list[Item]]:
    """The job's items in chunks of CHUNK, their sources read by the job's source reader if it has one."""
    items = iter(job.items if job.read_sources is None else job.read_sources(job.items))
    while chunk := list(itertools.islice(items, CHUNK)):
        yield chunk


def _write_shard(job: ShardJob, out: Path, strict: bool, results, on_progress) -> dict:
    """Write one shard and its index from its chunks; return its manifest entry (with rejects
    and byte counts). Leaving through an exception discards the partial files."""
    rejects, bytes_in = [], 0
    with ShardWriter(out / job.name) as writer:
        for _ in range(math.ceil(len(job.items) / CHUNK)):
            chunk_job, items, encoded = next(results)
            assert chunk_job is job, "chunks arrive in plan order"
            n_out = 0
            for item, (sample, nbytes_in, reason) in zip(items, encoded):
                if reason is not None:
                    if strict:
                        raise ConvertError(f"{item.path}: {reason} (--strict)")
                    rejects.append({"path": item.path, "reason": reason})
                    continue
                writer.write_sample(item.key, sample)
                bytes_in += nbytes_in
                n_out += len(sample.image)
            on_progress(len(items), sum(e[1] for e in encoded), n_out)
        size, digest = writer.close()
    return {**shard_entry(job.name, writer.samples, size, digest, job.plan, writer.labels),
            "bytes_in": bytes_in, "rejects": rejects}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="convert", disable=not enabled, file=sys.stderr,
                smoothing=0.1, dynamic_ncols=True)


def format_summary(reports: dict[str, SplitReport], seconds: float) -> str:
    """The end-of-run table, plus every reject by name."""
    rows = [("split", "samples", "shards", "kept", "rejects", "ignored", "MB in", "MB out")]
    for split, r in reports.items():
        rows.append((split, str(r.samples), str(r.shards), str(r.kept_shards), str(len(r.rejects)),
                     str(r.ignored), f"{r.bytes_in / 1e6:.1f}", f"{r.bytes_out / 1e6:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    new = sum(r.written for r in reports.values())
    rate = f", {new / seconds:.0f} img/s" if seconds > 0 else ""
    lines.append(f"time {seconds:.1f} s, {new} samples written{rate}")
    rejects = [rj for r in reports.values() for rj in r.rejects]
    if rejects:
        lines.append(f"rejected {len(rejects)} file(s):")
        lines += [f"  {rj['path']}: {rj['reason']}" for rj in rejects[:50]]
        if len(rejects) > 50:
            lines.append(f"  ... and {len(rejects) - 50} more (see manifest.json)")
    return "\n".join(lines)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
