"""Loader counters, the same for every backend."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

log = logging.getLogger("pipeline")


@dataclass
class LoaderStats:
    samples: int = 0
    batches: int = 0
    corrupt: int = 0
    corrupt_keys: list[str] = field(default_factory=list)
    wait_s: float = 0.0      # main process blocked waiting for a batch
    decode_s: float = 0.0    # summed over workers
    read_s: float = 0.0      # summed over workers: bytes, headers, crop parameters
    copy_s: float = 0.0      # host-to-device copy and normalization, as seen by the host
    device_bytes: int = 0    # device memory the loader holds for its own buffers

    def add_batch(self, n: int, wait_s: float, read_s: float, decode_s: float,
                  corrupt: list[tuple[int, str, str]]) -> None:
        """Count one delivered batch of `n` samples and its timings."""
        self.samples += n
        self.batches += 1
        self.wait_s += wait_s
        self.read_s += read_s
        self.decode_s += decode_s
        self.record_corrupt(corrupt)

    def record_corrupt(self, corrupt: list[tuple[int, str, str]]) -> None:
        for _, key, reason in corrupt:
            self.corrupt += 1
            if key not in self.corrupt_keys:
                # Logged once per key: a bad sample recurs every epoch.
                self.corrupt_keys.append(key)
                log.warning("corrupt sample %s replaced (%s)", key, reason.splitlines()[0])

    def as_dict(self) -> dict:
        return asdict(self)
