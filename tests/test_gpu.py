"""GPU checks: they run where CUDA is available (benchmarks/device_check.sh runs them on a lent
GPU machine) and are skipped elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import collect
from pipeline import create_loader

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_triton_batch_kernel_on_cuda_matches_reference():
    from kernels.batch_resize import batch_crop_resize, batch_crop_resize_reference
    from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants

    rng = np.random.default_rng(0)
    imgs = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
            for h, w in ((375, 500), (500, 333), (64, 90))]
    boxes = np.array([[10.5, 20.0, 300.0, 250.0], [0.0, 0.0, 333.0, 500.0], [5.0, 3.0, 40.0, 30.0]])
    flips = np.array([1, 0, 1])
    scale, shift = affine_constants(IMAGENET_MEAN, IMAGENET_STD, "cuda")
    k = batch_crop_resize([t.cuda() for t in imgs], boxes, flips, 224, scale, shift, torch.bfloat16)
    r = batch_crop_resize_reference(imgs, boxes, flips, 224, scale.cpu(), shift.cpu(), torch.float32)
    assert k.is_cuda and k.dtype == torch.bfloat16 and k.is_contiguous(memory_format=torch.channels_last)
    assert float((k.float().cpu() - r).abs().max()) < 0.03


@cuda
def test_fused_normalize_on_cuda():
    from kernels.batch_resize import normalize_nhwc_fused
    from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants, normalize_nhwc

    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device="cuda")
    scale, shift = affine_constants(IMAGENET_MEAN, IMAGENET_STD, "cuda")
    a = normalize_nhwc_fused(x, scale, shift, torch.bfloat16)
    b = normalize_nhwc(x, scale, shift, torch.bfloat16)
    assert a.is_contiguous(memory_format=torch.channels_last) and torch.allclose(a.float(), b.float(), atol=2e-2)


@cuda
@pytest.mark.parametrize("backend", ["cpu", "nvjpeg"])
def test_backends_on_cuda_match_cpu_output(colour_shards, backend):
    kw = dict(batch_size=8, image_size=32, workers=2, normalize=False, seed=3)
    dev = [(x.cpu(), y.cpu()) for x, y in create_loader(colour_shards, backend=backend, device="cuda", **kw)]
    ref = collect(create_loader(colour_shards, backend="cpu", device="cpu", **kw))
    assert len(dev) == len(ref)
    for (a, la), (b, lb) in zip(dev, ref):
        assert torch.equal(la, lb)
        assert (a.int() - b.int()).abs().float().mean() < 1.0  # nvJPEG's IDCT differs a little


@cuda
def test_nvjpeg_corrupt_samples_on_cuda(corrupt_shards):
    path, bad = corrupt_shards
    loader = create_loader(path, backend="nvjpeg", device="cuda", batch_size=6, image_size=24, workers=2,
                           drop_last=False)
    n = sum(len(y) for _, y in loader)
    assert n == 60 and set(loader.stats.corrupt_keys) == bad


@cuda
def test_o2_step_on_cuda_trains():
    from train.devices import resolve_device
    from train.precision import Precision
    from train.step import build, train_step

    device = resolve_device("cuda")
    p = Precision("O2", torch.bfloat16, "dynamic", "cuda")
    model, opt, name = build("resnet18", 10, device, p, 0.05, 0.9, 1e-4)
    assert name == "SGD(fused=True)"
    x = torch.randn(32, 3, 64, 64, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    crit = torch.nn.CrossEntropyLoss()
    first = None
    for _ in range(30):
        _, loss, _ = train_step(model, x, y, crit, p, opt)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.5 * first  # it memorises one batch
