"""convert.parquet_to_shards on files written here in exactly the Hugging Face hub's layout."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import bucket_files, collect, folder_files, jpeg_bytes, new_bucket, png_bytes, run_cli
from convert import parquet_to_shards, runner
from convert.parquet_to_shards import convert, main
from convert.runner import ConvertError
from pipeline.shard_format import load_manifest, read_index

# The features type `datasets` gives an Image column.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CLASSES = ["tench", "goldfish", "great white shark", "hen"]


def hub_file(path: Path, columns: dict[str, tuple[pa.DataType, list]], features: dict | None,
             row_group_size: int) -> None:
    """One parquet file as `datasets` writes it: the features JSON under the schema metadata key
    b"huggingface", several row groups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()} if features else None
    schema = pa.schema([(name, t) for name, (t, _) in columns.items()], metadata=meta)
    table = pa.table({name: pa.array(values, t) for name, (t, values) in columns.items()}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    assert pq.ParquetFile(path).num_row_groups == -(-table.num_rows // row_group_size)


def colour(label: int, n: int) -> tuple[int, int, int]:
    """A flat colour that says which row an image came from: red the class, green the row."""
    return 40 + 50 * label, 20 + (9 * n) % 220, 200 - 40 * label


def imagenet_features() -> dict:
    return {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}


@pytest.fixture(scope="module")
def hub_imagenet(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    """data/{train-0000k-of-00002, validation-00000-of-00001, test-00000-of-00001}.parquet, as the
    hub's ImageNet-1k; returns the folder and {display path: (label, expected RGB or None, kind)}."""
    root = tmp_path_factory.mktemp("hub") / "imagenet-1k"
    rng = np.random.default_rng(3)
    truth = {}
    n = 0
    for f in range(2):
        images, labels = [], []
        for row in range(24):
            label, n = int(rng.integers(0, 4)), n + 1
            rgb = colour(label, n)
            images.append({"bytes": jpeg_bytes(rgb, size=(40, 32)), "path": f"n{label}_{n}.JPEG"})
            labels.append(label)
            truth[f"data/train-0000{f}-of-00002.parquet:{row}"] = (label, rgb, "jpeg")
        hub_file(root / "data" / f"train-0000{f}-of-00002.parquet",
                 {"image": (IMAGE, images), "label": (pa.int64(), labels)}, imagenet_features(), 8)

    full = jpeg_bytes((50, 60, 70), size=(64, 48))
    val = [  # (bytes, label, expected RGB or reject reason, kind)
        (jpeg_bytes(colour(0, 100), size=(40, 32)), 0, colour(0, 100), "jpeg"),
        (jpeg_bytes((200, 40, 30), mode="CMYK"), 1, (200, 40, 30), "CMYK"),
        (jpeg_bytes((120, 120, 120), mode="L"), 2, (120, 120, 120), "L"),
        (png_bytes((10, 200, 30)), 3, (10, 200, 30), "PNG"),
        (full[: len(full) // 2], 1, "truncated", "reject"),
        (b"this is not an image\n" * 10, 2, "not an image", "reject"),
        (b"", 0, "empty", "reject"),
        (None, 3, "no image bytes", "reject"),
        (jpeg_bytes(colour(1, 101), size=(40, 32)), -1, "unlabelled (label -1)", "reject"),
        (jpeg_bytes(colour(3, 102), size=(40, 32)), 3, colour(3, 102), "jpeg"),
    ]
    images = [None if data is None else {"bytes": data, "path": None} for data, *_ in val]
    hub_file(root / "data" / "validation-00000-of-00001.parquet",
             {"image": (IMAGE, images), "label": (pa.int64(), [v[1] for v in val])}, imagenet_features(), 4)
    for row, (_, label, expect, kind) in enumerate(val):
        truth[f"data/validation-00000-of-00001.parquet:{row}"] = (label, expect, kind)
    # The hub's ImageNet test split: every label is -1.
    test = [{"bytes": jpeg_bytes(colour(0, 200 + i)), "path": None} for i in range(6)]
    hub_file(root / "data" / "test-00000-of-00001.parquet",
             {"image": (IMAGE, test), "label": (pa.int64(), [-1] * 6)}, imagenet_features(), 4)
    return root, truth


def read_samples(out: Path, split: str) -> list[dict]:
    """Every sample of a split in manifest (= key) order, with its members and its shard."""
    rows = []
    for shard in load_manifest(out)["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members: dict[str, dict] = {}
            for ti in tar.getmembers():
                key, ext = ti.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(ti).read()
        rows += [{"key": k, **m, "meta": json.loads(m["json"]), "shard": shard["name"]} for k, m in members.items()]
    return rows


def mean_rgb(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGB"
    return np.asarray(im, np.float64).reshape(-1, 3).mean(0)


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_hub_layout_round_trip(hub_imagenet, tmp_path):
    src, truth = hub_imagenet
    out = tmp_path / "out"
    manifest, summary = convert(src, out, shard_size_mb=0.004, workers=1, progress=False)
    assert manifest["classes"] == CLASSES and manifest["complete"] is True
    # validation-* is the val split; test-* has no labels at all, so it is left out and said so.
    assert set(manifest["splits"]) == {"train", "val"}
    assert "skipped test" in summary
    train, val = read_samples(out, "train"), read_samples(out, "val")
    assert len(train) == 48 and len(load_manifest(out)["splits"]["train"]["shards"]) > 2
    for s in train + val:
        label, rgb, kind = truth[s["meta"]["path"]]
        assert int(s["cls"]) == s["meta"]["label"] == label
        assert np.abs(mean_rgb(s["jpg"]) - rgb).max() < 6, (s["meta"]["path"], kind)
        assert "." not in s["key"]
    assert len({s["key"] for s in train}) == 48
    assert all(s["meta"]["source_path"].startswith(f"n{s['meta']['label']}_") for s in train)
    # Train is shuffled across the split, so shards mix classes; val keeps the files' order.
    assert [s["meta"]["path"] for s in train] != sorted(s["meta"]["path"] for s in train)
    assert len({s["meta"]["label"] for s in train if s["shard"] == "train-000000.tar"}) > 1
    assert [s["meta"]["path"] for s in val] == [p for p in truth if "validation" in p and truth[p][2] != "reject"]
    # Repairs, as the ImageFolder converter makes them.
    by_kind = {truth[s["meta"]["path"]][2]: s["meta"] for s in val}
    assert by_kind["CMYK"]["source_mode"] == "CMYK" and by_kind["L"]["source_mode"] == "L"
    assert by_kind["PNG"]["source_format"] == "PNG" and by_kind["PNG"]["reencoded"] is True
    # Damaged rows and the unlabelled one are rejected, named and counted, and the run goes on.
    rejects = {r["path"]: r["reason"] for r in manifest["splits"]["val"]["rejects"]}
    expected = {p: t[1] for p, t in truth.items() if t[2] == "reject"}
    assert set(rejects) == set(expected)
    for path, reason in expected.items():
        assert reason in rejects[path], (path, rejects[path])
        assert path in summary
    # The label table holds each sample's .cls, in tar order.
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["labels"] == [int(data[m["cls"][0]:sum(m["cls"])]) for _, m in read_index(out / shard["index"])]


def test_the_loader_reads_the_converted_pixels(hub_imagenet, tmp_path):
    from pipeline import create_loader

    src, truth = hub_imagenet
    out = tmp_path / "out"
    convert(src, out, splits=["val"], workers=1, progress=False)
    samples = read_samples(out, "val")
    loader = create_loader(out, split="val", batch_size=4, image_size=24, backend="cpu", device="cpu", workers=1,
                           normalize=False)
    seen = 0
    for ids, (x, y) in zip(loader.batch_sample_ids(0), collect(loader)):
        for sid, img, label in zip(ids, x, y):
            expect_label, rgb, _ = truth[samples[int(sid)]["meta"]["path"]]
            assert int(label) == expect_label
            got = img.float().mean((1, 2)).numpy()  # NCHW
            assert np.abs(got - rgb).max() < 8, (samples[int(sid)]["meta"]["path"], got, rgb)
            seen += 1
    assert seen == len(samples) == 5


def test_rows_are_read_one_row_group_at_a_time(hub_imagenet, tmp_path, monkeypatch):
    """Each train row group's images are read once (shards end at window ends), val's at most
    twice (a row group a shard boundary cuts), and no whole file is ever read."""
    src, _ = hub_imagenet
    reads: dict[tuple, int] = {}
    real, real_init = pq.ParquetFile.read_row_group, pq.ParquetFile.__init__

    def remember(self, source, *args, **kw):
        real_init(self, source, *args, **kw)
        self.name_for_test = Path(source).name

    def counting(self, i, columns=None, **kw):
        if columns == ["image"]:  # (the plan reads the label column alone)
            reads[(self.name_for_test, i)] = reads.get((self.name_for_test, i), 0) + 1
        return real(self, i, columns=columns, **kw)

    def whole_file(*args, **kw):
        raise AssertionError("a whole file was read")

    monkeypatch.setattr(pq.ParquetFile, "__init__", remember)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", whole_file)
    # These 40 x 32 images are CIFAR-like, so the recipe-hint scan reads train once more first.
    convert(src, tmp_path / "hinted", shard_size_mb=0.004, workers=1, progress=False)
    train = {k: v for k, v in reads.items() if k[0].startswith("train")}
    assert len(train) == 6 and set(train.values()) == {2}
    reads.clear()
    monkeypatch.setattr(parquet_to_shards, "STATS_MAX_SIDE", 16)  # as for ImageNet: no hint, one image read
    convert(src, tmp_path / "out", shard_size_mb=0.004, workers=1, progress=False)
    train = {k: v for k, v in reads.items() if k[0].startswith("train")}
    assert len(train) == 6 and sorted(train.values()) == [1, 1, 1, 1, 1, 2]
    val = {k: v for k, v in reads.items() if k[0].startswith("validation")}
    assert len(val) == 3 and max(val.values()) <= 2


@pytest.mark.parametrize("mode", ["chunks", "shards"])
def test_same_input_gives_identical_shards_for_any_worker_count(hub_imagenet, tmp_path, monkeypatch, mode):
    src, _ = hub_imagenet
    ref = tmp_path / "w1"
    convert(src, ref, shard_size_mb=0.004, workers=1, progress=False)
    monkeypatch.setattr(runner, "SHARDS_PER_WORKER", 0 if mode == "shards" else 10**9)
    convert(src, tmp_path / "w2", shard_size_mb=0.004, workers=2, progress=False)
    assert all_bytes(tmp_path / "w2") == all_bytes(ref)
    # Another seed, another train order.
    convert(src, tmp_path / "s50", shard_size_mb=0.004, seed=50, workers=1, progress=False)
    assert (tmp_path / "s50" / "train-000000.tar").read_bytes() != (ref / "train-000000.tar").read_bytes()


def test_resume_after_an_interruption(hub_imagenet, tmp_path, monkeypatch):
    src, _ = hub_imagenet
    ref = tmp_path / "ref"
    convert(src, ref, splits=["train"], shard_size_mb=0.001, workers=1, progress=False)
    n_shards = len(load_manifest(ref)["splits"]["train"]["shards"])
    assert n_shards >= 4

    real, calls = runner._write_shard, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while the third shard is being written
            raise KeyboardInterrupt
        return real(*args, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(runner, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, splits=["train"], shard_size_mb=0.001, workers=1, progress=False)
    monkeypatch.setattr(runner, "_write_shard", real)
    m = load_manifest(out)
    assert m["complete"] is False and len(m["splits"]["train"]["shards"]) == 2

    _, summary = convert(src, out, splits=["train"], shard_size_mb=0.001, workers=1, progress=False)
    row = next(line.split() for line in summary.splitlines() if line.strip().startswith("train"))
    assert int(row[3]) == 2  # the "kept" column: finished shards were not rewritten
    assert all_bytes(out) == all_bytes(ref)


def cifar_file(path: Path, n: int, seed: int, cifar100: bool) -> dict[int, tuple]:
    """CIFAR as the hub has it: `img` PNGs of 32 x 32 and `label` (CIFAR-10), or `fine_label` and
    `coarse_label` (CIFAR-100), each a ClassLabel."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        imgs.append({"bytes": buf.getvalue(), "path": None})
    fine = rng.integers(0, 100 if cifar100 else 10, n).tolist()
    if cifar100:
        coarse = rng.integers(0, 20, n).tolist()
        features = {"img": {"_type": "Image"},
                    "fine_label": {"names": [f"f{i}" for i in range(100)], "_type": "ClassLabel"},
                    "coarse_label": {"names": [f"k{i}" for i in range(20)], "_type": "ClassLabel"}}
        columns = {"img": (IMAGE, imgs), "fine_label": (pa.int64(), fine), "coarse_label": (pa.int64(), coarse)}
    else:
        coarse = [None] * n
        features = {"img": {"_type": "Image"}, "label": {"names": [f"c{i}" for i in range(10)], "_type": "ClassLabel"}}
        columns = {"img": (IMAGE, imgs), "label": (pa.int64(), fine)}
    hub_file(path, columns, features, 10)
    return {i: (pixels[i], fine[i], coarse[i]) for i in range(n)}


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_columns_and_lossless_pngs(tmp_path, variant):
    from train.recipes import detect

    folder = tmp_path / ("plain_text" if variant == "cifar10" else "cifar100")
    truth = {"train": cifar_file(folder / "train-00000-of-00001.parquet", 30, 1, variant == "cifar100"),
             "test": cifar_file(folder / "test-00000-of-00001.parquet", 12, 2, variant == "cifar100")}
    out = tmp_path / "out"
    manifest, _ = convert(tmp_path, out, workers=1, keep_png=True, progress=False)
    assert manifest["options"]["image_column"] == "img"
    assert manifest["options"]["label_column"] == ("label" if variant == "cifar10" else "fine_label")
    assert len(manifest["classes"]) == (10 if variant == "cifar10" else 100)
    for split, rows in truth.items():
        samples = read_samples(out, split)
        assert len(samples) == len(rows)
        for s in samples:
            pixels, fine, coarse = rows[int(s["meta"]["path"].rsplit(":", 1)[1])]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), pixels)  # pixel-exact
            assert int(s["cls"]) == fine and s["meta"].get("coarse_label") == coarse
    # What the CIFAR recipe reads: the image size and the train split's statistics.
    train = np.stack([v[0] for v in truth["train"].values()]).reshape(-1, 3) / 255.0
    assert manifest["image_size"] == [32, 32] and load_manifest(out)["image_size"] == [32, 32]
    assert np.allclose(manifest["pixel_stats"]["mean"], train.mean(0), atol=1e-4)
    assert np.allclose(manifest["pixel_stats"]["std"], train.std(0), atol=1e-4)
    assert detect(load_manifest(out)).name == "cifar"
    if variant == "cifar100":
        assert manifest["coarse_classes"][3] == "k3"


def test_numbered_classes_an_ambiguous_label_and_a_classes_file(tmp_path):
    imgs = [{"bytes": jpeg_bytes(colour(i % 3, i)), "path": None} for i in range(6)]
    # No features metadata and two integer columns: the converter cannot tell the label.
    hub_file(tmp_path / "src" / "train-00000-of-00001.parquet",
             {"image": (IMAGE, imgs), "a": (pa.int32(), [9] * 6), "b": (pa.int64(), [i % 3 for i in range(6)])},
             None, 4)
    with pytest.raises(ConvertError, match=r"label column.*a \(int32\).*b \(int64\).*--label-column"):
        convert(tmp_path / "src", tmp_path / "o", workers=1, progress=False)
    m, summary = convert(tmp_path / "src", tmp_path / "o", label_column="b", workers=1, progress=False)
    assert m["classes"] == ["0", "1", "2"] and "numbered" in summary
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nbird\n")
    m, _ = convert(tmp_path / "src", tmp_path / "o", label_column="b", classes_file=names, workers=1, progress=False)
    assert m["classes"] == ["cat", "dog", "bird"]
    with pytest.raises(ConvertError, match="label 9.*only 3 classes"):
        convert(tmp_path / "src", tmp_path / "o", label_column="a", classes_file=names, workers=1, progress=False)


def test_max_side_downscales(hub_imagenet, tmp_path):
    src, _ = hub_imagenet
    convert(src, tmp_path / "out", splits=["train"], max_side=16, quality=80, workers=1, progress=False)
    for s in read_samples(tmp_path / "out", "train"):
        assert max(Image.open(io.BytesIO(s["jpg"])).size) == 16
        assert (s["meta"]["source_width"], s["meta"]["quality"]) == (40, 80)


def test_cli_with_a_glob(hub_imagenet, tmp_path):
    src, _ = hub_imagenet
    r = run_cli("convert.parquet_to_shards", "--src", src / "data" / "train-*.parquet", "--out", tmp_path / "o",
                "--shard-size-mb", "0.004", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "o")
    assert set(m["splits"]) == {"train"} and m["splits"]["train"]["samples"] == 48
    # Display paths are relative to the folder the pattern's files share.
    assert m["splits"]["train"]["shards"] and read_samples(tmp_path / "o", "train")[0]["meta"]["path"].startswith(
        "train-0000")


@pytest.mark.parametrize("args,flag", [
    (["--quality", "101"], "--quality"),
    (["--workers", "0"], "--workers"),
    (["--shard-size-mb", "0"], "--shard-size-mb"),
    (["--splits", "nope"], "--splits"),
    (["--image-column", "label"], "--image-column"),
    (["--label-column", "image"], "--label-column"),
    (["--splits", "test"], "--splits"),  # the hub's test split has no labels
    (["--classes", "/nonexistent/classes.txt"], "--classes"),
])
def test_bad_flags_exit_nonzero_naming_the_flag(hub_imagenet, tmp_path, capsys, args, flag):
    src, _ = hub_imagenet
    try:
        rc = main(["--src", str(src), "--out", str(tmp_path / "o"), "--no-progress", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "error:" in err[-1] and flag in err[-1], err
    assert not list(tmp_path.glob("o/*.tar"))


def test_missing_sources_name_src(tmp_path, capsys):
    assert main(["--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["--src", str(tmp_path / "*.parquet"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "extra-00000.parquet").write_bytes(b"")
    assert main(["--src", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: --src") for line in lines), lines


def test_without_pyarrow_the_cli_names_the_package(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it gives
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    rc = main(["--src", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "pip install pyarrow" in err


def test_converts_straight_to_a_bucket(s3_env, tmp_path):
    """--out s3://...: the same bytes as a local conversion, manifest (with its recipe hints) included."""
    cifar_file(tmp_path / "src" / "plain_text" / "train-00000-of-00001.parquet", 30, 1, False)
    convert(tmp_path / "src", tmp_path / "local", workers=1, keep_png=True, progress=False)
    url = f"{new_bucket()}/cifar"
    r = run_cli("convert.parquet_to_shards", "--src", tmp_path / "src", "--out", url, "--staging", tmp_path / "staging",
                "--keep-png", "--workers", 1, "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    assert bucket_files(url) == folder_files(tmp_path / "local")


def test_converting_one_split_at_a_time_keeps_the_others(hub_imagenet, tmp_path):
    from convert.parquet_to_shards import convert

    src, _ = hub_imagenet
    convert(src, tmp_path / "whole", workers=1, progress=False)
    convert(src, tmp_path / "out", splits=["train"], workers=1, progress=False)
    convert(src, tmp_path / "out", splits=["val"], workers=1, progress=False)
    assert all_bytes(tmp_path / "out") == all_bytes(tmp_path / "whole")  # the manifest too: both splits
