"""Everything that differs between cuda, npu and cpu, in one place: device selection, the
collective backend, the autocast device type, the fused optimizer, and synchronize."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch


class DeviceError(RuntimeError):
    pass


@dataclass
class Device:
    kind: str  # "cuda" | "npu" | "cpu"
    index: int | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind if self.index is None else f"{self.kind}:{self.index}")

    @property
    def dist_backend(self) -> str:
        return {"cuda": "nccl", "npu": "hccl"}.get(self.kind, "gloo")

    def set_current(self) -> None:
        if self.kind == "cuda" and self.index is not None:
            torch.cuda.set_device(self.index)
        elif self.kind == "npu" and self.index is not None:
            torch.npu.set_device(self.index)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.kind == "npu":
            torch.npu.synchronize()

    def supports_bf16(self) -> bool:
        if self.kind == "cuda":
            return torch.cuda.is_bf16_supported()
        return True  # CPU and Ascend 910B+ compute in bf16

    def has_fast_bf16(self) -> bool:
        """Whether a bf16 step is worth taking here. On a CPU, oneDNN needs AVX-512 for its bf16
        kernels (and runs them fastest with AVX-512 bf16 or AMX); below that torch emulates bf16,
        and an O2 bf16 step ran 9x slower than fp32 (2-core EPYC under an AVX2 cap)."""
        if self.kind != "cpu":
            return self.supports_bf16()
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch without oneDNN, or without this probe
            return False

    def name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.torch_device)
        if self.kind == "npu":
            return f"Ascend NPU {self.index or 0}"
        return "CPU"

    def rng_state(self):
        if self.kind == "cuda":
            return torch.cuda.get_rng_state(self.torch_device)
        return None

    def set_rng_state(self, state) -> None:
        if self.kind == "cuda" and state is not None:
            torch.cuda.set_rng_state(state, self.torch_device)


def resolve_device(name: str, local_rank: int | None = None) -> Device:
    """'cuda'/'gpu', 'npu' or 'cpu' (optionally with ':N') -> Device; imports torch_npu only for npu."""
    kind, _, idx = name.partition(":")
    kind = {"gpu": "cuda"}.get(kind, kind)
    index = int(idx) if idx else local_rank
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA device is available (use --device cpu)")
        return Device("cuda", index if index is not None else 0)
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise DeviceError("--device npu needs the torch_npu package (pip install torch_npu), which "
                              "needs Huawei's CANN toolkit installed") from None
        return Device("npu", index if index is not None else 0)
    if kind == "cpu":
        return Device("cpu", None)
    raise DeviceError(f"--device {name!r}: expected cuda, gpu, npu or cpu")


def _tensors(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _fused_sgd_refusal(groups: list, lr: float, momentum: float, weight_decay: float) -> str | None:
    """None when torch's fused SGD steps a tensor of every (device, dtype) among the params, else
    why not. torch 2.4 checks in the constructor, later versions at the first step(), and a
    device can pass the check yet lack the kernel: a real step on throwaway tensors settles it
    before training, in every version."""
    kinds = {(p.device, p.dtype) for g in groups for p in (g["params"] if isinstance(g, dict) else [g])}
    for dev, dtype in sorted(kinds, key=str):
        probe = torch.zeros(2, device=dev, dtype=dtype, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        try:
            torch.optim.SGD([probe], lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True).step()
        except (RuntimeError, TypeError, ValueError) as e:  # NotImplementedError is a RuntimeError
            why = (str(e).splitlines() or [type(e).__name__])[0]
            return f"{dev.type} {str(dtype).replace('torch.', '')}: {why}"
    return None


def build_sgd(params, lr: float, momentum: float, weight_decay: float, device: Device,
              prefer: str = "fused") -> tuple[torch.optim.Optimizer, str]:
    """The fastest SGD that steps these params, and its name for the log.

    cuda (and cpu on torch builds that have it): torch's fused SGD, when a probe step on each
    (device, dtype) of the params runs; npu: torch_npu's fused SGD when importable; otherwise
    foreach (multi-tensor) SGD, with the reason logged.
    """
    if device.kind == "npu" and prefer == "fused":
        try:
            from torch_npu.optim import NpuFusedSGD  # type: ignore

            return NpuFusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay), "NpuFusedSGD"
        except ImportError:
            prefer = "foreach"
    # Read twice (by the probe, then by the optimizer): iterators become lists.
    params = [{**g, "params": _tensors(g["params"])} if isinstance(g, dict) else g for g in params]
    if prefer == "fused":
        refusal = _fused_sgd_refusal(params, lr, momentum, weight_decay)
        if refusal is None:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
            return opt, "SGD(fused=True)"
        logging.getLogger("train").info(f"=> fused SGD unavailable ({refusal}); using foreach SGD")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    return opt, "SGD(foreach=True)"
