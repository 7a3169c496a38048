"""Host uint8 batch -> device tensors: the copy, normalization and layout, on the device.

The host slot a batch was copied from is reused for a later batch, so a copy that may still be
reading it must be waited for first: every path returns the event to wait on (None when the
copy has finished by the time the call returns).

- cuda: the copy and the normalization run on a side stream created once; the consumer's stream
  waits for it (no host sync), and the outputs are marked with `record_stream`.
- other accelerators (npu, xpu, ...): an asynchronous copy on the device's current stream and an
  event recorded after it, where the device module has events and streams; otherwise a blocking
  copy, which needs no event.
- cpu: normalization in place of the copy.
"""
from __future__ import annotations

import torch

from kernels.batch_resize import normalize_nhwc_fused
from kernels.normalize import affine_constants, normalize_nhwc

from .contract import LoaderConfig


def device_module(device: torch.device):
    """torch.cuda, torch.npu, torch.xpu, ... for a device, if it has streams and events."""
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "Event") and hasattr(mod, "current_stream"):
        return mod
    return None


class DeviceStage:
    def __init__(self, cfg: LoaderConfig):
        self.device = torch.device(cfg.device)
        self.cfg = cfg
        self.scale, self.shift = affine_constants(cfg.mean, cfg.std, self.device) if cfg.normalize else (None, None)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.module = device_module(self.device) if self.device.type not in ("cpu", "cuda") else None

    @property
    def pins_host_memory(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """Returns (images, labels, event): the host slot may be reused once `event` completed."""
        cfg = self.cfg
        dtype = cfg.dtype if cfg.normalize else torch.uint8
        if self.device.type == "cpu":
            x = normalize_nhwc(images, self.scale, self.shift, dtype, cfg.channels_last)
            if x.data_ptr() == images.data_ptr():
                # uint8 channels_last is the slot itself, viewed as NCHW: copy the slot as one
                # block (numpy's memcpy) and view it alike. torch's strided clone into
                # channels_last was 5.7x slower on a 64 x 224 px batch, and it runs in the
                # main process, which shares the cores with the workers.
                x = torch.from_numpy(images.numpy().copy()).permute(0, 3, 1, 2)
            return x, labels.clone(), None
        if self.stream is None:
            return self._generic(images, labels, dtype)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            if cfg.normalize and cfg.channels_last:
                out = normalize_nhwc_fused(x, self.scale, self.shift, dtype)  # one Triton pass
            else:
                out = normalize_nhwc(x, self.scale, self.shift, dtype, cfg.channels_last)
            event = torch.cuda.Event()
            event.record(self.stream)
        current.wait_stream(self.stream)
        # The tensors were made on the side stream but are used on the consumer's: tell the
        # caching allocator, or their memory could be reused while the model still reads it.
        out.record_stream(current)
        y.record_stream(current)
        return out, y, event

    def _generic(self, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
        cfg = self.cfg
        event = None
        if self.module is not None:
            x = images.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            event = self.module.Event()
            event.record(self.module.current_stream(self.device))
        else:  # no events to wait on: a blocking copy is the only safe one
            x = images.to(self.device)
            y = labels.to(self.device)
        return normalize_nhwc(x, self.scale, self.shift, dtype, cfg.channels_last), y, event
