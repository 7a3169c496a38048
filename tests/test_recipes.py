"""Recipes chosen from the manifest: the CIFAR path end to end, and flags that keep their meaning."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import run_cli
from pipeline.source import read_manifest
from train import recipes
from train.config import UsageError, parse_args
from train.run import resolve


def resolved(*argv):
    cfg, given = parse_args(list(map(str, argv)))
    return resolve(cfg, given)


def test_cifar_shards_get_the_cifar_recipe_and_flags_keep_their_meaning(cifar_shards, colour_shards):
    cfg = resolved("--shards", cifar_shards, "--device", "cpu")
    stats = read_manifest(cifar_shards)["pixel_stats"]
    assert (cfg.recipe, cfg.val_split, cfg.image_size, cfg.crop, cfg.stem) == ("cifar", "test", 32, "padded", "cifar")
    assert (cfg.weight_decay, cfg.batch_size, cfg.lr) == (5e-4, 128, 0.1)
    assert list(cfg.mean) == stats["mean"] and list(cfg.std) == stats["std"]
    # Anything given wins, with its own meaning.
    cfg = resolved("--shards", cifar_shards, "--device", "cpu", "--wd", "1e-4", "-b", "64", "--stem", "imagenet",
                   "--image-size", "40", "--val-split", "train")
    assert (cfg.weight_decay, cfg.batch_size, cfg.stem, cfg.image_size, cfg.val_split) == (1e-4, 64, "imagenet", 40,
                                                                                           "train")
    with pytest.raises(UsageError, match="--val-split 'val'"):
        resolved("--shards", cifar_shards, "--device", "cpu", "--val-split", "val")
    # ImageNet-like shards keep the seed's recipe.
    cfg = resolved("--shards", colour_shards, "--device", "cpu")
    assert (cfg.recipe, cfg.val_split, cfg.image_size, cfg.crop, cfg.stem) == ("imagenet", "val", 224, "resized",
                                                                               "imagenet")
    assert (cfg.weight_decay, cfg.batch_size) == (1e-4, 256) and cfg.mean == (0.485, 0.456, 0.406)
    assert resolved("--shards", colour_shards, "--device", "cpu", "--recipe", "cifar").crop == "padded"


def test_the_cifar_recipe_keeps_its_rate_per_sample_at_another_batch(cifar_shards):
    # lr 0.1 belongs to batch 128: -b 16 without --lr gets 0.0125, not 0.1 (8x the rate per sample).
    assert resolved("--shards", cifar_shards, "--device", "cpu").lr == 0.1
    assert resolved("--shards", cifar_shards, "--device", "cpu", "-b", "16").lr == pytest.approx(0.0125)
    assert resolved("--shards", cifar_shards, "--device", "cpu", "-b", "256").lr == pytest.approx(0.2)
    assert resolved("--shards", cifar_shards, "--device", "cpu", "-b", "16", "--lr", "0.05").lr == 0.05  # given: kept
    assert resolved("--synthetic", "--device", "cpu", "-b", "16").lr == 0.1  # the seed's default stays the seed's


def test_warm_up_fits_the_run_unless_given():
    assert recipes.default_warm_up(137) == 5 and recipes.default_warm_up(90) == 5
    assert recipes.default_warm_up(4) == pytest.approx(0.4) and recipes.default_warm_up(12) == pytest.approx(1.2)
    assert resolved("--synthetic", "--device", "cpu", "--epochs", "4").warm_up_epochs == pytest.approx(0.4)
    assert resolved("--synthetic", "--device", "cpu", "--epochs", "4", "--warm-up-epochs", "5").warm_up_epochs == 5
    from train.run import lr_at

    cfg = resolved("--synthetic", "--device", "cpu", "--epochs", "4", "--lr", "0.1")
    lrs = [lr_at(cfg, e / 10) for e in range(40)]
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01  # it peaks, then decays within the run


def test_cifar_stem_is_a_3x3_stride_1_conv_without_max_pool():
    from train.devices import resolve_device
    from train.precision import Precision
    from train.step import build

    p = Precision("O0", torch.float32, None, "cpu")
    model, _, _ = build("resnet18", 10, resolve_device("cpu"), p, 0.1, 0.9, 5e-4, stem="cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    out = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 32, 32))))))
    assert out.shape[-1] == 32  # no downsampling before the first stage


def test_train_run_on_cifar_shards_evaluates_on_test_at_32_px(cifar_shards, tmp_path):
    # The recipe's own lr at -b 16 (0.0125). At 4x that (--lr 0.05) the 12 steps were chaotic: val
    # top-1 ended anywhere from 17 % to 100 % with the seed, and with the ISA (AVX2 against
    # AVX-512 rounding); at the recipe's rate every seed tried reached 100 % by epoch 3 on both.
    # 3 epochs (the schedule's own) ended at 100 % with seeds 3-5, and seeds 3 and 6 under an AVX2 cap.
    r = run_cli("train.run", "--shards", cifar_shards, "--arch", "resnet18", "--device", "cpu", "-j", "2",
                "-b", "16", "--epochs", "3", "--seed", "3", "--output", tmp_path / "run", timeout=600, warm=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "without evaluation" not in r.stderr and "=> recipe cifar: 32 px, crop padded, stem cifar" in r.stdout
    assert "lr 0.0125 peak" in r.stdout
    acc = [float(a) for a in re.findall(r"\* Acc@1 ([0-9.]+) Acc@5 [0-9.]+  \(val loss [0-9.]+, 18 samples\)",
                                        r.stdout)]
    assert len(acc) == 3 and acc[-1] >= 80.0, acc  # 6 colour classes: chance is 17 %
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["state_dict"]["conv1.weight"].shape == (64, 3, 3, 3)


def test_the_demo_sizes_its_run_from_the_measured_step(tmp_path, monkeypatch):
    from train import demo

    monkeypatch.setattr(demo, "DEMO_DATA", tmp_path)
    monkeypatch.setattr(demo, "DATASET", dict(classes=3, per_class=4, val_per_class=2, size=40))
    train_images = 3 * 4
    real_measure = demo.measure_step
    for rate in (0.5, 1.0, 10.0):
        # images per second that fit `epochs` epochs of 12 images into the budget
        monkeypatch.setattr(demo, "measure_step", lambda cfg, r=rate: r * train_images * 8 / demo.TRAIN_BUDGET_S)
        cfg, given = parse_args(["--demo"])
        cfg, given = demo.prepare_demo(cfg, given)
        assert cfg.epochs == max(demo.MIN_EPOCHS, min(demo.MAX_EPOCHS, int(8 * rate))) and "epochs" in given
        assert cfg.image_size == 48 and cfg.arch == "resnet18"
    cfg, given = parse_args(["--demo", "--epochs", "2"])
    assert demo.prepare_demo(cfg, given)[0].epochs == 2  # an explicit --epochs is kept, untimed
    # The timing itself runs the real step.
    cfg = demo.prepare_demo(*parse_args(["--demo", "--epochs", "1", "--device", "cpu"]))[0]
    assert real_measure(cfg, steps=1) > 0


def test_the_demo_never_mixes_a_cached_dataset_of_another_config_into_its_own(tmp_path, monkeypatch):
    from pipeline.shard_format import load_manifest
    from train import demo

    monkeypatch.setattr(demo, "DEMO_DATA", tmp_path)
    for classes in (4, 3):  # a cache of a 4-class config, then this demo's 3 classes
        monkeypatch.setattr(demo, "DATASET", dict(classes=classes, per_class=2, val_per_class=1, size=32))
        cfg, _ = demo.prepare_demo(*parse_args(["--demo", "--epochs", "1", "--device", "cpu"]))
        manifest = load_manifest(cfg.shards)
        assert len(manifest["classes"]) == classes
        assert sum(s["samples"] for s in manifest["splits"]["train"]["shards"]) == classes * 2
