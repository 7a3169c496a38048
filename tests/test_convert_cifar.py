from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from convert.cifar_to_shards import RestrictedUnpickler, UnsafePickleError, convert, safe_load
from pipeline.shard_format import load_manifest


def _dump(obj, path: Path) -> None:
    # Protocol 2, as the published files use.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar(root: Path, variant: str, n_train=(7, 5, 6, 4, 3), n_test=9, seed=0) -> dict:
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
        _dump(d, root / name)
        for i in range(n):
            truth[(split, name, i)] = (data[i], labels[i], coarse[i])

    root.mkdir(parents=True)
    if variant == "cifar10":
        for b, n in enumerate(n_train, 1):
            batch(f"data_batch_{b}", n, "train")
        batch("test_batch", n_test, "test")
        _dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 10000},
              root / "batches.meta")
    else:
        batch("train", sum(n_train), "train")
        batch("test", n_test, "test")
        _dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
               b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}, root / "meta")
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
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_round_trip_is_pixel_exact(tmp_path, variant, archive):
    folder = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    truth = make_cifar(tmp_path / "raw" / folder, variant)
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
