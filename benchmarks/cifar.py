"""CIFAR side by side: loaders, and the training recipe, against torchvision's CIFAR10 reference.

    python -m benchmarks.cifar loader [--per-class 5000 --batch-size 512 --repeats 3] [--src DIR]
    python -m benchmarks.cifar recipe [--per-class 300 --epochs 6 --seeds 49 1]    [--src DIR]

The data is the project's learnable synthetic task written as CIFAR-10's python files
(`convert.synthetic --format cifar`: shapes rendered at 64 px, downscaled to 32), or your own
`cifar-10-batches-py` with --src.

loader: images/s of a full train epoch (RandomCrop(32, padding=4) + flip, uint8 out), median of
--repeats after a warm-up epoch: torchvision's CIFAR10 + DataLoader (the reference), our cpu
backend (per sample, 1 and 2 workers) and our resident backend (decoded once, one gather per batch).

recipe: top-1 on the test split after the same epochs, per seed: `train.run` on the shards (the
cifar recipe it picks from the manifest) against the usual torchvision CIFAR script (ResNet-18
with the CIFAR stem, SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, cosine, the same crops and
flips, torchvision's CIFAR10 dataset), both fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import DEFAULT_CACHE, print_machine, table, timed, write_json

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_like(per_class: int, test_per_class: int, cache: Path = DEFAULT_CACHE) -> Path:
    from convert.synthetic import SyntheticConfig, generate_cifar

    cfg = SyntheticConfig(classes=10, per_class=per_class, val_per_class=test_per_class, size=64)
    return generate_cifar(cache / f"cifar_like_{per_class}x{test_per_class}", cfg, progress=False)


def shards_for(src: Path) -> Path:
    from convert.cifar_to_shards import convert
    from pipeline.shard_format import is_complete

    out = src.parent / f"{src.name}_shards"
    if not is_complete(out):
        convert(src, out, progress=False)
    return out


def reference_loader(src: Path, workers: int, batch: int, train: bool = True):
    """torchvision's CIFAR10 over the same python files, with the usual transform."""
    from torchvision import datasets, transforms

    class Files(datasets.CIFAR10):
        """torchvision's CIFAR10 without its check of the official files' MD5 sums (the synthetic
        task's files differ); it reads them exactly as it reads the real ones."""

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
    tf += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    ds = Files(str(src.parent), train=train, transform=transforms.Compose(tf), download=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=train, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=train)


def _link_as_torchvision_root(src: Path) -> Path:
    """torchvision's CIFAR10 wants ROOT/cifar-10-batches-py: give it one that points at `src`."""
    if src.name == "cifar-10-batches-py":
        return src
    root = Path(tempfile.mkdtemp(prefix="cifar-root-"))
    (root / "cifar-10-batches-py").symlink_to(src.resolve())
    return root / "cifar-10-batches-py"


