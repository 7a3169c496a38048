"""Shards in object storage: throughput and the request budget, with and without the node-local shard
cache, against the loopback S3 server (moto) behind a proxy that adds a fixed latency to every
request; then a model of ImageNet-1k on a cluster from the measured counts.

    python -m benchmarks.objstore [--latencies-ms 0 10 30 100 --classes 10 --per-class 60 --repeats 3]

Each latency runs, in turns (one epoch of each per round, so a shared machine's load moves them all
alike), the same cpu-backend loader on:

- local:          the local copy of the shards (the reference of every ratio);
- ranged:         the bucket, by range requests, each worker fetching only the batch it decodes;
- ranged+ahead:   the bucket, by range requests, each worker fetching --fetch-ahead more batches while
                  it decodes (latency hiding, the default);
- cache e1:       a fresh --cache-dir, epoch 1: the cache fills in plan order while samples of shards
                  not yet in are read by range (--cache-fill ranged), or waited for (cache e1 wait);
- cache e2+:      a cache filled by an earlier epoch.

Then, at one latency, a cache limit below the dataset (--small-cache, a fraction of it): the full
permutation (the cache fills once and holds; the rest is read by range) against the block shuffle
(--block-shuffle, windows of shards, two of which fit the limit), with what the block shuffle costs
in randomness.

For each it reports img/s, the ratio to local, and the GET requests and bytes that epoch cost (one
node: this process and its workers). The model extrapolates those per-sample and per-shard counts
to ImageNet-1k (1,281,167 images, ~140 GB, 256 MB shards) on N nodes x 8 GPUs at --gpu-rate img/s
each: GET/s against S3's 5,500 GET/s per prefix partition, egress per epoch and request cost.

The S3 server runs on the same machine as the loader (a Python process on the same cores), so the
no-cache runs also pay the server's CPU time, which a real store does not charge to the node; the
table says how many CPU seconds the server spent in each run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import imagenet_like, print_machine, table, write_json

ROOT = Path(__file__).resolve().parent.parent

IMAGENET_IMAGES = 1_281_167
IMAGENET_BYTES = 140e9  # the train split as full-size JPEG shards, about 110 KB an image
IMAGENET_SHARD_BYTES = 256e6  # the converter's default shard size
PREFIX_GETS_PER_S = 5_500  # S3's GET rate per prefix partition
DOLLARS_PER_1000_GETS = 0.0004
GPUS_PER_NODE = 8
RUNS = ("local", "cache e2+", "ranged", "ranged+ahead", "cache e1", "cache e1 wait")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.objstore", description=__doc__.split("\n")[0])
    p.add_argument("--latencies-ms", type=float, nargs="+", default=[0, 10, 30, 100])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--shard-mb", type=float, default=2.0, help="shard size of the converted set (MB)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fetch-ahead", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-rate", type=float, default=3000, help="img/s per GPU of the modelled cluster")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--node-gbit", type=float, default=100,
                   help="a node's download bandwidth (Gbit/s): it bounds the first epoch with the cache")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--small-cache", type=float, default=0.25,
                   help="a cache limit, as a fraction of the dataset, for the full permutation against the block "
                        "shuffle (0: skip)")
    p.add_argument("--small-cache-latency-ms", type=float, default=30)
    p.add_argument("--small-cache-fill", choices=("ranged", "wait"), default="wait",
                   help="--cache-fill of the small-cache runs")
    a = p.parse_args(argv)
    if min(a.latencies_ms) < 0:
        p.error("--latencies-ms must be >= 0")
    if a.repeats < 1 or a.batch_size < 1 or a.workers < 1 or a.per_class < 1 or a.classes < 1:
        p.error("--repeats, --batch-size, --workers, --classes and --per-class must be >= 1")
    if a.shard_mb <= 0 or a.gpu_rate <= 0 or min(a.nodes) < 1:
        p.error("--shard-mb, --gpu-rate and --nodes must be positive")
    if not 0 <= a.small_cache < 1:
        p.error("--small-cache must be in [0, 1) (a fraction of the dataset; 0 skips it)")
    return a


def shards_of(a) -> Path:
    """The real-photo set (benchmarks.photos), converted once into shards of --shard-mb."""
    from convert.imagenet_to_shards import convert

    src = imagenet_like(a.classes, a.per_class)
    out = src.parent / f"{src.name}_shards_{a.shard_mb:g}mb"
    if not (out / "manifest.json").exists():
        convert(src, out, splits=["train"], shard_size_mb=a.shard_mb, progress=False)
    return out


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_counts(requests, prefix: str, sizes: dict[str, int]) -> tuple[int, int, int]:
    """(ranged GETs, whole-object GETs, bytes asked for) of shards under `prefix` among `requests`."""
    ranged = whole = nbytes = 0
    for r in requests:
        if r.method != "GET" or not r.key.startswith(prefix) or not r.key.endswith(".tar"):
            continue
        span = r.headers.get("range")
        if span:
            first, _, last = span.split("=", 1)[1].partition("-")
            ranged += 1
            nbytes += int(last) - int(first) + 1
        else:
            whole += 1
            nbytes += sizes[r.key.rsplit("/", 1)[1]]
    return ranged, whole, nbytes


class Runs:
    """The loaders of one benchmark, by run name, and what each epoch of them cost."""

    def __init__(self, a, local: Path, bucket: str, scratch: Path):
        from pipeline import create_loader

        self.a, self.local, self.bucket, self.scratch = a, local, bucket, scratch
        self.kw = dict(batch_size=a.batch_size, image_size=a.image_size, device="cpu", workers=a.workers, seed=5,
                       normalize=False)
        self.create = create_loader
        self.persistent = {
            "local": create_loader(str(local), **self.kw),
            "ranged": create_loader(bucket, fetch_ahead=0, **self.kw),
            "ranged+ahead": create_loader(bucket, fetch_ahead=a.fetch_ahead, **self.kw),
        }
        if "cache e2+" in a.runs:
            warm = create_loader(bucket, cache_dir=str(scratch / "warm"), fetch_ahead=a.fetch_ahead, **self.kw)
            for _ in warm:  # epoch 0 fills the cache
                pass
            warm.table.cache._filler.wait()
            self.persistent["cache e2+"] = warm
        for loader in self.persistent.values():  # a warm-up epoch: workers started, their S3 clients made
            for _ in loader:
                pass
        self.fresh = 0

    def loader(self, run: str):
        if run in self.persistent:
            return self.persistent[run]
        self.fresh += 1
        folder = self.scratch / f"fresh{self.fresh}"
        loader = self.create(self.bucket, cache_dir=str(folder), fetch_ahead=self.a.fetch_ahead,
                             cache_fill="wait" if run.endswith("wait") else "ranged", **self.kw)
        loader._ensure_pool()
        return loader

    def epoch(self, run: str, epoch: int) -> tuple[int, float, object]:
        """(samples, seconds) of one epoch of `run`, and its loader."""
        loader = self.loader(run)
        loader.set_epoch(epoch)
        n = 0
        t = time.perf_counter()
        for _, y in loader:
            n += len(y)
        return n, time.perf_counter() - t, loader

    def done(self, run: str, loader) -> None:
        """After the timed epoch: the cache filler's last downloads, then a fresh loader's end."""
        cache = loader.table.cache
        if cache is not None and cache._filler is not None:
            cache._filler.wait()
        if run not in self.persistent:
            loader.close()
            shutil.rmtree(cache.root, ignore_errors=True)

    def close(self) -> None:
        for loader in self.persistent.values():
            loader.close()


def measure(a, runs: Runs, proxy, server_pid: int, prefix: str, sizes: dict[str, int]) -> list[dict]:
    rows = []
    epoch = 1
    for latency_ms in a.latencies_ms:
        proxy.latency_s = latency_ms / 1000
        got: dict[str, dict[str, list]] = {r: {"rate": [], "ranged": [], "whole": [], "bytes": [], "server_s": []}
                                           for r in a.runs}
        for _ in range(a.repeats):
            for run in a.runs:
                before, cpu0 = len(proxy.requests), server_cpu_s(server_pid)
                n, dt, loader = runs.epoch(run, epoch)
                runs.done(run, loader)
                ranged, whole, nbytes = request_counts(proxy.requests[before:], prefix, sizes)
                g = got[run]
                g["rate"].append(n / dt)
                g["ranged"].append(ranged)
                g["whole"].append(whole)
                g["bytes"].append(nbytes)
                g["server_s"].append(server_cpu_s(server_pid) - cpu0)
                g["samples"] = n
            epoch += 1
        local = statistics.median(got["local"]["rate"]) if "local" in got else None
        for run, g in got.items():
            rate = statistics.median(g["rate"])
            rows.append({"latency_ms": latency_ms, "run": run, "img_s": rate,
                         "of_local": rate / local if local else None,
                         "ranged_gets": statistics.median(g["ranged"]), "whole_gets": statistics.median(g["whole"]),
                         "gets": statistics.median([r + w for r, w in zip(g["ranged"], g["whole"])]),
                         "mb": statistics.median(g["bytes"]) / 1e6, "server_cpu_s": statistics.median(g["server_s"]),
                         "samples": g["samples"], "rates": g["rate"]})
            print(f"  {latency_ms:5.0f} ms  {run:<14} {rate:7.1f} img/s"
                  + (f"  {rate / local:5.2f}x local" if local else "")
                  + f"  GETs {rows[-1]['gets']:.0f} ({rows[-1]['whole_gets']:.0f} whole)  {rows[-1]['mb']:.1f} MB",
                  flush=True)
    return rows


def order_stats(shard_sizes, order, batch_size: int) -> dict:
    """How random an epoch's order is, by the shards its samples come from: distinct shards per batch,
    the chance that two consecutive samples share a shard, and the mean distance between consecutive
    samples' shards (in shard index; the shards are in random order on disk, so this measures spread)."""
    import numpy as np

    shard = np.repeat(np.arange(len(shard_sizes)), shard_sizes)[order]
    n = len(shard) // batch_size * batch_size
    per_batch = [len(np.unique(b)) for b in shard[:n].reshape(-1, batch_size)]
    step = np.abs(np.diff(shard))
    return {"shards_per_batch": float(np.mean(per_batch)), "same_shard": float(np.mean(step == 0)),
            "shard_distance": float(np.mean(step))}


