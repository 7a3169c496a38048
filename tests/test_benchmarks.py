"""The benchmark photo set (deterministic, the promised ImageNet-like mix) and the benchmark CLIs'
flag validation. Fast: a few dozen renders and in-process argument parsing."""
import importlib.util
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from benchmarks import photos
from benchmarks.photos import SUBSAMPLING, PhotoConfig, plan, render

from conftest import make_colour_folder, run_cli

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image (the photos) is not installed")


def test_plans_follow_imagenet_mix():
    cfg = PhotoConfig()
    ps = [plan(k, i, "train", cfg) for k in range(20) for i in range(150)]
    w = np.array([p.width for p in ps])
    h = np.array([p.height for p in ps])
    # Mean about 500 x 430, most at a 500 px longer side, the rest spread well beyond it.
    assert 470 < w.mean() < 550 and 400 < h.mean() < 470
    long = np.maximum(w, h)
    assert 0.45 < np.mean(long == 500) < 0.7
    assert np.mean(long < 400) > 0.05 and np.mean(long > 700) > 0.03
    assert np.mean(w < h) > 0.1  # portraits too
    q = np.array([p.quality for p in ps])
    assert 0.75 < np.mean((q >= 75) & (q <= 95)) < 0.92
    assert np.any(q < 75) and np.any(q > 95)
    sub = Counter(p.subsampling for p in ps)
    assert 0.78 < sub["4:2:0"] / len(ps) < 0.92 and sub["4:4:4"] / len(ps) > 0.06 and sub["4:2:2"] > 0
    modes = Counter(p.mode for p in ps)
    assert modes["L"] > 0.01 * len(ps) and modes["CMYK"] > 0 and modes["RGB"] > 0.95 * len(ps)
    assert len({p.photo for p in ps}) == len(photos.COLOUR + photos.GREY)


def test_plans_are_keyed_on_seed_and_position():
    cfg = PhotoConfig()
    assert plan(3, 7, "train", cfg) == plan(3, 7, "train", cfg)
    others = {plan(3, 7, "val", cfg), plan(3, 8, "train", cfg), plan(3, 7, "train", PhotoConfig(seed=1))}
    assert plan(3, 7, "train", cfg) not in others


def _quant_tables(quality: int) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=quality)
    return Image.open(buf).quantization


@needs_skimage
def test_files_honour_their_plans():
    """Size, mode, chroma subsampling and quantization (i.e. quality) of the written JPEGs."""
    cfg = PhotoConfig()
    keys = [(k, i) for k in range(2) for i in range(8)]
    grey = next((0, i) for i in range(500) if plan(0, i, "train", cfg).mode == "L")
    cmyk = next((0, i) for i in range(2000) if plan(0, i, "train", cfg).mode == "CMYK")
    sizes = []
    for k, i in dict.fromkeys(keys + [grey, cmyk]):  # grey or cmyk may already be among keys
        p = plan(k, i, "train", cfg)
        data = render(k, i, "train", cfg)
        sizes.append(len(data))
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.size == (p.width, p.height) and im.mode == p.mode
        if p.mode == "RGB":
            assert JpegImagePlugin.get_sampling(im) == SUBSAMPLING[p.subsampling]
        assert im.quantization[0] == _quant_tables(p.quality)[0]
        # Photo content with camera noise, not a flat render: the pixels vary locally.
        a = np.asarray(im.convert("L"), np.float32)
        assert np.abs(np.diff(a, axis=1)).mean() > 2.0
    assert len(set(sizes)) == len(sizes)
    assert 40e3 < np.mean(sizes[:len(keys)]) < 250e3


@needs_skimage
def test_generate_is_deterministic_across_workers(tmp_path):
    cfg = PhotoConfig(classes=2, per_class=3, val_per_class=1, seed=5)
    a = photos.generate(tmp_path / "a", cfg, workers=1)
    b = photos.generate(tmp_path / "b", cfg, workers=2)
    files = sorted(f.relative_to(a) for f in a.rglob("*.JPEG"))
    assert len(files) == 2 * 3 + 2 * 1
    assert files == sorted(f.relative_to(b) for f in b.rglob("*.JPEG"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = photos.generate(tmp_path / "c", PhotoConfig(classes=2, per_class=3, val_per_class=1, seed=6), workers=1)
    assert (other / files[0]).read_bytes() != (a / files[0]).read_bytes()


def test_missing_scikit_image_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="scikit-image"):
        photos.photo_dir()


def test_imagenet_like_rejects_unknown_content(tmp_path):
    from benchmarks.common import imagenet_like

    with pytest.raises(ValueError, match="content"):
        imagenet_like(1, 1, cache=tmp_path, content="cartoons")


def _flag_error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code != 0
    return capsys.readouterr().err


def test_loader_flags_validate(tmp_path, capsys, colour_shards):
    from benchmarks.loader import parse_args

    assert "--src" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "missing")])
    (tmp_path / "flat").mkdir()
    assert "no train/" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "flat")])
    (tmp_path / "empty" / "train" / "n0").mkdir(parents=True)
    assert "--src" in _flag_error(capsys, parse_args, ["--src", str(tmp_path / "empty")])
    assert "--shards" in _flag_error(capsys, parse_args, ["--shards", str(tmp_path / "missing")])
    err = _flag_error(capsys, parse_args, ["--shards", str(tmp_path / "flat")])
    assert "--shards" in err and "manifest" in err
    # Good paths pass.
    src = make_colour_folder(tmp_path / "good", per_class=1, val_per_class=0)
    a = parse_args(["--src", str(src), "--shards", str(colour_shards)])
    assert a.src == src and a.shards == colour_shards


def test_loader_cli_exits_nonzero_on_bad_path(tmp_path):
    r = run_cli("benchmarks.loader", "--shards", tmp_path / "nowhere")
    assert r.returncode != 0 and "--shards" in r.stderr and "Traceback" not in r.stderr


def test_ffcv_compare_flags_validate(tmp_path, capsys):
    from benchmarks.ffcv_compare import main

    assert "--ffcv-python" in _flag_error(capsys, main, [])
    assert "--ffcv-python" in _flag_error(capsys, main, ["--ffcv-python", str(tmp_path / "python")])


def test_ffcv_reference_corrects_only_a_different_stack():
    """FFCV's reference is divided by the measured per-sample CPU-rate ratio where the two
    processes' library versions differ (a slower Pillow there must not flatter FFCV's loaders),
    and left alone where they are the same (the ratio is then the busy machine's noise)."""
    from benchmarks.ffcv_compare import ffcv_reference

    stack = {"torch": "2.14.1", "Pillow": "13.0.0", "torch_threads": 2}
    mine = {"stack": stack, "reference_cpu": 300.0, "reference_cpu_after": 300.0}
    theirs = {"stack": {**stack, "torch_threads": 1, "opencv_threads": 2}, "reference_cpu": 240.0,
              "reference": 400.0, "reference_after": 440.0}
    assert ffcv_reference(mine, theirs) == (420.0, 1.0, 0.8, {})
    theirs["stack"] = {**theirs["stack"], "Pillow": "11.3.0"}
    ref, factor, measured, differ = ffcv_reference(mine, theirs)
    assert (factor, measured, differ) == (0.8, 0.8, {"Pillow": ("13.0.0", "11.3.0")})
    assert ref == pytest.approx(525.0)  # 420 img/s on a stack 0.8x as fast is 525 on ours
