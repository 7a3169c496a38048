"""The shard manifest: what a converter wrote, and what every reader trusts.

    {"format": "webdataset-shards", "version": 1, "complete": true,
     "tool": "convert.imagenet_to_shards", "options": {...},
     "classes": ["n01440764", ...],
     "splits": {"train": {"samples": N, "shards": [{"name", "index", "samples", "bytes",
                                                     "sha256", "plan"}, ...],
                          "rejects": [...], "ignored": {...}}},
     "rejects": [{"path", "reason"}, ...]}

`plan` fingerprints the ordered list of source samples and the options that shaped a shard; a
resumed conversion keeps a finished shard only when its plan, size and hash all match.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tarwriter import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "webdataset-shards"
VERSION = 1


class ManifestError(ValueError):
    pass


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def parse_manifest(text: str | bytes, origin: str = "manifest") -> dict:
    """Parse and check the structure of a manifest; raise ManifestError naming what is wrong."""
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{origin}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"{origin}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise ManifestError(f"{origin}: manifest version {m.get('version')!r}, this code reads {VERSION}")
    if not isinstance(m.get("classes"), list) or not isinstance(m.get("splits"), dict):
        raise ManifestError(f"{origin}: missing 'classes' or 'splits'")
    for split, info in m["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ManifestError(f"{origin}: split {split!r} has no shard list")
        for s in shards:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int):
                raise ManifestError(f"{origin}: split {split!r} has a malformed shard entry {s!r}")
    return m


def load_manifest(path: str | os.PathLike) -> dict:
    """Load DIR/manifest.json (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (convert the dataset first)") from None
    return parse_manifest(text, str(p))