def randomness(shard_sizes, window: int, batch_size: int, seed: int = 5) -> list[dict]:
    """order_stats of the full permutation and of the block shuffle, epoch 1."""
    from pipeline import plan

    n = sum(shard_sizes)
    return [{"order": "full permutation", **order_stats(shard_sizes, plan.epoch_permutation(n, seed, 1), batch_size)},
            {"order": f"block shuffle, {window} shard(s)", **order_stats(
                shard_sizes, plan.block_permutation(shard_sizes, seed, 1, window), batch_size)}]


def small_cache(a, runs: "Runs", proxy, prefix: str, sizes: dict[str, int], shard_sizes: list[int]) -> dict:
    """A cache limit below the dataset: the full permutation against the block shuffle (windows of
    shards, two of which fit the limit), epochs after a first one that filled the cache."""
    dataset = sum(sizes.values())
    limit = int(a.small_cache * dataset)
    window = max(1, int(limit / (dataset / len(sizes)) / 2))
    proxy.latency_s = a.small_cache_latency_ms / 1000
    loaders = {"local": runs.persistent["local"]}
    for name, block in (("small cache, full", 0), (f"small cache, block {window}", window)):
        loader = runs.create(runs.bucket, cache_dir=str(runs.scratch / f"small{block}"), cache_limit=limit,
                             cache_fill=a.small_cache_fill, fetch_ahead=a.fetch_ahead, block_shuffle=block, **runs.kw)
        for _ in loader:  # epoch 0 fills the cache
            pass
        loader.table.cache._filler.wait()
        loaders[name] = loader
    got = {k: {"rate": [], "ranged": [], "whole": [], "bytes": []} for k in loaders}
    epoch = 1000
    for _ in range(a.repeats):
        for name, loader in loaders.items():
            loader.set_epoch(epoch)
            before = len(proxy.requests)
            n, t = 0, time.perf_counter()
            for _, y in loader:
                n += len(y)
            dt = time.perf_counter() - t
            if loader.table.cache is not None:
                loader.table.cache._filler.wait()
            ranged, whole, nbytes = request_counts(proxy.requests[before:], prefix, sizes)
            for k, v in (("rate", n / dt), ("ranged", ranged), ("whole", whole), ("bytes", nbytes)):
                got[name][k].append(v)
        epoch += 1
    local = statistics.median(got["local"]["rate"])
    rows = []
    for name, g in got.items():
        rate = statistics.median(g["rate"])
        rows.append({"run": name, "img_s": rate, "of_local": rate / local,
                     "ranged_gets": statistics.median(g["ranged"]),
                     "whole_gets": statistics.median(g["whole"]), "mb": statistics.median(g["bytes"]) / 1e6,
                     "rates": g["rate"]})
    for name, loader in loaders.items():
        if name != "local":
            loader.close()
    return {"limit_bytes": limit, "window": window, "latency_ms": a.small_cache_latency_ms,
            "fill": a.small_cache_fill, "rows": rows,
            "randomness": randomness(shard_sizes, window, a.batch_size),
            "randomness_imagenet": randomness([IMAGENET_IMAGES // 547] * 547, 16, 256)}


def model(rows: list[dict], samples_per_epoch: int, dataset_bytes: int, shards: int, a) -> list[dict]:
    """ImageNet-1k on N nodes x 8 GPUs, from the per-sample (no cache) and per-shard (cache) counts
    measured at the largest latency."""
    worst = max(r["latency_ms"] for r in rows)
    by_run = {r["run"]: r for r in rows if r["latency_ms"] == worst}
    out = []
    for nodes in a.nodes:
        img_s = nodes * GPUS_PER_NODE * a.gpu_rate
        epoch_s = IMAGENET_IMAGES / img_s
        modes = []
        if "ranged+ahead" in by_run:
            r = by_run["ranged+ahead"]
            modes.append(("no cache", r["gets"] / r["samples"] * IMAGENET_IMAGES,
                          r["mb"] * 1e6 / dataset_bytes * IMAGENET_BYTES * r["samples"] / samples_per_epoch))
        if "cache e1 wait" in by_run:  # each node reads every shard whole once
            r = by_run["cache e1 wait"]
            per_shard = r["whole_gets"] / shards
            modes.append(("cache, epoch 1", nodes * per_shard * IMAGENET_BYTES / IMAGENET_SHARD_BYTES,
                          nodes * IMAGENET_BYTES))
        if "cache e2+" in by_run:
            r = by_run["cache e2+"]
            modes.append(("cache, epoch 2+", nodes * r["gets"] / shards * IMAGENET_BYTES / IMAGENET_SHARD_BYTES,
                          nodes * r["mb"] * 1e6 / dataset_bytes * IMAGENET_BYTES))
        for mode, gets, egress in modes:
            # A node cannot download faster than its link: the cache's first epoch may take longer.
            seconds = max(epoch_s, egress / nodes * 8 / (a.node_gbit * 1e9)) if mode == "cache, epoch 1" else epoch_s
            out.append({"nodes": nodes, "gpus": nodes * GPUS_PER_NODE, "mode": mode, "img_s": img_s,
                        "epoch_s": seconds, "gets": gets, "get_s": gets / seconds,
                        "of_prefix": gets / seconds / PREFIX_GETS_PER_S, "egress_tb": egress / 1e12,
                        "node_gbit_s": egress / nodes / seconds * 8 / 1e9,
                        "dollars": gets / 1000 * DOLLARS_PER_1000_GETS})
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    machine = print_machine()
    sys.path.insert(0, str(ROOT / "tests"))  # the loopback S3 server and its proxy (tests/s3_server.py)
    from s3_server import FaultProxy, MotoServer, server_environment

    from pipeline import objstore
    from pipeline.shard_format import load_manifest

    local = shards_of(a)
    manifest = load_manifest(local)
    entries = manifest["splits"]["train"]["shards"]
    sizes = {e["name"]: e["bytes"] for e in entries}
    dataset_bytes = sum(sizes.values())
    server = MotoServer()
    proxy = FaultProxy(("127.0.0.1", server.port))
    scratch = Path(tempfile.mkdtemp(prefix="objstore-bench-"))
    try:
        with server_environment(proxy.endpoint):
            bucket = "s3://bench/ds"
            objstore.filesystem(bucket).mkdir("bench")
            for p in sorted(local.iterdir()):
                if p.is_file():
                    objstore.put_file(p, f"{bucket}/{p.name}")
            print(f"{sum(e['samples'] for e in entries)} train images in {len(entries)} shards "
                  f"({dataset_bytes / 1e6:.1f} MB), batch {a.batch_size}, {a.image_size} px, {a.workers} workers, "
                  f"{a.repeats} epochs of each run per latency", flush=True)
            runs = Runs(a, local, bucket, scratch)
            try:
                rows = measure(a, runs, proxy, server.proc.pid, "bench/ds/", sizes)
                small = small_cache(a, runs, proxy, "bench/ds/", sizes, [e["samples"] for e in entries]) \
                    if a.small_cache > 0 else None
            finally:
                runs.close()
    finally:
        proxy.close()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(rows, [("latency_ms", "latency ms", ".0f"), ("run", "run", "s"), ("img_s", "img/s", ".1f"),
                       ("of_local", "of local", ".2f"), ("gets", "GETs/epoch", ".0f"),
                       ("whole_gets", "whole-shard GETs", ".0f"), ("mb", "MB/epoch", ".1f"),
                       ("server_cpu_s", "server CPU s", ".2f")]))
    samples = rows[0]["samples"]
    cluster = model(rows, samples, dataset_bytes, len(entries), a)
    print(f"\nImageNet-1k ({IMAGENET_IMAGES:,} images, {IMAGENET_BYTES / 1e9:.0f} GB in "
          f"{IMAGENET_BYTES / IMAGENET_SHARD_BYTES:.0f} shards) at {a.gpu_rate:.0f} img/s per GPU, "
          f"{GPUS_PER_NODE} GPUs a node; per-sample and per-shard counts from the {max(a.latencies_ms):.0f} ms runs; "
          f"the cache's first epoch at most {a.node_gbit:g} Gbit/s a node:")
    print(table(cluster, [("nodes", "nodes", "d"), ("gpus", "GPUs", "d"), ("mode", "mode", "s"),
                          ("epoch_s", "epoch s", ".1f"), ("gets", "GETs/epoch", ",.0f"), ("get_s", "GET/s", ",.0f"),
                          ("of_prefix", "x 5,500/s", ".2f"), ("egress_tb", "egress TB/epoch", ".2f"),
                          ("node_gbit_s", "Gbit/s a node", ".1f"), ("dollars", "GET $/epoch", ",.2f")]))
    if small is not None:
        print(f"\nA cache of {a.small_cache:.0%} of the dataset ({small['limit_bytes'] / 1e6:.1f} MB) at "
              f"{small['latency_ms']:.0f} ms, --cache-fill {small['fill']}, epochs after the first; the block "
              f"shuffle in windows of {small['window']} shard(s):")
        print(table(small["rows"], [("run", "run", "s"), ("img_s", "img/s", ".1f"), ("of_local", "of local", ".2f"),
                                    ("ranged_gets", "ranged GETs/epoch", ".0f"),
                                    ("whole_gets", "whole-shard GETs/epoch", ".0f"), ("mb", "MB/epoch", ".1f")]))
        columns = [("order", "order", "s"), ("shards_per_batch", "shards a batch", ".1f"),
                   ("same_shard", "P(next sample, same shard)", ".3f"),
                   ("shard_distance", "mean shard distance, consecutive samples", ".1f")]
        print(f"\nRandomness, this set (batch {a.batch_size}):")
        print(table(small["randomness"], columns))
        print("Randomness, ImageNet-1k in 547 shards (batch 256, one rank):")
        print(table(small["randomness_imagenet"], columns))
    path = write_json("objstore", {"args": vars(a), "rows": rows, "model": cluster, "dataset_bytes": dataset_bytes,
                                   "shards": len(entries), "small_cache": small}, machine=machine)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
