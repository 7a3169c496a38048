"""Loader counters: one meaning per field, in every backend."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

log = logging.getLogger("pipeline")


@dataclass
class LoaderStats:
    """Counters since the loader was built.

    Times are host seconds. `wait_s` and `copy_s` are spent in the consumer's thread, so they add
    up to what the loader costs the training loop; `read_s` and `decode_s` are summed over the
    loader's own workers or threads, so they can exceed the wall time.
    """

    samples: int = 0         # samples delivered (corrupt ones replaced, so every batch is full)
    batches: int = 0         # batches delivered
    corrupt: int = 0         # samples that failed to decode and were replaced (each time)
    corrupt_keys: list[str] = field(default_factory=list)  # "shard.tar:KEY" of each, once
    wait_s: float = 0.0      # the consumer blocked in next(), waiting for a batch
    read_s: float = 0.0      # workers: sample bytes, headers and augmentation parameters
    decode_s: float | None = 0.0  # workers: decode and augment until the batch's pixels are done
                                  # (device decoders: until the device work is issued); None
                                  # where the backend cannot see it (dali decodes in its executor)
    copy_s: float = 0.0      # the consumer handing a finished batch over (copy, normalize)
    device_bytes: int = 0    # device memory the loader holds for its own buffers (peak)

    def add_batch(self, n: int, wait_s: float, read_s: float, decode_s: float | None,
                  corrupt: list[tuple[int, str, str]]) -> None:
        """Count one delivered batch of `n` samples and its timings."""
        self.samples += n
        self.batches += 1
        self.wait_s += wait_s
        self.read_s += read_s
        if decode_s is not None:
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
