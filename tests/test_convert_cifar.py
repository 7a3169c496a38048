from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from convert.cifar_to_shards import RestrictedUnpickler, UnsafePickleError, convert, safe_load
from pipeline.shard_format import load_manifest


class Py2Pickler(pickle._Pickler):
    """Writes pickles in the layout of the published CIFAR files, which Python 2's cPickle wrote
    (protocol 2): every bytes and str object as a py2 `str` (SHORT_BINSTRING / BINSTRING), arrays
    rebuilt through `numpy.core.multiarray._reconstruct`, dtypes as ('u1', 0, 1)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        n = len(data)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    def reducer_override(self, obj):
        if isinstance(obj, np.dtype):
            return np.dtype, (obj.str[1:], 0, 1), obj.__reduce__()[2]
        return NotImplemented


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_py2_pickler_writes_the_published_layout():
    data = py2_pickle({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]})
    # The opening bytes of the real data_batch_N files: a py2 str key, then numpy's reconstructor.
    assert data.startswith(b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray")
    assert b"cnumpy\ndtype\nq\tU\x02u1q\nK\x00K\x01\x87" in data and b"_codecs" not in data


def _dump(obj, path: Path, writer: str = "py2") -> None:
    # Protocol 2, as the published files use; "py3" as Python 3 would write them.
    path.write_bytes(py2_pickle(obj) if writer == "py2" else pickle.dumps(obj, protocol=2))


def make_cifar(root: Path, variant: str, n_train=(7, 5, 6, 4, 3), n_test=9, seed=0, writer: str = "py2") -> dict:
    """Write CIFAR-shaped pickles; return the rows {(split, batch, i): (pixels, label, coarse)}."""
    rng = np.random.default_rng(seed)
    truth = {}

    def batch(name, n, split):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        if variant == "cifar10":
            labels = [int(v) for v in rng.integers(0, 10, n)]
            d = {b"batch_label": b"x", b"labels": labels, b"data": data,
                 b"filenames": [f"f{i}.png".encode() for i in range(n)]}
            coarse = [None] * n
        else:
            labels = [int(v) for v in rng.integers(0, 100, n)]
            coarse = [int(v) for v in rng.integers(0, 20, n)]
            d = {b"filenames": [b"f"] * n, b"batch_label": b"x", b"fine_labels": labels,
                 b"coarse_labels": coarse, b"data": data}
        _dump(d, root / name, writer)
        for i in range(n):
            truth[(split, name, i)] = (data[i], labels[i], coarse[i])

    root.mkdir(parents=True)
    if variant == "cifar10":
        for b, n in enumerate(n_train, 1):
            batch(f"data_batch_{b}", n, "train")
        batch("test_batch", n_test, "test")
        _dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 10000},
              root / "batches.meta", writer)
    else:
        batch("train", sum(n_train), "train")
        batch("test", n_test, "test")
        _dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
               b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}, root / "meta", writer)
    return truth


def read_split(out: Path, split: str):
    m = load_manifest(out)
    rows = []
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            mem = {}
            for ti in tar.getmembers():
                key, ext = ti.name.split(".", 1)
                mem.setdefault(key, {})[ext] = tar.extractfile(ti).read()
        rows += [mem[k] for k in sorted(mem)]
    return m, rows


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive,writer", [(False, "py2"), (True, "py2"), (False, "py3")])
def test_cifar_round_trip_is_pixel_exact(tmp_path, variant, archive, writer):
    folder = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    truth = make_cifar(tmp_path / "raw" / folder, variant, writer=writer)
    src = tmp_path / "raw" / folder
    if archive:
        src = tmp_path / f"{folder}.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(tmp_path / "raw" / folder, arcname=folder)
    out = tmp_path / "out"
    convert(src, out, workers=1, progress=False)
    m = load_manifest(out)
    assert set(m["splits"]) == {"train", "test"}
    assert len(m["classes"]) == (10 if variant == "cifar10" else 100)
    if variant == "cifar100":
        assert m["coarse_classes"][3] == "k3"
    # The train split's per-channel statistics, for the CIFAR recipe's normalization.
    train = np.stack([v[0] for k, v in truth.items() if k[0] == "train"]).reshape(-1, 3, 1024) / 255.0
    assert m["image_size"] == [32, 32] and m["pixel_stats"]["split"] == "train"
    assert np.allclose(m["pixel_stats"]["mean"], train.mean(axis=(0, 2)), atol=1e-4)
    assert np.allclose(m["pixel_stats"]["std"], train.std(axis=(0, 2)), atol=1e-4)
    for split in ("train", "test"):
        _, rows = read_split(out, split)
        assert len(rows) == sum(1 for k in truth if k[0] == split)
        seen = set()
        for row in rows:
            meta = json.loads(row["json"])
            _, name, i = meta["path"].split("/")
            pixels, label, coarse = truth[(split, name, int(i))]
            img = np.asarray(Image.open(io.BytesIO(row["png"])))
            assert img.shape == (32, 32, 3)
            assert np.array_equal(img, pixels.reshape(3, 32, 32).transpose(1, 2, 0))
            assert int(row["cls"]) == label == meta["label"]
            assert meta.get("coarse_label") == coarse
            seen.add((name, int(i)))
        assert len(seen) == len(rows)
        # The manifest's label table holds every sample's label, in tar order.
        assert [v for s in m["splits"][split]["shards"] for v in s["labels"]] == [int(r["cls"]) for r in rows]
    # Test keeps its natural order; train is shuffled.
    _, test_rows = read_split(out, "test")
    assert [json.loads(r["json"])["path"] for r in test_rows] == \
        [f"test/{'test_batch' if variant == 'cifar10' else 'test'}/{i}" for i in range(9)]


def test_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({b"data": Evil()}, protocol=2)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_load(payload, "evil")
    assert not marker.exists()

    # The same payload as a CIFAR batch file, through the CLI.
    src = tmp_path / "cifar-10-batches-py"
    make_cifar(src, "cifar10")
    (src / "data_batch_3").write_bytes(payload)
    r = run_cli("convert.cifar_to_shards", "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and "refused pickle global" in r.stderr
    assert not marker.exists()


def test_unpickler_refuses_object_arrays():
    arr = np.array([{"a": 1}], dtype=object)
    with pytest.raises(UnsafePickleError):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(arr, protocol=2)), encoding="bytes").load()


def test_cifar_cli_errors(tmp_path):
    r = run_cli("convert.cifar_to_shards", "--src", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--src" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("convert.cifar_to_shards", "--src", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.returncode == 2 and "neither" in r.stderr
