"""Training recipes: what fits a dataset, chosen from its manifest, as defaults the flags override.

imagenet  the seed's recipe (pytorch/examples' imagenet/main.py): RandomResizedCrop(224) + flip;
          Resize(256) + CenterCrop(224) on `val`; ImageNet's normalization; torchvision's stem.
cifar     the usual CIFAR recipe: native 32 px, RandomCrop(32, padding=4) + flip, no resize on
          `test`; the training split's own normalization (the manifest's pixel_stats); a 3x3
          stride-1 stem without max-pool; weight decay 5e-4, batch 128, lr 0.1 (0.1 x b / 128 for
          another -b: the recipe's rate per sample).
fast      FFCV's time-to-accuracy bundle on the imagenet recipe (asked for by name, never detected):
          progressive resizing from about 0.7x the train size, reaching it at 85 % of the epochs;
          val at the train size x 256/224 (FixRes: test above the train size); label smoothing
          0.1; no weight decay on BatchNorm and bias; BlurPool; test-time flip; a linear warm-up
          (at most 2 epochs) and linear decay to 0. Each part is its own flag.

A recipe only fills what was not given: every flag keeps its meaning exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from kernels.normalize import IMAGENET_MEAN, IMAGENET_STD
from pipeline.resolution import ResolutionSchedule

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
    progressive: bool = False  # ramp the train size up from START_FRACTION of it
    val_ratio: float = 1.0     # val crop size / final train size
    warm_up_cap: float = 5.0   # the warm-up's epochs at most (and at most a tenth of the run)


# Progressive resizing's defaults: FFCV's ImageNet configs start at 160 px for 192-224 px and hold
# it to about 70 % of the epochs, then ramp to the final size by about 85 %.
START_FRACTION, RAMP_START, RAMP_END = 0.7, 0.7, 0.85

IMAGENET = Recipe("imagenet", "val", 224, "resized", IMAGENET_MEAN, IMAGENET_STD)
CIFAR = Recipe("cifar", "test", 32, "padded", CIFAR10_MEAN, CIFAR10_STD,
               {"weight_decay": 5e-4, "batch_size": 128, "lr": 0.1})
FAST = Recipe("fast", "val", 224, "resized", IMAGENET_MEAN, IMAGENET_STD,
              {"label_smoothing": 0.1, "no_bn_wd": True, "blurpool": True, "tta_flip": True, "schedule": "linear"},
              progressive=True, val_ratio=256 / 224, warm_up_cap=2.0)
RECIPES = {r.name: r for r in (IMAGENET, CIFAR, FAST)}


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


def default_warm_up(epochs: int, cap: float = 5.0) -> float:
    """The seed's 5 warm-up epochs (the recipe's `cap`), but never more than a tenth of the run: a
    warm-up longer than a short run leaves its learning rate rising to the end."""
    return min(cap, epochs / 10)


def default_size_step(size: int) -> int:
    """FFCV rounds progressive sizes to 32 px; small images (a CPU run's 64 px) need finer steps."""
    return 32 if size >= 128 else 8


def train_sizes(cfg: TrainConfig) -> ResolutionSchedule:
    """The train image size of each epoch, from a resolved config (`apply`): --image-size, or a
    ramp from --start-image-size to it."""
    if not cfg.start_image_size or cfg.start_image_size == cfg.image_size:
        return ResolutionSchedule.constant(cfg.image_size)
    return ResolutionSchedule(cfg.start_image_size, cfg.image_size, cfg.ramp_start_epoch, cfg.ramp_end_epoch,
                              cfg.size_step)


def _progressive(cfg: TrainConfig, given: set[str], recipe: Recipe, size: int) -> dict:
    """The progressive-resizing and val-size fields the command line left open."""
    updates = {}
    step = cfg.size_step or default_size_step(size)
    start = cfg.start_image_size
    if recipe.progressive and "start_image_size" not in given:
        start = max(8, int(round(START_FRACTION * size / step)) * step)
        updates["start_image_size"] = start
    if start:
        updates["size_step"] = step
        first = cfg.ramp_start_epoch if cfg.ramp_start_epoch >= 0 else int(round(RAMP_START * cfg.epochs))
        last = cfg.ramp_end_epoch if cfg.ramp_end_epoch >= 0 else int(round(RAMP_END * cfg.epochs))
        if first > last:
            flag = "--ramp-start-epoch" if "ramp_start_epoch" in given else "--ramp-end-epoch"
            raise UsageError(f"{flag}: the ramp would end (epoch {last}) before it starts (epoch {first})")
        updates["ramp_start_epoch"], updates["ramp_end_epoch"] = first, last
    if not cfg.val_size:
        updates["val_size"] = int(round(size * recipe.val_ratio))
    return updates


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
        updates["warm_up_epochs"] = default_warm_up(cfg.epochs, recipe.warm_up_cap)
    updates.update(_progressive(cfg, given, recipe, size))
    updates["mean"], updates["std"] = tuple(recipe.mean), tuple(recipe.std)
    if "val_split" in given and manifest is not None and cfg.val_split not in manifest["splits"]:
        raise UsageError(f"--val-split {cfg.val_split!r}: the shards have {', '.join(sorted(manifest['splits']))}")
    return replace(cfg, **updates), recipe


def describe(cfg: TrainConfig, world: int) -> str:
    """The resolved recipe and schedule, one line each, for the start of the log."""
    w = cfg.warm_up_epochs
    warm = f"linear warm-up over {w:g} epochs (from {cfg.lr / (w + 1):.4g}), " if w > 0 else ""
    val = f", val {cfg.val_size} px" if cfg.val_size and cfg.val_size != cfg.image_size else ""
    extras = [f"label smoothing {cfg.label_smoothing:g}"] if cfg.label_smoothing else []
    extras += [name for on, name in ((cfg.blurpool, "BlurPool"), (cfg.tta_flip, "test-time flip")) if on]
    return (f"=> recipe {cfg.recipe}: {train_sizes(cfg).describe()}{val}, crop {cfg.crop}, stem {cfg.stem}, "
            f"val split {cfg.val_split!r}, mean {list(cfg.mean)} std {list(cfg.std)}\n"
            f"=> schedule: {cfg.epochs} epochs, lr {cfg.lr:g} peak, {warm}{cfg.schedule} to 0; "
            f"weight decay {cfg.weight_decay:g}{' (not on BatchNorm and bias)' if cfg.no_bn_wd else ''}; "
            + "".join(f"{e}; " for e in extras) + f"batch {cfg.batch_size} x {world}")
