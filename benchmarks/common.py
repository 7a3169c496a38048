"""Shared benchmark plumbing: a cached ImageNet-like dataset, timing, tables and JSON output."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from .machine import describe, header

DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE", Path(__file__).resolve().parent / "out" / "cache"))


CONTENTS = ("photos", "synthetic")


def imagenet_like(classes: int = 20, per_class: int = 50, size: int = 500, cache: Path = DEFAULT_CACHE,
                  content: str = "photos") -> Path:
    """A cached ImageFolder of ImageNet-like JPEGs (about 500 x 430 px).

    content="photos" (the default) cuts them from real photographs with camera noise and
    ImageNet's mix of JPEG settings (`benchmarks.photos`; needs scikit-image); "synthetic"
    renders flat shapes (`convert.synthetic`), which decode faster than photos and so flatter
    every loader figure. `size` applies to the synthetic renders only.
    """
    if content == "photos":
        from .photos import PhotoConfig, generate as generate_photos

        cfg = PhotoConfig(classes=classes, per_class=per_class, val_per_class=max(1, per_class // 10))
        return generate_photos(cache / f"photos_{classes}x{per_class}_s{cfg.seed}", cfg)
    if content != "synthetic":
        raise ValueError(f"content must be one of {CONTENTS}, not {content!r}")
    from convert.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(classes=classes, per_class=per_class, val_per_class=max(1, per_class // 10), size=size)
    return generate(cache / f"imagenet_like_{classes}x{per_class}_{size}", cfg, progress=False)


def timed(fn: Callable[[], int], repeats: int = 3, warmup: int = 1,
          clock: Callable[[], float] = time.perf_counter) -> dict:
    """Run fn (returning an item count) warmup+repeats times; report the median rate (by `clock`:
    time.thread_time for the CPU time of single-threaded work, which a busy machine hardly moves).

    cpu_rate is items per second of this process's CPU time (all its threads, not its child
    processes): on a machine shared with other jobs, the figure that does not move with their load.
    """
    return timed_in_turns({"fn": fn}, repeats, warmup, clock=clock)["fn"]


def timed_in_turns(fns: dict[str, Callable[[], int]], repeats: int = 3, warmup: int = 1,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """timed() of each fn, run in turns (one run of each per round), so that a shared machine's
    changing load hits them all alike and the ratios between them hold. Rates are by `clock`."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    items: dict[str, int] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = clock(), time.process_time()
            items[k] = fn()
            dt = clock() - t
            cpu[k].append(time.process_time() - c)
            seconds[k].append(dt)
            rates[k].append(items[k] / dt)
    out = {}
    for k in fns:
        cpu_s = statistics.median(cpu[k])
        out[k] = {"median": statistics.median(rates[k]), "min": min(rates[k]), "max": max(rates[k]),
                  "seconds": statistics.median(seconds[k]), "cpu_rate": items[k] / cpu_s if cpu_s > 0 else None,
                  "items": items[k], "repeats": repeats}
    return out


def interleaved(fns: dict, n: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median items/s of each fn (n items a call), measured in turns (`timed_in_turns`). `clock`:
    time.thread_time counts only the CPU time this thread got, which leaves out the time it waited
    for a core (for single-threaded work)."""
    def counted(fn):
        return lambda: (fn(), n)[1]
    timed = timed_in_turns({k: counted(fn) for k, fn in fns.items()}, repeats, clock=clock)
    return {k: r["median"] for k, r in timed.items()}


def epoch_rate(make_iter, repeats: int) -> dict:
    """Median images/s over full passes of an iterable of (images, labels) batches."""
    def once():
        n = 0
        for _, y in make_iter():
            n += len(y)
        return n
    return timed(once, repeats=repeats, warmup=1)


def print_machine(device: str | None = None, environ: dict | None = None) -> dict:
    """Describe this machine (`benchmarks.machine.describe`) and print its header line: the first
    thing every benchmark prints. Pass the result to write_json, so the JSON names the same machine.
    `environ`: the environment the measured processes run under, where it sets caps of its own."""
    info = describe(device, environ=environ)
    print(header(info), flush=True)
    return info


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as an aligned text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def write_json(name: str, payload: dict, out_dir: Path | None = None, machine: dict | None = None) -> Path:
    """Write payload to OUT/name.json (atomically) under the machine (`print_machine`'s, else
    described now) and the time; OUT is $BENCH_OUT or benchmarks/out."""
    from pipeline.shard_format import atomic_write_bytes

    out_dir = out_dir or Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {"machine": machine or describe(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return path
