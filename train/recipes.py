"""Training recipes: what fits a dataset, chosen from its manifest, as defaults the flags override.

imagenet  the seed's recipe (pytorch/examples' imagenet/main.py): RandomResizedCrop(224) + flip;
          Resize(256) + CenterCrop(224) on `val`; ImageNet's normalization; torchvision's stem.
cifar     the usual CIFAR recipe: native 32 px, RandomCrop(32, padding=4) + flip, no resize on
          `test`; the training split's own normalization (the manifest's pixel_stats); a 3x3
          stride-1 stem without max-pool; weight decay 5e-4, batch 128, lr 0.1 (0.1 x b / 128 for
          another -b: the recipe's rate per sample).

A recipe only fills what was not given: every flag keeps its meaning exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD

from .config import TrainConfig, UsageError

# The CIFAR statistics everyone quotes, for shards whose manifest carries none.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SMALL_IMAGE = 40  # "auto" stem: at or below this size (CIFAR, SVHN) the ImageNet stem loses too much


@dataclass(frozen=True)
class Recipe:
    name: str
    val_split: str
    image_size: int
    crop: str                  # pipeline.augment.Transform's crop
    mean: tuple
    std: tuple
    defaults: dict = field(default_factory=dict)  # TrainConfig fields the recipe sets unless given


IMAGENET = Recipe("imagenet", "val", 224, "resized", IMAGENET_MEAN, IMAGENET_STD)
CIFAR = Recipe("cifar", "test", 32, "padded", CIFAR10_MEAN, CIFAR10_STD,
               {"weight_decay": 5e-4, "batch_size": 128, "lr": 0.1})
RECIPES = {r.name: r for r in (IMAGENET, CIFAR)}


def detect(manifest: dict | None) -> Recipe:
    """The recipe a dataset's manifest asks for: cifar for the CIFAR converter's shards or any
    dataset of small fixed-size images, else imagenet."""
    if manifest is None:
        return IMAGENET
    size = manifest.get("image_size")
    if str(manifest.get("tool", "")).endswith("cifar_to_shards") or (size and max(size) <= SMALL_IMAGE):
        recipe = CIFAR
        stats = manifest.get("pixel_stats")
        if stats:
            recipe = replace(recipe, mean=tuple(stats["mean"]), std=tuple(stats["std"]))
        if size:
            recipe = replace(recipe, image_size=int(max(size)))
        return recipe
    return IMAGENET


def default_warm_up(epochs: int) -> float:
    """The seed's 5 warm-up epochs, but never more than a tenth of the run: a warm-up longer
    than a short run leaves its learning rate rising to the end."""
    return min(5.0, epochs / 10)


def apply(cfg: TrainConfig, given: set[str], manifest: dict | None) -> tuple[TrainConfig, Recipe]:
    """The config with the recipe's choices for everything the command line left open."""
    recipe = detect(manifest)
    if cfg.recipe != "auto" and cfg.recipe != recipe.name:
        recipe = RECIPES[cfg.recipe]
    updates = {k: v for k, v in recipe.defaults.items() if k not in given}
    if "lr" in updates and "batch_size" in given and "batch_size" in recipe.defaults:
        # The recipe's lr belongs to its batch: at another -b it keeps the rate per sample (the
        # linear scaling rule). Left at 0.1, -b 16 steps 8x harder per sample; at 4x, 12 steps on a
        # small CIFAR set already swung between chance and 100 % top-1 with the seed and the ISA.
        updates["lr"] = recipe.defaults["lr"] * cfg.batch_size / recipe.defaults["batch_size"]
    updates["recipe"] = recipe.name
    for name, value in (("val_split", recipe.val_split), ("image_size", recipe.image_size), ("crop", recipe.crop)):
        if not getattr(cfg, name):
            updates[name] = value
    size = updates.get("image_size", cfg.image_size)
    if cfg.stem == "auto":
        updates["stem"] = "cifar" if size <= SMALL_IMAGE else "imagenet"
    if cfg.warm_up_epochs is None:
        updates["warm_up_epochs"] = default_warm_up(cfg.epochs)
    updates["mean"], updates["std"] = tuple(recipe.mean), tuple(recipe.std)
    if "val_split" in given and manifest is not None and cfg.val_split not in manifest["splits"]:
        raise UsageError(f"--val-split {cfg.val_split!r}: the shards have {', '.join(sorted(manifest['splits']))}")
    return replace(cfg, **updates), recipe


def describe(cfg: TrainConfig, world: int) -> str:
    """The resolved recipe and schedule, one line each, for the start of the log."""
    w = cfg.warm_up_epochs
    warm = f"linear warm-up over {w:g} epochs (from {cfg.lr / (w + 1):.4g}), " if w > 0 else ""
    return (f"=> recipe {cfg.recipe}: {cfg.image_size} px, crop {cfg.crop}, stem {cfg.stem}, "
            f"val split {cfg.val_split!r}, mean {list(cfg.mean)} std {list(cfg.std)}\n"
            f"=> schedule: {cfg.epochs} epochs, lr {cfg.lr:g} peak, {warm}cosine to 0; "
            f"weight decay {cfg.weight_decay:g}; batch {cfg.batch_size} x {world}")
