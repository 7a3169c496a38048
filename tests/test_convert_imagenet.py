from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, jpeg_bytes, run_cli
from convert import images
from convert.imagenet_to_shards import convert
from convert.runner import ConvertError
from convert.synthetic import SyntheticConfig, generate
from pipeline.shard_format import ShardWriter, load_manifest, read_index


def read_samples(out: Path, split: str) -> dict[str, dict]:
    """Every sample of a split, read with tarfile, keyed by its source path."""
    m = load_manifest(out)
    samples = {}
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = {}
            for ti in tar.getmembers():
                key, ext = ti.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(ti).read()
        for key, mem in members.items():
            meta = json.loads(mem["json"])
            samples[meta["path"]] = {"key": key, **mem, "meta": meta, "shard": shard["name"]}
    return samples


def test_round_trip_labels_bytes_and_manifest(synthetic_root, tmp_path):
    out = tmp_path / "shards"
    manifest, summary = convert(synthetic_root, out, shard_size_mb=0.05, workers=2, progress=False)
    from torchvision.datasets import ImageFolder

    ref = ImageFolder(str(synthetic_root / "train"))
    assert manifest["classes"] == ref.classes
    samples = read_samples(out, "train")
    assert len(samples) == len(ref.samples) == manifest["splits"]["train"]["samples"]
    for path, label in ref.samples:
        rel = Path(path).relative_to(synthetic_root).as_posix()
        s = samples[rel]
        assert int(s["cls"]) == label == s["meta"]["label"]
        # RGB JPEGs pass through losslessly: the same pixels, with restart markers added.
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["jpg"]))), np.asarray(Image.open(path)))
        assert s["meta"].get("restart_interval", 0) > 0 or s["jpg"] == Path(path).read_bytes()
        w, h = Image.open(path).size
        assert (s["meta"]["width"], s["meta"]["height"]) == (w, h)
        assert s["meta"]["subsampling"] == "4:2:0" and s["meta"]["progressive"] is False
        assert "." not in s["key"]
    # Shards mix classes: the train order is shuffled, not sorted by folder.
    first = load_manifest(out)["splits"]["train"]["shards"][0]["name"]
    assert len({s["meta"]["label"] for s in samples.values() if s["shard"] == first}) > 1
    # Manifest hashes and sizes describe the files on disk.
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        # The label table holds each sample's .cls, in tar order.
        cls = [int(data[m["cls"][0]:sum(m["cls"])]) for _, m in read_index(out / shard["index"])]
        assert shard["labels"] == cls and len(cls) == shard["samples"]
    assert manifest["version"] == 2 and manifest["splits"]["val"]["samples"] == 6 * 3
    assert manifest["complete"] is True and manifest["rejects"] == []
    assert "train" in summary and "val" in summary


def test_dali_index_points_at_members(synthetic_root, tmp_path):
    out = tmp_path / "shards"
    convert(synthetic_root, out, splits=["val"], workers=1, progress=False)
    shard = load_manifest(out)["splits"]["val"]["shards"][0]
    data = (out / shard["name"]).read_bytes()
    index = [members for _, members in read_index(out / shard["index"])]
    assert len(index) == shard["samples"]
    with tarfile.open(out / shard["name"]) as tar:
        by_name = {ti.name: tar.extractfile(ti).read() for ti in tar.getmembers()}
    lines = (out / shard["index"]).read_text().splitlines()[1:]
    for line, sample in zip(lines, index):
        names = line.split()[3::4]
        for name, (ext, (off, size)) in zip(names, sample.items()):
            assert name.endswith("." + ext)
            assert data[off:off + size] == by_name[name]