def loader_benchmark(a, argv) -> int:
    from pipeline import create_loader

    src = _link_as_torchvision_root(Path(a.src)) if a.src else cifar_like(a.per_class, a.per_class // 5)
    shards = shards_for(src)
    bs, rows = a.batch_size, []

    def rate(loader) -> float:
        def once():
            return sum(len(y) for _, y in loader)
        return timed(once, repeats=a.repeats, warmup=1)["median"]

    for w in a.workers:
        rows.append({"name": f"reference: torchvision CIFAR10 + DataLoader, {w} workers",
                     "img_s": rate(reference_loader(src, w, bs))})
    ref = rows[-1]["img_s"]
    common = dict(batch_size=bs, image_size=32, device="cpu", crop="padded", normalize=False)
    for w in a.workers:
        ld = create_loader(shards, backend="cpu", workers=w, **common)
        rows.append({"name": f"ours cpu (per sample), {w} workers, uint8", "img_s": rate(ld)})
        ld.close()
    for normalize in (False, True):
        ld = create_loader(shards, backend="resident", workers=max(a.workers), **{**common, "normalize": normalize})
        out = "bf16 normalized" if normalize else "uint8"
        rows.append({"name": f"ours resident (one gather per batch), {out}", "img_s": rate(ld)})
        ld.close()
    for r in rows:
        r["vs_ref"] = r["img_s"] / ref
    print(table(rows, [("name", "loader, RandomCrop(32, 4) + flip", "s"), ("img_s", "img/s", ".0f"),
                       ("vs_ref", "x reference", ".2f")]))
    path = write_json("cifar_loader", {"rows": rows, "batch_size": bs, "cores": len(os.sched_getaffinity(0)),
                                       "command": "python -m benchmarks.cifar " + " ".join(argv or [])},
                      machine=a.machine)
    print(f"wrote {path}")
    return 0


REFERENCE_SCRIPT = r"""
import json, sys, torch, torchvision
sys.path.insert(0, {root!r})
from benchmarks.cifar import reference_loader
from train.step import cifar_stem
from pathlib import Path
src, epochs, seed, classes = Path({src!r}), {epochs}, {seed}, {classes}
torch.manual_seed(seed)
model = cifar_stem(torchvision.models.resnet18(num_classes=classes)).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
train, test = reference_loader(src, 2, 128), reference_loader(src, 2, 256, train=False)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train))
loss_fn = torch.nn.CrossEntropyLoss()
for epoch in range(epochs):
    model.train()
    for x, y in train:
        loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
model.eval()
correct = n = 0
with torch.no_grad():
    for x, y in test:
        correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        n += len(y)
print(json.dumps({{"acc1": 100.0 * correct / n}}))
"""


def recipe_benchmark(a, argv) -> int:
    src = _link_as_torchvision_root(Path(a.src)) if a.src else cifar_like(a.per_class, a.per_class // 5)
    shards = shards_for(src)
    root = str(Path(__file__).resolve().parent.parent)
    classes = len(json.loads((shards / "manifest.json").read_text())["classes"])
    env = dict(os.environ, PYTHONPATH=root)
    rows = []
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as out:
            r = subprocess.run([sys.executable, "-m", "train.run", "--shards", str(shards), "--arch", "resnet18",
                                "--device", "cpu", "-j", "2", "--epochs", str(a.epochs), "--seed", str(seed),
                                "--output", out, "--eval-every", "0"], capture_output=True, text=True, env=env,
                               cwd=root)
        accs = re.findall(r"\* Acc@1 ([0-9.]+)", r.stdout)
        ours = float(accs[-1]) if r.returncode == 0 and accs else None
        code = REFERENCE_SCRIPT.format(root=root, src=str(src), epochs=a.epochs, seed=seed, classes=classes)
        r2 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
        ref = json.loads(r2.stdout.strip().splitlines()[-1])["acc1"] if r2.returncode == 0 else None
        rows.append({"seed": seed, "ours": ours, "reference": ref})
        print(f"seed {seed}: train.run {ours}  reference {ref}", flush=True)
        if ours is None or ref is None:
            print((r.stderr if ours is None else r2.stderr)[-2000:], file=sys.stderr)
    done = [r for r in rows if r["ours"] is not None and r["reference"] is not None]
    if done:
        rows.append({"seed": "mean", "ours": float(np.mean([r["ours"] for r in done])),
                     "reference": float(np.mean([r["reference"] for r in done]))})
    print(table(rows, [("seed", "seed", ""), ("ours", "train.run top-1", ".2f"), ("reference", "torchvision top-1",
                                                                                 ".2f")]))
    path = write_json("cifar_recipe", {"rows": rows, "epochs": a.epochs, "train_images": 10 * a.per_class,
                                       "command": "python -m benchmarks.cifar " + " ".join(argv or [])},
                      machine=a.machine)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv  # the JSON's command, also when run from the shell
    p = argparse.ArgumentParser(prog="python -m benchmarks.cifar", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("loader", "recipe"))
    p.add_argument("--src", default=None, help="your own cifar-10-batches-py (default: the synthetic task)")
    p.add_argument("--per-class", type=int, default=None, help="train images per class (loader 5000, recipe 300)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[49, 1])
    a = p.parse_args(argv)
    a.per_class = a.per_class or (5000 if a.what == "loader" else 300)
    a.machine = print_machine()
    return loader_benchmark(a, argv) if a.what == "loader" else recipe_benchmark(a, argv)


if __name__ == "__main__":
    raise SystemExit(main())
