"""Every compiled kernel against its plain reference, on random inputs."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD, affine_constants, normalize_nhwc
from kernels.resize import resize_crop_into, resize_crop_reference

try:
    from kernels import _jpeg
except ImportError:
    _jpeg = None

needs_jpeg = pytest.mark.skipif(_jpeg is None, reason="kernels._jpeg not built (libjpeg-turbo headers missing)")


def _photo(w=200, h=150, seed=0, subsampling="4:2:0", progressive=False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


def test_resize_kernel_matches_pillow():
    rng = np.random.default_rng(1)
    for trial in range(40):
        h, w = int(rng.integers(8, 300)), int(rng.integers(8, 300))
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        bw, bh = rng.uniform(1, w), rng.uniform(1, h)
        box = (rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh)
        out_h, out_w = int(rng.integers(4, 80)), int(rng.integers(4, 80))
        flip = bool(trial % 2)
        ours = np.empty((out_h, out_w, 3), np.uint8)
        ref = np.empty_like(ours)
        resize_crop_into(src, box, ours, flip)
        resize_crop_reference(src, box, ref, flip)
        assert np.abs(ours.astype(int) - ref).max() <= 1, (trial, box)


def test_resize_switch_falls_back_to_reference(monkeypatch):
    src = np.random.default_rng(2).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    a, b = np.empty((20, 20, 3), np.uint8), np.empty((20, 20, 3), np.uint8)
    resize_crop_into(src, (3.5, 2.0, 40.0, 30.0), a, True)
    monkeypatch.setenv("RESNET_SHARDS_COMPILE", "0")
    resize_crop_into(src, (3.5, 2.0, 40.0, 30.0), b, True)
    ref = np.empty_like(a)
    resize_crop_reference(src, (3.5, 2.0, 40.0, 30.0), ref, True)
    assert np.array_equal(b, ref) and np.abs(a.astype(int) - b).max() <= 1


@needs_jpeg
@pytest.mark.parametrize("subsampling,progressive", [("4:2:0", False), ("4:4:4", False), ("4:2:2", True)])
def test_roi_decode_matches_full_decode(subsampling, progressive):
    data = _photo(203, 157, subsampling=subsampling, progressive=progressive)
    w, h, comps, multi_scan = _jpeg.header(data)
    assert (w, h, comps, bool(multi_scan)) == (203, 157, 3, progressive)  # Pillow's files: one scan or progressive
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    buf = np.empty(w * h * 3 * 2, np.uint8)
    left, top, width, rows = _jpeg.decode_region(data, 0, 0, w, h, 1, buf, False)
    assert (left, top, width, rows) == (0, 0, w, h)
    assert np.array_equal(buf[: w * h * 3].reshape(h, w, 3), pil)  # accurate mode is Pillow's decode
    rng = np.random.default_rng(3)
    for _ in range(30):
        x, y = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        bw, bh = int(rng.integers(1, w - x)), int(rng.integers(1, h - y))
        left, top, width, rows = _jpeg.decode_region(data, x, y, bw, bh, 1, buf, False)
        assert left <= x and left + width >= x + bw and top == y and rows == bh
        region = buf[: width * rows * 3].reshape(rows, width, 3).astype(int)
        ref = pil[top:top + rows, left:left + width]
        # Fancy upsampling sees no neighbour beyond a cropped edge, so only the region's outer
        # columns may differ a little; everything inside is the full decode's pixels exactly.
        assert np.array_equal(region[:, 1:-1], ref[:, 1:-1])
        assert np.abs(region - ref).max() <= 32


@needs_jpeg
def test_roi_decode_scaled_matches_pillow_draft():
    data = _photo(400, 300)
    buf = np.empty(400 * 300 * 3, np.uint8)
    for d in (2, 4, 8):
        left, top, width, rows = _jpeg.decode_region(data, 0, 0, 400, 300, d, buf, False)
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (400 // d, 300 // d))
        ref = np.asarray(im.convert("RGB"))
        assert (rows, width) == ref.shape[:2]
        assert np.abs(buf[: width * rows * 3].reshape(rows, width, 3).astype(int) - ref).max() <= 2


@needs_jpeg
def test_roi_decode_rejects_bad_input():
    data = _photo()
    buf = np.empty(200 * 150 * 3, np.uint8)
    with pytest.raises(_jpeg.CorruptJPEG, match="truncated"):
        _jpeg.decode_region(data[: len(data) // 2], 0, 0, 200, 150, 1, buf)
    with pytest.raises(_jpeg.CorruptJPEG):
        _jpeg.decode_region(b"not a jpeg at all", 0, 0, 10, 10, 1, buf)
    # The caller's mistakes are plain ValueErrors: the loader must not replace them as corrupt.
    with pytest.raises(ValueError, match="too small") as e:
        _jpeg.decode_region(data, 0, 0, 200, 150, 1, np.empty(10, np.uint8))
    assert type(e.value) is ValueError
    with pytest.raises(ValueError, match="outside") as e:
        _jpeg.decode_region(data, 500, 0, 10, 10, 1, buf)
    assert type(e.value) is ValueError


def test_normalize_matches_reference():
    x = torch.randint(0, 256, (3, 7, 5, 3), dtype=torch.uint8)
    scale, shift = affine_constants(IMAGENET_MEAN, IMAGENET_STD, "cpu")
    ref = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        for cl in (True, False):
            y = normalize_nhwc(x, scale, shift, dtype, cl)
            assert y.dtype == dtype and y.shape == (3, 3, 7, 5)
            assert y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous()
            assert torch.allclose(y.float(), ref, atol=tol)


def test_device_summary_reads_the_check_outputs(tmp_path, capsys):
    import json

    from benchmarks.device_summary import main

    (tmp_path / "machine.txt").write_text("NVIDIA H100 80GB HBM3, 580.1, 81559 MiB\n")
    (tmp_path / "tests.log").write_text("....\n9 passed in 12.0s\n")
    (tmp_path / "loader_cuda.json").write_text(json.dumps({"rows": [{"name": "nvjpeg, 16 workers", "img_s": 9000.0}]}))
    (tmp_path / "train_step_cuda.json").write_text(json.dumps({"rows": [
        {"arch": "resnet152", "batch": 256, "image": 224, "precision": "O2:bf16", "compile": False, "img_s": 2500.0,
         "mfu": 0.22, "peak_tflops": 989.4, "peak_name": "H100 SXM dense bf16"},
        {"arch": "resnet152", "batch": 256, "image": 224, "precision": "O1:bf16", "compile": False, "img_s": 2400.0,
         "mfu": None, "peak_tflops": None, "peak_name": "no peak known for 'NVIDIA B200'"}]}))
    (tmp_path / "e2e_synthetic.log").write_text("=> resnet152 on cuda\nx * FPS@all 2500.000\n")
    (tmp_path / "e2e_nvjpeg.log").write_text("=> resnet152 on cuda\nx * FPS@all 2450.000\n")
    (tmp_path / "e2e_cpu.log").write_text("Traceback: boom\n")
    (tmp_path / "train_step.log").write_text("resnet152 b256 O2:bf16 ...: 2500.0 img/s\n")  # cut short
    assert main([str(tmp_path), "--json", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "tests: 9 passed" in out
    assert "9000.0" in out and "98.0% of synthetic" in out
    # Every MFU names the peak it divides by; a card without a known peak has no MFU figure.
    assert re.search(r"O2:bf16 .*2500\.0  MFU 22\.0% of 989\.4 TFLOP/s \(H100 SXM dense bf16\)", out)
    assert re.search(r"O1:bf16 .*2400\.0  MFU unknown \(no peak known for 'NVIDIA B200'\)", out)
    assert "790" not in out
    assert re.search(r"end to end, resnet152 O2 bf16\s+cpu\s+failed", out)
    rows = json.loads((tmp_path / "all.json").read_text())["rows"]
    assert [r["img_s"] for r in rows] == [9000.0, 2500.0, 2400.0, None, 2500.0, None, 2450.0]
    assert (rows[1]["mfu"], rows[1]["peak_tflops"], rows[1]["peak_name"]) == (0.22, 989.4, "H100 SXM dense bf16")
    assert rows[2]["mfu"] is None and rows[2]["peak_tflops"] is None and "B200" in rows[2]["peak_name"]
    assert "stopped early" in rows[3]["note"] and main([str(tmp_path), "--check"]) == 1
