"""Convert CIFAR-10/100 (the python pickles, as downloaded) into WebDataset shards.

    python -m convert.cifar_to_shards --src PATH --out DIR      (or --out s3://bucket/prefix)

PATH is cifar-10-batches-py/, cifar-100-python/, or either .tar.gz archive unopened. Splits are
train and test; each sample is KEY.png (lossless, pixel-exact), KEY.cls and KEY.json (with the
coarse label for CIFAR-100).

A pickle can run code when it is loaded, so the files are read with an unpickler that admits
only what CIFAR files hold: dicts, lists, strings, bytes, ints and plain numeric numpy arrays.
"""
from __future__ import annotations

import argparse
import io
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shard_format import PNG_EXT, Sample, pixel_stats, sample_key

from .cli import add_output_options, finish
from .runner import ConvertError, Item, default_workers, format_summary, plan_shards, run_conversion

TOOL = "convert.cifar_to_shards"
_SAFE_DTYPES = {"u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8", "f4", "f8", "b1", "|u1", "<i8", "<i4"}

CIFAR10 = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"}
CIFAR100 = {"train": ["train"], "test": ["test"], "meta": "meta"}


class UnsafePickleError(ConvertError):
    pass


def _py2_str(obj):
    """Python 2 wrote its `str` as bytes: read under encoding="bytes" (as the CIFAR page says),
    the dtype codes of the real downloads arrive as b'u1' and b'b'."""
    return obj.decode("ascii") if isinstance(obj, bytes) and obj.isascii() else obj


def _safe_dtype(obj, align=False, copy=False):
    obj = _py2_str(obj)
    if not isinstance(obj, str) or obj not in _SAFE_DTYPES:
        raise UnsafePickleError(f"refused numpy dtype {obj!r} (only plain numeric dtypes are allowed)")
    return np.dtype(obj, bool(align), bool(copy))


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refused array subtype {subtype!r}")
    dtype = _py2_str(dtype)
    if not isinstance(dtype, np.dtype) and dtype not in _SAFE_DTYPES | {"b"}:
        raise UnsafePickleError(f"refused numpy dtype {dtype!r} (only plain numeric dtypes are allowed)")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3's protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals that a pickled numeric ndarray and pickled bytes need, each
    wrapped so that it can build nothing else; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused pickle global {module}.{name}: not part of a CIFAR file") from None


def safe_load(data: bytes, origin: str) -> dict:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{origin}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ConvertError(f"{origin}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{origin}: expected a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _Source:
    """Reads named members from a CIFAR folder or from the .tar.gz archive, unopened."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.files = {p.name: p for p in path.rglob("*") if p.is_file()}
            self.tar = None
        elif path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError) as e:
                raise ConvertError(f"--src {path}: not a CIFAR folder or archive ({e})") from None
            self.files = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
        else:
            raise ConvertError(f"--src {path}: no such file or directory")

    def variant(self) -> dict:
        if all(n in self.files for n in CIFAR10["train"] + CIFAR10["test"] + [CIFAR10["meta"]]):
            return CIFAR10
        if all(n in self.files for n in CIFAR100["train"] + CIFAR100["test"] + [CIFAR100["meta"]]):
            return CIFAR100
        raise ConvertError(f"--src {self.path}: holds neither the CIFAR-10 nor the CIFAR-100 python files")

    def load(self, name: str) -> dict:
        if self.tar is None:
            data = self.files[name].read_bytes()
        else:
            data = self.tar.extractfile(self.files[name]).read()  # read bytes only; nothing is extracted
        return safe_load(data, f"{self.path}:{name}")


def _names(meta: dict, key: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise ConvertError(f"CIFAR meta file lacks a list of {key}")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _batch_arrays(batch: dict, origin: str, label_key: str) -> tuple[np.ndarray, list, list | None]:
    data = batch.get("data")
    labels = batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConvertError(f"{origin}: 'data' is not a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise ConvertError(f"{origin}: '{label_key}' is not a list of {len(data)} ints")
    coarse = batch.get("coarse_labels")
    return data, labels, coarse


def encode_cifar(item: Item, options: dict) -> tuple[Sample, int]:
    """Encoder: one CIFAR row (3072 bytes, planar RGB) -> KEY.png, KEY.cls, KEY.json."""
    pixels, coarse = item.source
    hwc = np.frombuffer(pixels, np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at every level; the fast one keeps conversion quick.
    Image.fromarray(np.ascontiguousarray(hwc), "RGB").save(buf, format="PNG", compress_level=1)
    meta = {"path": item.path, "label": item.label, "width": 32, "height": 32}
    if coarse is not None:
        meta["coarse_label"] = coarse
    return Sample(buf.getvalue(), PNG_EXT, item.label, meta), len(pixels)


def convert(src: Path, out: Path | str, shard_size_mb: float = 32, seed: int = 49, workers: int | None = None,
            progress: bool = True, staging: Path | None = None) -> tuple[dict, str]:
    t0 = time.perf_counter()
    source = _Source(src)
    variant = source.variant()
    meta = source.load(variant["meta"])
    cifar100 = variant is CIFAR100
    classes = _names(meta, "fine_label_names" if cifar100 else "label_names")
    label_key = "fine_labels" if cifar100 else "labels"
    options = {"seed": seed, "shard_size_mb": shard_size_mb, "variant": "cifar100" if cifar100 else "cifar10"}
    planned, extra = {}, {"image_size": [32, 32]}
    for split in ("train", "test"):
        rows, pixels = [], []
        for name in variant[split]:
            batch = source.load(name)
            data, labels, coarse = _batch_arrays(batch, f"{src}:{name}", label_key)
            if split == "train":
                pixels.append(data)
            for i in range(len(data)):
                if not 0 <= labels[i] < len(classes):
                    raise ConvertError(f"{src}:{name}: label {labels[i]} of row {i} is out of range")
                rows.append((f"{name}/{i}", labels[i], data[i].tobytes(), coarse[i] if coarse else None))
        order = np.random.default_rng(seed).permutation(len(rows)) if split == "train" else range(len(rows))
        # PNG of CIFAR is about 3 KB; only used to cut shards.
        items = [Item(sample_key(j), f"{split}/{rows[i][0]}", rows[i][1], 3100, (rows[i][2], rows[i][3]))
                 for j, i in enumerate(order)]
        planned[split] = plan_shards(split, items, int(shard_size_mb * 1e6), encode_cifar, options)
        if split == "train":
            # The rows are planar RGB (3 x 1024): the normalization a training recipe wants.
            extra["pixel_stats"] = pixel_stats(np.concatenate(pixels).reshape(-1, 3, 1024))
    if cifar100:
        extra["coarse_classes"] = _names(meta, "coarse_label_names")
    manifest, reports = run_conversion(out, TOOL, classes, planned, options, workers or default_workers(),
                                       strict=True, extra=extra, progress=progress, staging=staging)
    return manifest, format_summary(reports, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, type=Path, help="cifar-10-batches-py/, cifar-100-python/ or the .tar.gz")
    add_output_options(p)
    p.add_argument("--shard-size-mb", type=float, default=32, help="target shard size in MB (default 32)")
    p.add_argument("--seed", type=int, default=49, help="train shuffle seed (default 49)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.shard_size_mb <= 0:
        p.error("--shard-size-mb must be positive")
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be >= 1")
    return finish(lambda: convert(a.src, a.out, a.shard_size_mb, a.seed, a.workers, progress=not a.no_progress,
                                  staging=a.staging))


if __name__ == "__main__":
    raise SystemExit(main())