def test_webdataset_reads_shards(synthetic_root, tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    manifest, _ = convert(synthetic_root, out, splits=["val"], workers=1, progress=False)
    urls = [str(out / s["name"]) for s in manifest["splits"]["val"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls")
    rows = list(ds)
    assert len(rows) == 18
    img, cls = rows[0]
    assert img.ndim == 3 and img.shape[2] == 3 and isinstance(cls, int)


def test_quirks_are_repaired_or_rejected(quirky_root, tmp_path):
    out = tmp_path / "shards"
    manifest, summary = convert(quirky_root, out, workers=1, progress=False)
    samples = read_samples(out, "train")
    rejects = {r["path"]: r["reason"] for r in manifest["rejects"]}
    assert set(rejects) == {"train/n002/truncated.JPEG", "train/n002/empty.JPEG", "train/n002/text.JPEG"}
    assert "truncated" in rejects["train/n002/truncated.JPEG"]
    assert "empty" in rejects["train/n002/empty.JPEG"]
    assert "not an image" in rejects["train/n002/text.JPEG"]
    for path in rejects:
        assert path in summary  # named in the summary, not only in the manifest
    expected = {"cmyk.JPEG": (200, 40, 30), "gray.JPEG": (120, 120, 120), "png_as_jpeg.JPEG": (10, 200, 30),
                "rgba.JPEG": (30, 60, 220)}
    for name, rgb in expected.items():
        s = samples[f"train/n002/{name}"]
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        mean = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0)
        assert np.abs(mean - rgb).max() < 6, (name, mean)
        assert s["meta"]["reencoded"] is True
    assert manifest["splits"]["train"]["samples"] == 4 + 4
    # .DS_Store and README.txt are ignored and counted, not rejected.
    assert manifest["splits"]["train"]["ignored"]["count"] == 2


def _hostile_root(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Good photos, and files that must be rejected (bombs, damaged data) or kept (harmless quirks)."""
    import jpeg_fixtures as fx

    src = tmp_path / "src"
    good, odd = src / "train" / "n001", src / "train" / "n002"
    good.mkdir(parents=True)
    odd.mkdir(parents=True)
    for i in range(3):
        (good / f"img_{i}.JPEG").write_bytes(fx.pil_jpeg(fx.photo(96, 72, seed=i)))
    photo = fx.pil_jpeg(fx.photo(160, 120, seed=5))
    tiny_progressive = fx.pil_jpeg(fx.photo(64, 48, seed=6), quality=50, progressive=True)
    files = {
        # 520 bytes claiming 16000 x 16000: Pillow's DecompressionBombError used to end the run.
        "bomb.JPEG": fx.with_dimensions(tiny_progressive, 16000, 16000),
        # Under Pillow's error threshold (it only warns), over the extension's multi-scan limit.
        "bomb_12k.JPEG": fx.with_dimensions(tiny_progressive, 12000, 12000),
        "huffman.JPEG": fx.damage_entropy(photo),
        "cut_scan.JPEG": fx.cut_scan(photo),
        "scan_twice.JPEG": fx.duplicate_scan(fx.pil_jpeg(fx.photo(160, 120, seed=7), progressive=True)),
        "extraneous.JPEG": fx.insert_before_eoi(photo, b"\x00" * 240),  # harmless: kept as is
    }
    for name, data in files.items():
        (odd / name).write_bytes(data)
    return src, files


@pytest.mark.skipif(getattr(images, "_jpeg", None) is None,
                    reason="kernels._jpeg not built: Pillow misses damaged data")
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("max_side", [None, 64])  # 64: the resize path, whose decode is the validation
def test_hostile_jpegs_are_rejected_and_the_run_goes_on(tmp_path, max_side):
    src, files = _hostile_root(tmp_path)
    manifest, summary = convert(src, tmp_path / "out", workers=2, max_side=max_side, progress=False)
    rejects = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in manifest["rejects"]}
    assert set(rejects) == {"bomb.JPEG", "bomb_12k.JPEG", "huffman.JPEG", "cut_scan.JPEG", "scan_twice.JPEG"}
    assert rejects["bomb.JPEG"].startswith("decompression bomb")
    assert rejects["bomb_12k.JPEG"].startswith("decompression bomb")
    for name in ("huffman.JPEG", "cut_scan.JPEG", "scan_twice.JPEG"):
        assert rejects[name].startswith("corrupt JPEG data"), rejects[name]
    samples = read_samples(tmp_path / "out", "train")
    assert len(samples) == 4
    kept = samples["train/n002/extraneous.JPEG"]["jpg"]  # accepted, its pixels intact
    if max_side is not None:
        assert Image.open(io.BytesIO(kept)).size == (64, 48)
        return
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept))),
                          np.asarray(Image.open(io.BytesIO(files["extraneous.JPEG"]))))


def test_without_the_extension_bombs_are_still_rejected(monkeypatch, tmp_path):
    """The Pillow fallback: a bomb is a reject, not a crash; repairs and truncation as before."""
    monkeypatch.setattr(images, "_jpeg", None)
    src, files = _hostile_root(tmp_path)
    with pytest.raises(images.RejectedImage, match="decompression bomb"):
        images.prepare_image(files["bomb.JPEG"])
    photo = (src / "train" / "n001" / "img_0.JPEG").read_bytes()
    assert images.prepare_image(photo).jpeg == photo
    with pytest.raises(images.RejectedImage, match="truncated"):
        images.prepare_image(photo[: len(photo) // 2])
    cmyk = jpeg_bytes((200, 40, 30), mode="CMYK")
    assert images.prepare_image(cmyk).meta["source_mode"] == "CMYK"


@pytest.mark.skipif(getattr(images, "_jpeg", None) is None, reason="kernels._jpeg not built")
def test_unsupported_by_the_extension_falls_back_to_pillow(monkeypatch):
    def unsupported(data):
        raise images._jpeg.UnsupportedJPEG("unsupported JPEG: pretend")

    monkeypatch.setattr(images._jpeg, "validate", unsupported)
    photo = jpeg_bytes((50, 60, 70), size=(200, 150))
    assert images.prepare_image(photo).jpeg == photo
    with pytest.raises(images.RejectedImage, match="truncated"):
        images.prepare_image(photo[: len(photo) // 2])  # Pillow's draft decode still reads it all


@pytest.mark.skipif(getattr(images, "_jpeg", None) is None, reason="kernels._jpeg not built")
def test_repairs_are_validated_too():
    """A CMYK file is re-encoded; damage in it must not be baked into the new JPEG."""
    import jpeg_fixtures as fx

    buf = io.BytesIO()
    Image.fromarray(fx.photo(160, 120, seed=3)).convert("CMYK").save(buf, "JPEG", quality=90)
    cmyk = buf.getvalue()
    assert images.prepare_image(cmyk).meta["reencoded"] is True
    with pytest.raises(images.RejectedImage, match="corrupt JPEG data"):
        images.prepare_image(fx.damage_entropy(cmyk))


def test_strict_makes_a_reject_fatal(quirky_root, tmp_path):
    r = run_cli("convert.imagenet_to_shards", "--src", quirky_root, "--out", tmp_path / "o", "--strict",
                "--workers", "1", "--no-progress")
    assert r.returncode != 0
    assert "--strict" in r.stderr and "n002/" in r.stderr
    assert not list((tmp_path / "o").glob("*.tar"))  # the shard holding the bad file never landed


@pytest.mark.parametrize("style", ["kaggle", "plain"])
def test_flat_val_layout(tmp_path, style):
    src = tmp_path / "src"
    for wnid in ("n01", "n02", "n03"):
        (src / "train" / wnid).mkdir(parents=True)
        (src / "train" / wnid / "t.JPEG").write_bytes(jpeg_bytes())
    (src / "val").mkdir()
    truth = {"ILSVRC2012_val_00000001": "n03", "ILSVRC2012_val_00000002": "n01",
             "ILSVRC2012_val_00000003": "n02"}
    for stem in truth:
        (src / "val" / f"{stem}.JPEG").write_bytes(jpeg_bytes())
    (src / "val" / "ILSVRC2012_val_00000009.JPEG").write_bytes(jpeg_bytes())  # not in the list
    if style == "kaggle":
        lines = ["ImageId,PredictionString"] + [f"{k},{v} 1 2 3 4 {v} 5 6 7 8" for k, v in truth.items()]
        labels = tmp_path / "LOC_val_solution.csv"
    else:
        lines = [f"{k}.JPEG {v}" for k, v in truth.items()]
        labels = tmp_path / "val_labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    manifest, _ = convert(src, tmp_path / "out", val_labels=labels, workers=1, progress=False)
    samples = read_samples(tmp_path / "out", "val")
    idx = {c: i for i, c in enumerate(manifest["classes"])}
    for stem, wnid in truth.items():
        assert int(samples[f"val/{stem}.JPEG"]["cls"]) == idx[wnid]
    assert [r["path"] for r in manifest["splits"]["val"]["rejects"]] == ["val/ILSVRC2012_val_00000009.JPEG"]
    # Val keeps its natural order.
    assert [s["meta"]["path"] for s in sorted(samples.values(), key=lambda s: s["key"])] == \
        [f"val/{k}.JPEG" for k in sorted(truth)]


def test_flat_val_needs_labels(tmp_path):
    (tmp_path / "src" / "val").mkdir(parents=True)
    (tmp_path / "src" / "val" / "a.JPEG").write_bytes(jpeg_bytes())
    with pytest.raises(ConvertError, match="--val-labels"):
        convert(tmp_path / "src", tmp_path / "out", progress=False)


def test_max_side_downscales_and_reencodes(tmp_path):
    src = tmp_path / "src"
    generate(src, SyntheticConfig(classes=2, per_class=3, val_per_class=0, size=300, seed=1), workers=1,
             progress=False)
    convert(src, tmp_path / "out", max_side=128, quality=80, workers=1, progress=False)
    for s in read_samples(tmp_path / "out", "train").values():
        im = Image.open(io.BytesIO(s["jpg"]))
        assert max(im.size) == 128
        assert (s["meta"]["width"], s["meta"]["height"]) == im.size
        assert max(s["meta"]["source_width"], s["meta"]["source_height"]) > 128
        assert s["meta"]["quality"] == 80


def _downscaled(arr: np.ndarray) -> tuple[np.ndarray, Image.Image]:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=95, subsampling="4:2:0")
    out = images.prepare_image(buf.getvalue(), max_side=256, quality=95)
    return np.asarray(Image.open(io.BytesIO(out.jpeg)).convert("RGB")).astype(np.float64), Image.open(buf)


def test_max_side_resize_keeps_geometry():
    """Pixels encode their source coordinates: a shifted, flipped or transposed downscale fails."""
    w, h = 640, 480
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    got, _ = _downscaled(np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full((h, w), 128)], -1))
    assert got.shape == (192, 256, 3)
    gx, gy = np.meshgrid((np.arange(256) + 0.5) * w / 256 - 0.5, (np.arange(192) + 0.5) * h / 192 - 0.5)
    inner = (slice(4, -4), slice(4, -4))  # away from the edges, where the filter clamps
    # The JPEG round trips alone account for up to ~4 levels; a flip or transpose is off by 100s.
    assert np.abs(got[..., 0] - gx * 255 / (w - 1))[inner].max() < 6
    assert np.abs(got[..., 1] - gy * 255 / (h - 1))[inner].max() < 6


def test_max_side_resize_stays_close_to_lanczos():
    """The cheaper filter keeps fine detail: on blurred noise, Hamming scores 36.5 dB against a
    Lanczos-3 downscale; box and bilinear score 33-34, nearest neighbour 29."""
    from PIL import ImageFilter

    noise = np.random.default_rng(5).integers(0, 256, (480, 640)).astype(np.uint8)
    arr = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.0)).convert("RGB"))
    got, src = _downscaled(arr)
    lanczos = np.asarray(src.convert("RGB").resize((256, 192), Image.Resampling.LANCZOS))
    assert 10 * np.log10(255 ** 2 / np.mean((got - lanczos) ** 2)) > 35


def test_same_input_gives_identical_shards(synthetic_root, tmp_path):
    convert(synthetic_root, tmp_path / "a", shard_size_mb=0.05, workers=1, progress=False)
    convert(synthetic_root, tmp_path / "b", shard_size_mb=0.05, workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) > 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # A different seed gives a different train order.
    convert(synthetic_root, tmp_path / "c", shard_size_mb=0.05, seed=50, workers=1, progress=False)
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (tmp_path / "c" / "train-000000.tar").read_bytes()


def test_resume_after_kill(tmp_path):
    src = tmp_path / "src"
    generate(src, SyntheticConfig(classes=4, per_class=60, val_per_class=0, size=256, seed=3), workers=2,
             progress=False)
    ref = tmp_path / "ref"
    convert(src, ref, shard_size_mb=0.3, workers=1, progress=False)
    n_shards = len(load_manifest(ref)["splits"]["train"]["shards"])
    assert n_shards >= 6

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert.imagenet_to_shards", "--src", str(src), "--out", str(out),
           "--shard-size-mb", "0.3", "--workers", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(load_manifest(out)["splits"]["train"]["shards"])
        except Exception:  # the manifest may not exist yet
            done = 0
        if done >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= done < n_shards, "the run must be killed midway"
    # A kill never leaves a truncated file under a final name: every .tar present is listed.
    listed = {s["name"] for s in load_manifest(out)["splits"]["train"]["shards"]}
    for tar in out.glob("*.tar"):
        if tar.name not in listed:
            tarfile.open(tar).getmembers()  # a complete tar renamed before the manifest update

    r = run_cli("convert.imagenet_to_shards", "--src", src, "--out", out, "--shard-size-mb", "0.3",
                "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    train_row = next(line.split() for line in table if line.strip().startswith("train"))
    assert int(train_row[3]) >= 2  # "kept" column: finished shards were not rewritten
    assert not list(out.glob(".*.partial"))
    for p in sorted(ref.iterdir()):
        if p.suffix in (".tar", ".idx"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    m_ref, m_out = load_manifest(ref), load_manifest(out)
    assert [s["sha256"] for s in m_ref["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in m_out["splits"]["train"]["shards"]]


def test_resume_rewrites_a_damaged_shard(synthetic_root, tmp_path):
    out = tmp_path / "out"
    convert(synthetic_root, out, splits=["val"], workers=1, progress=False)
    shard = out / "val-000000.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2000] + b"\x01" * 2000)  # same size, different content
    convert(synthetic_root, out, splits=["val"], workers=1, progress=False)
    assert shard.read_bytes() == good


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("convert.imagenet_to_shards", "--src", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--src" in r.stderr
    (tmp_path / "src" / "train" / "n1").mkdir(parents=True)
    (tmp_path / "src" / "train" / "n1" / "a.JPEG").write_bytes(jpeg_bytes())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("convert.imagenet_to_shards", "--src", tmp_path / "src", "--out", blocker / "sub")
    assert r.returncode == 2 and "--out" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run_cli("convert.imagenet_to_shards", "--src", tmp_path / "src", "--out", tmp_path / "o", "--quality", "0")
    assert r.returncode == 2 and "--quality" in r.stderr


def test_shard_writer_matches_tarfile_byte_for_byte(tmp_path):

    samples = [("00000000", {"jpg": b"\xff\xd8" + b"x" * 700, "cls": b"3"}),
               ("00000001", {"jpg": b"\xff\xd8" + b"y" * 512, "cls": b"12"})]
    with ShardWriter(tmp_path / "a.tar") as w:
        for key, members in samples:
            w.write(key, members)
        size, digest = w.close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "", ""
                tar.addfile(ti, io.BytesIO(data))
    assert (tmp_path / "a.tar").read_bytes() == buf.getvalue()
    assert size == len(buf.getvalue()) and digest == hashlib.sha256(buf.getvalue()).hexdigest()
    with pytest.raises(ValueError, match="no '.'"):
        ShardWriter(tmp_path / "b.tar").write("a.b", {"jpg": b""})
