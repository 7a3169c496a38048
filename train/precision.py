"""AMP opt levels with the meaning they have in the seed (apex):

- O0: fp32 everywhere.
- O1: fp32 weights, autocast for the forward pass.
- O2: the model's weights are held in half precision (bf16 or fp16), except BatchNorm, which
  stays fp32 (its kernels take half inputs with fp32 parameters); the optimizer steps fp32
  master copies, which are copied back to the model after each step. fp16 uses a loss scale
  (dynamic, or static from --loss-scale) and skips steps whose gradients overflowed; bf16 has
  fp32's range and needs no scaling.

--loss-scale matters only for fp16 at O1/O2; under bf16 or O0 it is ignored, and train.run says
so at start-up. Unlike apex, a static --loss-scale N also skips a step whose gradients hold inf or
nan: apex's LossScaler checks for overflow only when dynamic (apex/amp/scaler.py passes
check_overflow=self.dynamic, and update_scale skips only "if self._has_overflow and
self.dynamic"), so apex applies such a step and the weights turn to inf/nan for good. Skipping
keeps the weights; the scale stays N either way.

The fp16 overflow check does not sync the host: the scale and the found-inf flag live on the
device and feed the fused optimizer (its grad_scale / found_inf inputs), which skips the update
by itself.
"""
from __future__ import annotations

import torch
from torch import nn

_BN = (nn.modules.batchnorm._BatchNorm,)


class Precision:
    def __init__(self, opt_level: str, amp_dtype: torch.dtype, loss_scale: str | float | None, device_type: str):
        if opt_level not in ("O0", "O1", "O2"):
            raise ValueError(f"--opt-level {opt_level!r}: expected O0, O1 or O2")
        self.opt_level = opt_level
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.scaling = opt_level != "O0" and amp_dtype == torch.float16
        self.requested_scale = loss_scale
        self.dynamic = self.scaling and (loss_scale is None or loss_scale == "dynamic")
        init = 1.0
        if self.scaling:
            init = 2.0 ** 16 if self.dynamic else float(loss_scale)
        self.scale = torch.tensor(init)
        self.growth_tracker = torch.zeros((), dtype=torch.int32)
        self.found_inf = torch.zeros(())
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        self.half_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (half weight, its fp32 master)

    def loss_scale_notice(self) -> str | None:
        """One line for the start-up log when a static --loss-scale was asked for and has no
        effect (bf16, or O0): the seed's scripts pass --loss-scale=1024 whatever the dtype."""
        if self.scaling or self.requested_scale in (None, "dynamic"):
            return None
        why = "O0 (no --amp, or --opt-level O0) runs in fp32" if self.opt_level == "O0" else \
            f"{self.opt_level} bf16 has fp32's exponent range and needs no loss scaling"
        return f"=> note: --loss-scale {self.requested_scale} has no effect: {why} (it scales fp16 only)"

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the loader delivers: half under O1 too, since autocast casts the first conv's
        input to half anyway, and half batches cost half the copy."""
        return torch.float32 if self.opt_level == "O0" else self.amp_dtype

    def prepare_model(self, model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
        """Move to device (channels_last by default); under O2 cast to half except BatchNorm."""
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.scale = self.scale.to(device)
        self.growth_tracker = self.growth_tracker.to(device)
        self.found_inf = self.found_inf.to(device)
        if self.opt_level == "O2":
            # BatchNorm keeps fp32 parameters and statistics; cuDNN and the CPU kernels take
            # half activations with fp32 BN parameters directly, so no casts are inserted.
            for m in model.modules():
                if not isinstance(m, _BN):
                    for p in m.parameters(recurse=False):
                        p.data = p.data.to(self.amp_dtype)
        return model

    def optimizer_params(self, model: nn.Module, no_bn_wd: bool, weight_decay: float) -> list[dict]:
        """Parameter groups for the optimizer: fp32 master copies of half weights under O2."""
        decay, no_decay = [], []
        self.model_params, self.master_params = [], []
        for m in model.modules():
            for p in m.parameters(recurse=False):
                master = p
                if p.dtype != torch.float32:
                    master = p.detach().float().clone().requires_grad_(True)
                self.model_params.append(p)
                self.master_params.append(master)
                skip = no_bn_wd and (isinstance(m, _BN) or p.ndim <= 1)
                (no_decay if skip else decay).append(master)
        self.half_pairs = [(p, m) for p, m in zip(self.model_params, self.master_params) if p is not m]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def autocast(self):
        if self.opt_level == "O1":
            return torch.autocast(self.device_type, dtype=self.amp_dtype)
        return torch.autocast(self.device_type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scaling else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy half grads to the fp32 masters, unscale, step (skipping on overflow), copy back."""
        pairs = self.half_pairs
        for p, m in pairs:
            m.grad = None if p.grad is None else p.grad.float()
        if self.scaling:
            grads = [m.grad for m in self.master_params if m.grad is not None]
            self.found_inf.zero_()
            if getattr(optimizer, "_step_supports_amp_scaling", False) and \
                    optimizer.defaults.get("fused", False):
                # The fused kernel unscales by grad_scale and skips the update where found_inf.
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, torch.ones_like(self.scale))
                optimizer.grad_scale, optimizer.found_inf = self.scale, self.found_inf
                optimizer.step()
            else:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, 1.0 / self.scale)
                if not bool(self.found_inf.item()):  # host sync: foreach optimizers cannot skip on device
                    optimizer.step()
            if self.dynamic:
                torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        else:
            optimizer.step()
        if pairs:
            torch._foreach_copy_([p.data for p, _ in pairs], [m.data for _, m in pairs])

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for p in self.model_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"opt_level": self.opt_level, "scale": self.scale.cpu(), "growth_tracker": self.growth_tracker.cpu(),
                "master": [m.detach().cpu() for _, m in self.half_pairs]}

    def load_state_dict(self, sd: dict) -> None:
        self.scale.copy_(sd["scale"])
        self.growth_tracker.copy_(sd["growth_tracker"])
        if len(self.half_pairs) != len(sd["master"]):
            raise ValueError("checkpoint was written with another --opt-level (master weights differ)")
        with torch.no_grad():
            for (p, m), saved in zip(self.half_pairs, sd["master"]):
                m.copy_(saved)
                p.copy_(m)
