"""Compiled kernels behind one switch.

Every kernel here has a plain reference implementation (Pillow / numpy / torch) and a test that
compares the two. `RESNET_SHARDS_COMPILE=0` turns compilation off: the same pipeline then runs
on the references, which is the way to debug it or to run where numba is missing.
"""
from __future__ import annotations

import os


def compiled_enabled() -> bool:
    """Whether kernels use their compiled versions (read per call, so tests can flip it)."""
    return os.environ.get("RESNET_SHARDS_COMPILE", "1") != "0"
