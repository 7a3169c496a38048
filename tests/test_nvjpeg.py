"""The nvjpeg backend and the batched device kernel, run whole on the CPU: torchvision's CPU
decode_jpeg stands in for nvJPEG, and the Triton kernel runs under TRITON_INTERPRET=1."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, assert_resumes_exactly, collect
from pipeline import create_loader

KERNEL_CHECK = r"""
import numpy as np, torch
from kernels.batch_resize import batch_crop_resize, batch_crop_resize_reference, normalize_nhwc_fused
from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants, normalize_nhwc
rng = np.random.default_rng(0)
scale, shift = affine_constants(IMAGENET_MEAN, IMAGENET_STD, "cpu")
worst = 0.0
for trial in range(4):
    sizes = [(int(rng.integers(12, 70)), int(rng.integers(12, 70))) for _ in range(3)]
    imgs = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    boxes = []
    for h, w in sizes:
        bw, bh = rng.uniform(2, w), rng.uniform(2, h)
        boxes.append([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
    boxes = np.array(boxes)
    flips = rng.integers(0, 2, 3)
    for dtype in (torch.float32, torch.bfloat16):
        k = batch_crop_resize(imgs, boxes, flips, 12, scale, shift, dtype, force_kernel=True)
        r = batch_crop_resize_reference(imgs, boxes, flips, 12, scale, shift, dtype)
        assert k.dtype == dtype and k.shape == (3, 3, 12, 12)
        assert k.is_contiguous(memory_format=torch.channels_last)
        worst = max(worst, float((k.float() - r.float()).abs().max()))
# uint8 rounding in the reference is 0.5/255/0.225 = 0.0087; bf16 adds up to 2^-8 relative.
assert worst < 0.03, worst
x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
a = normalize_nhwc_fused(x, scale, shift, torch.float32, force_kernel=True)
assert a.is_contiguous(memory_format=torch.channels_last)
assert torch.allclose(a, normalize_nhwc(x, scale, shift, torch.float32), atol=1e-6)
print("ok", worst)
"""


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("split", ["train", "val"])
def test_nvjpeg_backend_on_cpu_matches_cpu_backend(colour_shards, split):
    kw = dict(split=split, batch_size=8, image_size=32, device="cpu", workers=2, normalize=False, seed=3)
    nv = collect(create_loader(colour_shards, backend="nvjpeg", **kw))
    cpu = collect(create_loader(colour_shards, backend="cpu", **kw))
    assert len(nv) == len(cpu) > 0
    for (a, la), (b, lb) in zip(nv, cpu):
        assert a.shape == b.shape and a.dtype == torch.uint8 and torch.equal(la, lb)
        diff = (a.int() - b.int()).abs()
        # Same crops and flips; only the decoders differ (full image vs the crop's region).
        assert diff.float().mean() < 1.0 and diff.max() <= 24


def test_nvjpeg_backend_contract(colour_shards):
    kw = dict(batch_size=8, image_size=32, device="cpu", seed=4)
    loader = create_loader(colour_shards, backend="nvjpeg", workers=1, **kw)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    ref = collect(create_loader(colour_shards, backend="nvjpeg", workers=1, **kw))
    other = collect(create_loader(colour_shards, backend="nvjpeg", workers=3, **kw))  # thread count: no effect
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ref, other))
    assert_resumes_exactly(lambda: create_loader(colour_shards, backend="nvjpeg", workers=2, **kw), 2)
    assert loader.stats.device_bytes > 0


def test_device_faults_raise_and_refused_valid_images_fall_back_to_the_cpu(colour_shards, monkeypatch):
    """Only damaged data is replaced: out-of-memory and CUDA errors raise, and an image the device
    decoder refuses but the CPU decodes (a CMYK file, say) is used, not counted as corrupt."""
    import torchvision.io

    kw = dict(batch_size=8, image_size=32, device="cpu", workers=2, seed=4, normalize=False)
    ref = collect(create_loader(colour_shards, backend="nvjpeg", **kw))

    def refuses_all(data, *a, **k):
        raise RuntimeError("nvjpegDecode failed: unsupported format")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_all)
    loader = create_loader(colour_shards, backend="nvjpeg", **kw)
    got = collect(loader)
    assert loader.stats.corrupt == 0 and len(got) == len(ref)
    for (a, la), (b, lb) in zip(got, ref):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().max() <= 1  # Pillow's pixels, not nvJPEG's

    for fault in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        def failing(data, *a, _fault=fault, **k):
            raise _fault

        monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
        loader = create_loader(colour_shards, backend="nvjpeg", **kw)
        with pytest.raises(RuntimeError, match="CUDA"):
            collect(loader)
        assert loader.stats.corrupt == 0


def test_nvjpeg_device_thread_errors_reach_the_consumer_and_threads_end(colour_shards, monkeypatch):
    from pipeline.nvjpeg import NvjpegLoader

    kw = dict(batch_size=8, image_size=32, device="cpu", workers=2, seed=4)
    loader = create_loader(colour_shards, backend="nvjpeg", **kw)
    for i, _ in enumerate(loader):
        if i == 1:
            break  # abandoned mid-epoch: the device thread must stop, not block on its queue
    assert not any(t.name == "nvjpeg-device" for t in threading.enumerate())

    real, calls = NvjpegLoader._assemble, []

    def failing(self, epoch, hb):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault in batch 3")
        return real(self, epoch, hb)

    monkeypatch.setattr(NvjpegLoader, "_assemble", failing)
    got = []
    with pytest.raises(RuntimeError, match="device fault in batch 3"):
        for x, _ in loader:
            got.append(x)
    assert len(got) == 2  # the batches before the fault were delivered in order
    loader.close()
    assert not any(t.name == "nvjpeg-device" for t in threading.enumerate())
