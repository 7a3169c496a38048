"""The model, its optimizer and one training step: shared by train.run and benchmarks.train_step,
so the benchmark measures exactly the step that trains."""
from __future__ import annotations

import torch

from .devices import Device, build_sgd
from .precision import Precision


def cifar_stem(model: torch.nn.Module) -> torch.nn.Module:
    """The CIFAR ResNet stem: a 3x3 stride-1 first conv and no max-pool, so a 32 px image keeps its
    resolution into the first stage instead of losing a factor of 4."""
    conv = model.conv1
    model.conv1 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def build(arch: str, num_classes: int, device: Device, precision: Precision, lr: float, momentum: float,
          weight_decay: float, no_bn_wd: bool = False, optimizer: str = "fused", channels_last: bool = True,
          seed: int = 49, stem: str = "imagenet", blurpool: bool = False):
    """(model, optimizer, optimizer name): a torchvision model (with the CIFAR stem and BlurPool if
    asked), seeded, on the device, in the precision's weight dtype, with an SGD over its (master)
    parameters."""
    import torchvision

    torch.manual_seed(seed)  # the same initial weights on every rank and every rerun
    model = torchvision.models.__dict__[arch](num_classes=num_classes)
    if stem == "cifar":
        model = cifar_stem(model)
    if blurpool:
        from .blurpool import apply_blurpool

        apply_blurpool(model)
    model = precision.prepare_model(model, device.torch_device, channels_last)
    opt, name = build_sgd(precision.optimizer_params(model, no_bn_wd, weight_decay), lr, momentum, weight_decay,
                          device, optimizer)
    return model, opt, name


def train_step(model, x, y, criterion, precision: Precision, optimizer, before_backward=None):
    """Forward, loss, optional hook (the loop prefetches the next batch there), backward, step.
    Returns (output, loss, hook result); nothing is read back to the host."""
    with precision.autocast():
        output = model(x)
        loss = criterion(output.float(), y)
    extra = before_backward() if before_backward is not None else None
    precision.zero_grad(optimizer)
    precision.backward(loss)
    precision.step(optimizer)
    return output, loss, extra
