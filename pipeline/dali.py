"""The `dali` backend: NVIDIA DALI's webdataset reader, decoder, resize and normalize, behind the
same Loader contract (len, set_epoch, state_dict, stats).

- `fn.readers.webdataset` reads the shards with the converter's DALI index files; its
  shard_id/num_shards come from the rank; `pad_last_batch` makes every rank run the same number
  of batches; `missing_component_behavior="error"` refuses samples without an image or label.
- Train: `fn.decoders.image_random_crop` (device "mixed", hw_decoder_load 0.65, the seed's
  crop ranges), `fn.resize`, `fn.crop_mirror_normalize` with a random mirror, HWC output read as
  channels_last NCHW. Val: resize the shorter side, then centre-crop; the iterator's PARTIAL
  last-batch policy drops DALI's padding, so every val sample is seen exactly once.
- `state_dict()` is DALI's own checkpoint of the pipeline.

With device="cpu" the same pipeline definition runs on DALI's CPU operators with
`device_id=None` (DALI's CPU-only mode); that is what CI tests. DALI draws its augmentation
from its own generator, so its batches are not bitwise identical to the CPU backend's, and a
sample DALI cannot decode stops the pipeline (the converter's validation keeps those out).
"""
from __future__ import annotations

import time

import torch

from .loader import LoaderConfig
from .source import SampleTable
from .stats import LoaderStats

_PACKAGE = "nvidia-dali-cuda130"


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError:
        raise ImportError(f"backend 'dali' needs NVIDIA DALI: pip install {_PACKAGE} "
                          f"(or pip install -e '.[dali]')") from None
    return fn, types, DALIGenericIterator, LastBatchPolicy


def _ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 ASCII digits padded with zeros -> (B,) int64."""
    digits = raw.long() - 48
    valid = (digits >= 0) & (digits <= 9)
    n = valid.sum(1, keepdim=True)
    pos = torch.arange(raw.shape[1], device=raw.device).unsqueeze(0)
    weights = torch.where(valid, 10 ** (n - 1 - pos).clamp(min=0), torch.zeros_like(digits))
    return (digits.clamp(min=0) * weights).sum(1)


class DaliLoader:
    def __init__(self, table: SampleTable, cfg: LoaderConfig):
        if table.remote:
            raise ValueError("backend 'dali' reads local shards (DALI's reader takes file paths)")
        self.fn, self.types, self._Iterator, self._Policy = _import_dali()
        self.table, self.cfg = table, cfg
        self.device = torch.device(cfg.device)
        self.epoch = 0
        self.stats = LoaderStats()
        self._checkpoint = None
        self._iterator = None
        n, w, r = len(table), cfg.world_size, cfg.rank
        # DALI's reader gives shard r the samples [floor(n r / w), floor(n (r + 1) / w)).
        self._shard_sizes = [(n * (k + 1)) // w - (n * k) // w for k in range(w)]
        if cfg.train:
            self._len = min(self._shard_sizes) // cfg.batch_size  # equal on every rank
        else:
            self._len = -(-max(self._shard_sizes) // cfg.batch_size)  # padded to equal, padding dropped
        self.num_samples = self._len * cfg.batch_size if cfg.train else self._shard_sizes[r]
        if self._len == 0:
            raise ValueError(f"split {cfg.split!r}: {n} samples give no batch of {cfg.batch_size} on each rank")
        self._position = 0

    def _build(self):
        fn, types, cfg = self.fn, self.types, self.cfg
        from nvidia.dali import Pipeline

        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                        device_id=(self.device.index or 0) if gpu else None, seed=cfg.seed + 1000 * cfg.rank,
                        prefetch_queue_depth=max(2, cfg.prefetch), enable_checkpointing=True,
                        checkpoint=self._checkpoint)
        decode_device = "mixed" if gpu else "cpu"
        op_device = "gpu" if gpu else "cpu"
        mean = [m * 255 for m in cfg.mean] if cfg.normalize else [0.0, 0.0, 0.0]
        std = [s * 255 for s in cfg.std] if cfg.normalize else [1.0, 1.0, 1.0]
        out_type = types.FLOAT if cfg.normalize else types.UINT8
        if cfg.normalize and cfg.dtype == torch.float16:
            out_type = types.FLOAT16
        with pipe:
            jpegs, cls = fn.readers.webdataset(
                paths=self.table.urls, index_paths=[u[:-4] + ".idx" for u in self.table.urls], ext=["jpg", "cls"],
                missing_component_behavior="error", shard_id=cfg.rank, num_shards=cfg.world_size,
                pad_last_batch=True, random_shuffle=cfg.train, initial_fill=min(4096, len(self.table)),
                stick_to_shard=not cfg.train, name="reader")
            extra = {"hw_decoder_load": 0.65} if gpu else {}
            if cfg.train:
                images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                       random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                       num_attempts=10, **extra)
                images = fn.resize(images, device=op_device, resize_x=cfg.image_size, resize_y=cfg.image_size,
                                   antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
                crop = None
            else:
                images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **extra)
                size = cfg.val_resize or int(round(cfg.image_size * 256 / 224))
                images = fn.resize(images, device=op_device, resize_shorter=size, antialias=True)
                mirror = 0
                crop = (cfg.image_size, cfg.image_size)
            images = fn.crop_mirror_normalize(images, device=op_device, dtype=out_type, output_layout="HWC",
                                              crop=crop, mean=mean, std=std, mirror=mirror)
            labels = fn.pad(cls, axes=[0], fill_value=0)
            pipe.set_outputs(images, labels)
        policy = self._Policy.DROP if cfg.train else self._Policy.PARTIAL
        return self._Iterator(pipe, ["images", "labels"], reader_name="reader", last_batch_policy=policy,
                              auto_reset=True)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # DALI advances its own shuffle per epoch; recorded for the state

    def state_dict(self) -> dict:
        cps = self._iterator.checkpoints() if self._iterator is not None else [self._checkpoint]
        return {"version": 1, "backend": "dali", "epoch": self.epoch, "batch": self._position,
                "dali_checkpoint": cps[0]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("backend") != "dali":
            raise ValueError("this loader state was not written by the dali backend")
        self.epoch, self._position = int(sd["epoch"]), int(sd["batch"])
        self._checkpoint = sd["dali_checkpoint"]
        self._iterator = None  # rebuilt from the checkpoint on the next iteration

    def __iter__(self):
        if self._iterator is None:
            self._iterator = self._build()
        start = self._position if self._checkpoint is not None else 0
        self._checkpoint = None
        dtype = self.cfg.dtype if self.cfg.normalize else torch.uint8
        for i in range(start, self._len):
            t0 = time.perf_counter()
            try:
                out = next(self._iterator)[0]
            except StopIteration:
                break
            x = out["images"].permute(0, 3, 1, 2)  # HWC batch = NCHW in channels_last memory
            if x.dtype != dtype:
                x = x.to(dtype)
            if not self.cfg.channels_last:
                x = x.contiguous()
            y = _ascii_labels(out["labels"]).to(x.device)
            self.stats.wait_s += time.perf_counter() - t0
            self.stats.samples += len(y)
            self.stats.batches += 1
            self._position = i + 1
            yield x, y
        if self.cfg.train:
            # Finish DALI's epoch (its padded tail) so the next one starts on an epoch boundary.
            for _ in self._iterator:
                pass
        self._position = self._len

    def close(self) -> None:
        self._iterator = None
