"""Shared benchmark plumbing: a cached ImageNet-like dataset, timing, tables and JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

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
    time.thread_time for the CPU time of single-threaded work, which a busy machine hardly moves)."""
    for _ in range(warmup):
        fn()
    rates, seconds = [], []
    for _ in range(repeats):
        t = clock()
        n = fn()
        dt = clock() - t
        seconds.append(dt)
        rates.append(n / dt)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "seconds": statistics.median(seconds), "items": n, "repeats": repeats}


def interleaved(fns: dict, n: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median items/s of each fn (n items a call), measured in turns so that a shared machine's
    load hits all alike. `clock`: time.thread_time counts only the CPU time this thread got,
    which leaves out the time it waited for a core (for single-threaded work)."""
    for fn in fns.values():
        fn()
    rates = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            rates[k].append(n / (clock() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def epoch_rate(make_iter, repeats: int) -> dict:
    """Median images/s over full passes of an iterable of (images, labels) batches."""
    def once():
        n = 0
        for _, y in make_iter():
            n += len(y)
        return n
    return timed(once, repeats=repeats, warmup=1)


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as an aligned text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parent / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload},
                               indent=1))
    return path
