"""The fast recipe (issue 21): BlurPool against a hand-computed reference, the linear schedule,
the recipe's bundle of flags (each its own flag, the seed's recipe the default), and a run that
crosses the resolution ramp and resumes across it bitwise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from test_train import losses


def blur_reference(x: np.ndarray, stride: int) -> np.ndarray:
    """[1, 2, 1] x [1, 2, 1] / 16 on each channel of (C, H, W), reflect padding, sampled at
    `stride`: written out pixel by pixel."""
    k = np.array([1.0, 2.0, 1.0])
    k2 = np.outer(k, k) / 16.0
    c, h, w = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # numpy's reflect: the edge pixel not repeated
    out = np.zeros((c, (h - 1) // stride + 1, (w - 1) // stride + 1))
    for ch in range(c):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                y0, x0 = i * stride, j * stride
                out[ch, i, j] = (p[ch, y0:y0 + 3, x0:x0 + 3] * k2).sum()
    return out


@pytest.mark.parametrize("stride", [2, 1])
@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_blurpool_is_the_binomial_filter_with_reflect_padding(stride, hw):
    from train.blurpool import BlurPool

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *hw))
    got = BlurPool(3, stride)(torch.from_numpy(x)[None].float())[0].double().numpy()
    want = blur_reference(x, stride)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    # The check tells the padding apart: zero padding differs on the border.
    zero = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x)[None].float(), (1, 1, 1, 1)),
                                      BlurPool(3, stride).filt, stride=stride, groups=3)[0].double().numpy()
    assert not np.allclose(zero, want, atol=1e-3)


def test_apply_blurpool_wraps_the_strided_convs_and_keeps_the_shapes():
    import torchvision

    from train.blurpool import BlurPool, apply_blurpool

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    # layer2-4: the 3x3 stride-2 conv1 and the 1x1 stride-2 shortcut; the RGB stem conv stays as it was.
    assert apply_blurpool(model) == 6
    assert model.conv1.stride == (2, 2) and isinstance(model.layer2[0].conv1[0], BlurPool)
    blurred = model(x)
    assert blurred.shape == plain.shape and not torch.allclose(blurred, plain)
    assert sum(isinstance(m, BlurPool) for m in model.modules()) == 6
    # The 1x1 shortcut at stride 1 after a stride-2 blur is the strided 1x1 conv of the stride-1 blur.
    down = model.layer3[0].downsample[0]
    assert down[0].stride == 2 and down[1].stride == (1, 1)
    t = torch.randn(2, down[0].channels, 8, 8)
    strided = torch.nn.functional.conv2d(BlurPool(down[0].channels, 1)(t), down[1].weight, stride=2)
    assert torch.allclose(down(t), strided, atol=1e-5)
    # A checkpoint holds no filter: it is a constant.
    assert not any("filt" in k for k in model.state_dict())


def test_tiny_maps_are_blurred_too():
    from train.blurpool import BlurPool

    assert BlurPool(4, 2)(torch.ones(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_linear_schedule_warms_up_then_falls_to_zero():
    from train.config import TrainConfig
    from train.run import lr_at

    cfg = TrainConfig(lr=0.8, epochs=22, warm_up_epochs=2, schedule="linear")
    assert lr_at(cfg, 0) == pytest.approx(0.8 / 3)
    assert lr_at(cfg, 2) == pytest.approx(0.8)
    assert lr_at(cfg, 12) == pytest.approx(0.4)
    assert lr_at(cfg, 17) == pytest.approx(0.2)
    assert lr_at(cfg, 22) == pytest.approx(0.0, abs=1e-12)
    cosine = TrainConfig(lr=0.8, epochs=22, warm_up_epochs=2)
    assert lr_at(cosine, 17) == pytest.approx(0.8 * 0.5 * (1 + np.cos(np.pi * 0.75)))


def resolve(argv):
    from train.config import parse_args
    from train.recipes import apply

    cfg, given = parse_args(["--synthetic", *argv])
    return apply(cfg, given, None)[0]


def test_fast_recipe_bundles_its_parts_and_the_seed_recipe_stays_the_default():
    from train.recipes import train_sizes

    seed = resolve(["--epochs", "90"])
    assert (seed.recipe, seed.schedule, seed.label_smoothing, seed.no_bn_wd, seed.blurpool, seed.tta_flip) == \
        ("imagenet", "cosine", 0.0, False, False, False)
    assert train_sizes(seed).fixed and seed.image_size == seed.val_size == 224 and seed.warm_up_epochs == 5

    fast = resolve(["--recipe", "fast", "--epochs", "88"])
    assert (fast.schedule, fast.label_smoothing, fast.no_bn_wd, fast.blurpool, fast.tta_flip) == \
        ("linear", 0.1, True, True, True)
    sizes = train_sizes(fast)
    assert (sizes.start, sizes.end, sizes.step) == (160, 224, 32) and fast.val_size == 256
    assert (sizes.start_epoch, sizes.end_epoch) == (62, 75) and fast.warm_up_epochs == 2
    assert sizes.size(0) == 160 and sizes.size(87) == 224

    # Every part is its own flag: a given flag wins over the recipe.
    mine = resolve(["--recipe", "fast", "--epochs", "20", "--image-size", "64", "--label-smoothing", "0.2",
                    "--start-image-size", "40", "--ramp-end-epoch", "18", "--val-size", "64"])
    sizes = train_sizes(mine)
    assert (sizes.start, sizes.end, sizes.step, sizes.start_epoch, sizes.end_epoch) == (40, 64, 8, 14, 18)
    assert mine.label_smoothing == 0.2 and mine.val_size == 64

    # ... and each works without the recipe.
    parts = resolve(["--epochs", "10", "--image-size", "64", "--start-image-size", "48", "--blurpool",
                     "--tta-flip", "--schedule", "linear"])
    assert parts.recipe == "imagenet" and parts.blurpool and parts.tta_flip and parts.schedule == "linear"
    assert train_sizes(parts).sizes(10) == [48] * 8 + [64, 64]  # ramp from epoch 7 to 8 (70 % and 85 %)


@pytest.mark.parametrize("args,needle", [
    (["--schedule", "step"], "--schedule"),
    (["--val-size", "4"], "--val-size"),
    (["--start-image-size", "2"], "--start-image-size"),
    (["--ramp-start-epoch", "5", "--ramp-end-epoch", "3"], "--ramp-start-epoch"),
    (["--size-step", "0"], "--size-step"),
    (["--recipe", "fastest"], "--recipe"),
])
def test_bad_fast_recipe_flags_exit_naming_the_flag(args, needle):
    r = run_cli("train.run", "--synthetic", "--device", "cpu", *args, timeout=120, warm=True)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_ramp_that_ends_before_it_starts_is_refused():
    from train.config import UsageError

    with pytest.raises(UsageError, match="--ramp-end-epoch"):
        resolve(["--epochs", "10", "--start-image-size", "48", "--ramp-end-epoch", "2"])


ARGS = ["--arch", "resnet18", "--recipe", "fast", "--image-size", "24", "--start-image-size", "16", "--stem", "imagenet",
        "--ramp-start-epoch", "0", "--ramp-end-epoch", "1", "--size-step", "8", "--device", "cpu", "-j", "2",
        "-b", "8", "--epochs", "2", "--lr", "0.02", "--warm-up-epochs", "0", "-p", "1", "--seed", "7"]


def test_fast_run_crosses_the_ramp_and_resumes_across_it_bitwise(colour_shards, tmp_path):
    args = ["--shards", colour_shards, *ARGS]
    whole = run_cli("train.run", *args, "--output", tmp_path / "whole", timeout=600, warm=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    log = whole.stdout + whole.stderr
    assert "=> recipe fast: 16 px to epoch 0, ramp to 24 px by epoch 1 (steps of 8), val 27 px" in log
    assert "label smoothing 0.1; BlurPool; test-time flip" in log and "linear to 0" in log
    assert "=> epoch 0: train images 16 px" in log and "=> epoch 1: train images 24 px" in log
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_acc1" in r]
    assert [r["image_size"] for r in val] == [16, 24] and all(r["train_s"] > 0 for r in val)
    # Stopped in epoch 0 (16 px) with the next batch fetched, resumed: epoch 1 runs at 24 px, bitwise.
    part = run_cli("train.run", *args, "--max-steps", "4", "--output", tmp_path / "part", timeout=600, warm=True)
    assert part.returncode == 0, part.stderr[-2000:]
    rest = run_cli("train.run", *args, "--resume", tmp_path / "part" / "checkpoint.pth.tar",
                   "--output", tmp_path / "part", timeout=600, warm=True)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "=> epoch 1: train images 24 px" in rest.stdout + rest.stderr
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert sorted(ref) == sorted(got) == list(range(1, 15))
    assert got == ref


def test_tta_flip_scores_the_mean_of_each_image_and_its_mirror():
    import logging

    from train.metrics import topk_correct
    from train.precision import Precision
    from train.run import DistInfo, validate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    x, y = torch.randn(1000, 3, 4, 4), torch.randint(0, 6, (1000,))
    precision = Precision("O0", torch.bfloat16, "dynamic", "cpu")
    criterion = torch.nn.CrossEntropyLoss()
    log = logging.getLogger("test")
    plain, _ = validate(model, [(x, y)], criterion, precision, DistInfo(), log)
    flipped, _ = validate(model, [(x, y)], criterion, precision, DistInfo(), log, tta_flip=True)
    with torch.no_grad():
        want = 100.0 * float(topk_correct((model(x) + model(x.flip(3))) / 2, y)[0]) / len(y)
        alone = 100.0 * float(topk_correct(model(x), y)[0]) / len(y)
    assert flipped == pytest.approx(want) and plain == pytest.approx(alone) and want != alone


def test_the_photo_set_as_a_task_labels_each_image_by_its_photo():
    pytest.importorskip("skimage", reason="scikit-image (the photos) is not installed")
    from benchmarks import photos

    cfg = photos.PhotoConfig(classes=16, per_class=3, labels="photo")
    assert all(photos.plan(k, i, "train", cfg).photo == (photos.COLOUR + photos.GREY)[k]
               for k in range(16) for i in range(3))
    # The other draws (size, quality, ...) are those of the arbitrary set, whose cache marker is unchanged.
    plain = photos.PhotoConfig(classes=16, per_class=3)
    assert photos.plan(5, 1, "val", cfg).width == photos.plan(5, 1, "val", plain).width
    assert "labels" not in photos._marker(plain) and photos._marker(cfg)["labels"] == "photo"
    with pytest.raises(ValueError, match="1 to 16 classes"):
        photos.PhotoConfig(classes=17, labels="photo")
    with pytest.raises(ValueError, match="labels 'bogus'"):
        photos.PhotoConfig(labels="bogus")


def fake_run(folder, recipe: str, accs: list[float], secs: list[float], sizes: list[int]):
    folder.mkdir(parents=True)
    cfg = {"stem": "imagenet", "blurpool": recipe == "fast", "val_size": 37, "label_smoothing": 0.0,
           "no_bn_wd": False, "tta_flip": False, "schedule": "cosine", "warm_up_epochs": 1.0, "start_image_size": 0,
           "ramp_start_epoch": -1, "ramp_end_epoch": -1, "size_step": 0, "lr": 0.1, "weight_decay": 1e-4}
    (folder / "config.json").write_text(json.dumps(cfg))
    rows = [{"step": 10 * (e + 1), "epoch": e, "val_acc1": a, "train_s": t, "image_size": s}
            for e, (a, t, s) in enumerate(zip(accs, secs, sizes))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_time_to_accuracy_reads_the_target_off_the_mean_curves(tmp_path):
    from argparse import Namespace

    from benchmarks.time_to_accuracy import model_flops, summarize

    runs = {"imagenet": [fake_run(tmp_path / f"s{i}", "imagenet", [50, 80, 90 + i], [10, 20, 30], [32] * 3)
                         for i in range(2)],
            "fast": [fake_run(tmp_path / f"f{i}", "fast", [60, 89.6, 92], [5, 9, 15], [24, 24, 32]) for i in range(2)]}
    a = Namespace(arch="resnet18", image_size=32, classes=4, tolerance=1.0)
    got = summarize(runs, {"imagenet": [40, 40], "fast": [20, 20]}, a)
    assert got["recipes"]["imagenet"]["final_top1_mean"] == 90.5 and got["target_top1"] == 89.5
    assert got["fast_epochs_to_target"] == 2 and got["time_ratio"] == pytest.approx(9 / 30)
    assert got["time_ratio_per_seed"] == pytest.approx([0.3, 0.3]) and got["goal_met"]
    ref = model_flops("resnet18", 32, "imagenet", False, 4)
    small, large = (model_flops("resnet18", s, "imagenet", True, 4) / ref for s in (24, 32))
    assert got["recipes"]["fast"]["curve"]["flops_epochs"] == pytest.approx([small, 2 * small, 2 * small + large])
    assert got["flops_ratio"] == pytest.approx(2 * small / 3) and large > 1  # BlurPool costs FLOPs too
    # A fast recipe that never gets there misses the goal, and says so.
    runs["fast"] = [fake_run(tmp_path / f"g{i}", "fast", [60, 70, 80], [5, 9, 15], [24, 24, 32]) for i in range(2)]
    got = summarize(runs, {"imagenet": [40, 40], "fast": [20, 20]}, a)
    assert not got["fast_reaches_target"] and got["time_ratio"] is None and not got["goal_met"]
    assert got["full_run_time_ratio_per_seed"] == pytest.approx([0.5, 0.5])
