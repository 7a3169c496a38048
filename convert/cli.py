"""What the converters' command lines share: the output and image options, their checks, and how a
run ends (the summary; a one-line error and its exit status; the resume hint on Ctrl-C)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pipeline.shard_format import RESTART_INTERVAL_MCUS

from .destination import OUT_HELP, STAGING_HELP, ConvertError, out_arg


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=out_arg, help=OUT_HELP)
    p.add_argument("--staging", type=Path, help=STAGING_HELP)


def add_image_options(p: argparse.ArgumentParser) -> None:
    """The options of converters that validate, repair and may re-encode images."""
    p.add_argument("--shard-size-mb", type=float, default=256, help="target shard size in MB (default 256)")
    p.add_argument("--max-side", type=positive_int, help="downscale so the longer side is at most N px, re-encode")
    p.add_argument("--quality", type=positive_int, default=90,
                   help="JPEG quality of re-encoded images (default 90; repairs use at least 95)")
    p.add_argument("--seed", type=int, default=49, help="train shuffle seed (default 49)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-restart-index", action="store_true",
                   help="store full-size JPEGs byte for byte, without restart markers (slower crops)")
    p.add_argument("--strict", action="store_true", help="fail on the first rejected image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_image_options(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.quality > 100:
        parser.error("--quality must be at most 100")
    if a.shard_size_mb <= 0:
        parser.error("--shard-size-mb must be positive")


def restart_interval(a: argparse.Namespace) -> int | None:
    return None if a.no_restart_index else RESTART_INTERVAL_MCUS


def finish(run: Callable[[], tuple[dict, str]]) -> int:
    """Run a conversion and print its summary; the exit status: 0, 1 for a --strict reject, 2 for
    another error the user must fix, 130 when interrupted (finished shards are kept)."""
    try:
        _, summary = run()
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "(--strict)" in str(e) else 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary)
    return 0
