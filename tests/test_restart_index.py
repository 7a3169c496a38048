"""Restart-indexed shard JPEGs: the lossless transcode (kernels._jpeg.add_restarts), the spliced
region decode (decode_region_rst) against today's whole-file region decode, hostile offsets and
data, and the converter's output read by Pillow, webdataset and DALI."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

import jpeg_fixtures as fx
from conftest import coordinate_image

_jpeg = pytest.importorskip("kernels._jpeg", reason="kernels._jpeg not built")

SAMPLINGS = {"4:2:0": "4:2:0", "4:2:2": "4:2:2", "4:4:4": "4:4:4"}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def offsets(table: bytes) -> np.ndarray:
    return np.frombuffer(table, "<u4")


def region(fn, data, box, denom, fast=True, **kw):
    buf = np.full(600 * 600 * 3, 0xA5, np.uint8)
    left, top, width, rows = fn(data, *box, denom, buf, fast, **kw)
    return (left, top, width, rows), buf[:width * rows * 3].reshape(rows, width, 3).copy()


@pytest.fixture(scope="module")
def photo():
    return fx.pil_jpeg(fx.photo(333, 250, seed=5), quality=90, subsampling="4:2:0")


# -- the transcode ------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", list(SAMPLINGS))
@pytest.mark.parametrize("target", [0, 5, 4, 1])
def test_transcode_is_lossless_and_its_offsets_point_at_the_intervals(sub, target):
    src = fx.pil_jpeg(fx.photo(331, 197, seed=2), quality=90, subsampling=sub)
    out, interval, table = _jpeg.add_restarts(src, target)
    assert np.array_equal(pixels(out), pixels(src))  # the DCT coefficients are copied, not requantised
    mcu_w = {"4:2:0": 16, "4:2:2": 16, "4:4:4": 8}[sub]
    mcu_h = {"4:2:0": 16, "4:2:2": 8, "4:4:4": 8}[sub]
    per_row, mcu_rows = -(-331 // mcu_w), -(-197 // mcu_h)
    assert per_row % interval == 0 and interval <= (target or per_row)
    if target:  # the largest divisor at most the target
        assert all(per_row % n for n in range(interval + 1, target + 1))
    assert _jpeg.restart_layout(out) == (per_row, mcu_rows, interval)
    offs = offsets(table)
    assert len(offs) == mcu_rows * per_row // interval + 1
    for i, o in enumerate(offs[1:-1]):
        assert out[o - 2:o] == bytes([0xFF, 0xD0 + i % 8])
    assert out[offs[-1]:] == b"\xff\xd9"
    assert _jpeg.restart_layout(out, table) == _jpeg.restart_layout(out)


def test_grey_and_odd_samplings_transcode_losslessly():
    grey = io.BytesIO()
    Image.fromarray(fx.photo(90, 70, seed=1)).convert("L").save(grey, "JPEG", quality=85)
    out, interval, _ = _jpeg.add_restarts(grey.getvalue(), 4)
    assert np.array_equal(pixels(out), pixels(grey.getvalue()))
    assert _jpeg.restart_layout(out) == (12, 9, 4)  # non-interleaved: 8 x 8 MCUs
    fx.require_encoder()
    rgb = fx.photo(150, 90, seed=4)
    for samp in (((2, 4), (1, 1), (1, 1)), ((4, 2), (1, 1), (1, 1)), ((2, 2), (1, 2), (1, 1))):
        src = fx.encode(rgb, sampling=samp)
        out, _, _ = _jpeg.add_restarts(src, 2)
        assert np.array_equal(pixels(out), pixels(src)), samp


def test_what_cannot_be_transcoded_is_unsupported_or_corrupt(photo):
    rgb = fx.photo(64, 48, seed=3)
    with pytest.raises(_jpeg.UnsupportedJPEG):
        _jpeg.add_restarts(fx.pil_jpeg(rgb, progressive=True), 4)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    with pytest.raises(_jpeg.UnsupportedJPEG):
        _jpeg.add_restarts(cmyk.getvalue(), 4)
    with pytest.raises(_jpeg.CorruptJPEG):
        _jpeg.add_restarts(photo[: len(photo) // 2], 4)
    with pytest.raises(_jpeg.CorruptJPEG):
        _jpeg.add_restarts(b"\xff\xd8\xff\xdb\x00", 4)
    with pytest.raises(ValueError):
        _jpeg.add_restarts(photo, -1)
    # 3x2 luma with 2x1 chroma: libjpeg reads the coefficients but cannot upsample the result.
    sof = photo.index(b"\xff\xc0")
    odd = bytearray(photo)
    odd[sof + 11], odd[sof + 14] = 0x32, 0x21
    with pytest.raises(_jpeg.UnsupportedJPEG, match="fractional"):
        _jpeg.add_restarts(bytes(odd), 4)


def test_coefficients_no_8_bit_encoder_writes_are_refused_by_the_transcode():
    """libjpeg decodes coefficients of any size a file's Huffman tables allow, and validate accepts
    them (it checks the stream, not the values). The transcode re-encodes them, so it refuses what
    no 8-bit encoder writes (AC beyond +-1023, DC outside -1024..1023: a difference of two such DCs
    still fits the 11 bits a DC table codes) rather than write a file no table can code."""
    for dc, ac in ((-1024, {1: 1023, 63: -1023}), (1023, {2: -1023, 40: 7})):  # the extremes
        src = fx.single_block(dc, ac)
        out, interval, _ = _jpeg.add_restarts(src, 1)
        assert interval == 1 and np.array_equal(pixels(out), pixels(src))
    for dc, ac in ((0, {5: 1024}), (0, {63: -1024}), (1024, {}), (-1025, {}), (2048, {}), (0, {1: -32767})):
        src = fx.single_block(dc, ac)
        assert _jpeg.validate(src) == (8, 8, 1, 0)
        for optimize in (False, True):
            with pytest.raises(_jpeg.CorruptJPEG, match="^corrupt JPEG data: DCT coefficient out of range"):
                _jpeg.add_restarts(src, 1, optimize=optimize)


def test_optimised_tables_are_lossless_smaller_and_checked_alike(photo):
    """optimize=True (the measured alternative to the standard tables): the same coefficients and
    layout in fewer bytes, under the same checks."""
    std, n, table = _jpeg.add_restarts(photo, 2)
    opt, n_opt, table_opt = _jpeg.add_restarts(photo, 2, optimize=True)
    assert n == n_opt and len(opt) < len(std)
    assert np.array_equal(pixels(opt), pixels(photo)) and np.array_equal(pixels(std), pixels(photo))
    assert _jpeg.restart_layout(opt, table_opt) == _jpeg.restart_layout(std, table)
    with pytest.raises(_jpeg.CorruptJPEG, match="Huffman"):
        _jpeg.add_restarts(fx.damage_entropy(photo, at=0.1), 2, optimize=True)


def test_app_markers_are_kept(photo):
    src = Image.open(io.BytesIO(photo))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90, exif=exif.tobytes(), icc_profile=b"\x00" * 300)
    out, _, _ = _jpeg.add_restarts(buf.getvalue(), 4)
    im = Image.open(io.BytesIO(out))
    assert im.getexif()[0x0112] == 6 and im.info["icc_profile"] == b"\x00" * 300


# -- the spliced decode ----------------------------------------------------------------------------

BOXES = [(0, 0, 333, 250), (100, 40, 120, 100), (0, 0, 17, 9), (250, 100, 83, 150), (33, 17, 5, 3),
         (316, 233, 400, 400), (64, 32, 64, 32), (1, 200, 331, 49)]


@pytest.mark.parametrize("target", [0, 4, 1])
@pytest.mark.parametrize("denom", [1, 2, 4, 8])
def test_spliced_region_is_todays_region(target, denom):
    """A coordinate image: a splice at the wrong columns or rows shows as a colour error."""
    src = fx.pil_jpeg(coordinate_image(333, 250, 1, 2), quality=95, subsampling="4:2:0")
    out, _, table = _jpeg.add_restarts(src, target)
    for fast in (True, False):
        for box in BOXES:
            want_box, want = region(_jpeg.decode_region, src, box, denom, fast)
            for kw in ({}, {"offsets": table}):
                got_box, got = region(_jpeg.decode_region_rst, out, box, denom, fast, **kw)
                x0, x1 = box[0] // denom, -(-min(box[0] + box[2], 333) // denom)
                assert got_box[1] == want_box[1] == box[1] // denom and got_box[3] == want_box[3]
                assert got_box[0] <= x0 and got_box[0] + got_box[2] >= x1
                a = want[:, x0 - want_box[0]:x1 - want_box[0]].astype(int)
                b = got[:, x0 - got_box[0]:x1 - got_box[0]].astype(int)
                # Only where a region's cut edge (a side, or its top or bottom MCU row edge)
                # changes the chroma upsampling may they differ.
                inner = np.abs(a - b)[2:-2, 2:-2] if min(a.shape[:2]) > 4 else np.zeros(1)
                assert inner.max() == 0, (box, denom, fast)
                assert np.abs(a - b).max() <= 40, (box, denom, fast)


def test_the_loader_output_is_unchanged_by_the_index(photo):
    """decode_into (margin, DCT scale, resize, flip) on the indexed file against today's path."""
    import pipeline.decode as dm
    from pipeline.augment import Transform

    out, _, _ = _jpeg.add_restarts(photo, 4)
    tf = Transform(224, train=True)
    sizes = np.array([[333, 250]] * 64)
    boxes, flips = tf.params(3, 0, np.arange(64), sizes)
    dec = dm.BatchDecoder(None, tf, seed=3, fast_dct=True)
    a, b = np.empty((224, 224, 3), np.uint8), np.empty((224, 224, 3), np.uint8)
    old = dm.use_restart_index
    try:
        for i in range(64):
            dm.use_restart_index = False
            dec.decode_into(photo, boxes[i], flips[i], a, sizes[i])
            dm.use_restart_index = True
            dec.decode_into(out, boxes[i], flips[i], b, sizes[i])
            assert np.array_equal(a, b), i
    finally:
        dm.use_restart_index = old


def test_files_without_a_usable_layout_take_the_whole_file_path(photo):
    rgb = fx.photo(333, 250, seed=5)
    cases = {"no restarts": photo, "progressive": fx.pil_jpeg(rgb, progressive=True)}
    fx.require_encoder()
    # 21 MCUs per row: an interval of 2 crosses rows.
    cases["interval across rows"] = fx.encode(rgb, restart_interval=2)
    for name, data in cases.items():
        assert _jpeg.restart_layout(data) is None, name
        for box in BOXES[:4]:
            assert region(_jpeg.decode_region_rst, data, box, 2)[1].tolist() == \
                region(_jpeg.decode_region, data, box, 2)[1].tolist(), name


# -- hostile offsets and data --------------------------------------------------------------------------

def lying_tables(table: bytes, size: int) -> dict[str, bytes]:
    o = offsets(table).astype(np.int64)
    u = lambda a: np.asarray(a, np.uint64).astype("<u4").tobytes()  # noqa: E731
    return {
        "empty": b"", "odd length": table[:-1], "one short": table[:-4], "one more": table + table[-4:],
        "zeros": bytes(len(table)), "all 0xff": b"\xff" * len(table),
        "past the end": u(np.append(o[:-1], size + 10)), "huge": u(np.where(np.arange(len(o)) == 3, 2**32 - 1, o)),
        "out of order": u(np.concatenate([o[:2], o[3:4], o[2:3], o[4:]])),
        "shifted": u(o + 1), "not at markers": u(np.concatenate([o[:1], o[1:-1] - 1, o[-1:]])),
        "duplicate": u(np.concatenate([o[:3], o[2:3], o[4:]])), "end before last": u(np.append(o[:-1], o[-2])),
        "floats": np.asarray(o, "<f4").tobytes(),
    }


def test_lying_offsets_are_refused_and_decode_takes_the_whole_file_path(photo):
    out, _, table = _jpeg.add_restarts(photo, 4)
    boxes = BOXES[:5]
    want = [region(_jpeg.decode_region, out, b, 1) for b in boxes]
    for name, bad in lying_tables(table, len(out)).items():
        assert _jpeg.restart_layout(out, bad) is None, name
        for b, w in zip(boxes, want):
            got = region(_jpeg.decode_region_rst, out, b, 1, offsets=bad)
            assert got[0] == w[0] and np.array_equal(got[1], w[1]), name
    with pytest.raises(TypeError):
        _jpeg.decode_region_rst(out, 0, 0, 8, 8, 1, np.empty(1000, np.uint8), True, offsets=12)


def test_damaged_restart_structure_is_corrupt_or_whole_file(photo):
    out, _, table = _jpeg.add_restarts(photo, 4)
    o = offsets(table)
    renumbered = bytearray(out)
    renumbered[o[5] - 1] = 0xD0 + (5 % 8)  # RST4 where RST5 should be... numbering now breaks
    dropped = out[:o[5] - 2] + out[o[5]:]  # one marker missing: the intervals run together
    fake = bytearray(out)
    fake[o[3] + 10:o[3] + 12] = b"\xff\xd3"  # a marker inside an interval's data
    for name, data in {"renumbered": bytes(renumbered), "dropped": dropped, "fake marker": bytes(fake),
                       "truncated": out[: len(out) * 2 // 3], "no EOI": out[:-2]}.items():
        for b in BOXES:
            buf = np.full(600 * 600 * 3, 0xA5, np.uint8)
            try:
                r = _jpeg.decode_region_rst(data, *b, 1, buf, True)
            except _jpeg.CorruptJPEG:
                continue
            assert buf[r[2] * r[3] * 3:].max() == 0xA5 == buf[r[2] * r[3] * 3:].min(), name
        # The table of the intact file does not fit the damaged bytes.
        if name in ("renumbered", "dropped", "fake marker"):
            assert _jpeg.restart_layout(data, table) is None or name == "fake marker"


def test_header_fields_that_lie_about_the_size(photo):
    out, _, _ = _jpeg.add_restarts(photo, 4)
    for w, h in ((333 + 16, 250), (333, 250 + 16), (1, 1), (65535, 65535)):
        data = fx.with_dimensions(out, w, h)
        for b in BOXES[:4]:
            buf = np.empty(600 * 600 * 3, np.uint8)
            try:
                _jpeg.decode_region_rst(data, *b, 8, buf, True)
            except ValueError:  # CorruptJPEG, or a box outside a shrunken image
                pass


# -- the converter and other readers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rst_src")
    for i in range(6):
        d = root / "train" / f"n{i % 2:03d}"
        d.mkdir(parents=True, exist_ok=True)
        rgb = fx.photo(int(140 + 37 * i), int(100 + 23 * i), seed=i)
        (d / f"img_{i}.JPEG").write_bytes(fx.pil_jpeg(rgb, subsampling=("4:2:0", "4:4:4", "4:2:2")[i % 3]))
    (root / "train" / "n000" / "prog.JPEG").write_bytes(fx.pil_jpeg(fx.photo(120, 90, seed=9), progressive=True))
    return root


def shard_samples(out) -> dict[str, tuple[bytes, dict]]:
    import json

    from pipeline.shard_format import load_manifest

    got = {}
    for shard in load_manifest(out)["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = {ti.name: tar.extractfile(ti).read() for ti in tar}
        for name, data in members.items():
            if name.endswith(".jpg"):
                meta = json.loads(members[name[:-3] + "json"])
                got[meta["path"]] = (data, meta)
    return got


def test_converter_indexes_by_default_and_the_flag_turns_it_off(photo_folder, tmp_path):
    from convert.imagenet_to_shards import main

    assert main(["--src", str(photo_folder), "--out", str(tmp_path / "on"), "--no-progress"]) == 0
    assert main(["--src", str(photo_folder), "--out", str(tmp_path / "off"), "--no-progress",
                 "--no-restart-index"]) == 0
    on, off = shard_samples(tmp_path / "on"), shard_samples(tmp_path / "off")
    assert on.keys() == off.keys() and len(on) == 7
    for path, (data, meta) in on.items():
        source = (photo_folder / path).read_bytes()
        assert off[path][0] == source and "restart_interval" not in off[path][1]
        assert np.array_equal(pixels(data), pixels(source)), path  # lossless
        if meta["progressive"]:
            assert data == source and "restart_interval" not in meta
        else:
            assert _jpeg.restart_layout(data)[2] == meta["restart_interval"]


def test_an_indexed_jpeg_is_read_once_and_damage_is_still_rejected(photo, monkeypatch):
    """The transcode is the validation (one entropy-decoding pass): validate is called only for
    what add_restarts does not take (progressive here), and damage is rejected as before."""
    from convert import images

    validated = []
    real = _jpeg.validate
    monkeypatch.setattr(images._jpeg, "validate", lambda data: validated.append(data) or real(data))
    out = images.prepare_image(photo, restart_interval=2)
    assert out.meta["restart_interval"] and np.array_equal(pixels(out.jpeg), pixels(photo))
    assert validated == []
    prog = fx.pil_jpeg(fx.photo(120, 90, seed=9), progressive=True)
    assert images.prepare_image(prog, restart_interval=2).jpeg == prog and validated == [prog]
    for bad in (fx.damage_entropy(photo), fx.cut_scan(photo), photo[:len(photo) // 2]):
        with pytest.raises(images.RejectedImage, match="^(corrupt JPEG data|truncated)"):
            images.prepare_image(bad, restart_interval=2)
    assert images.prepare_image(photo).jpeg == photo  # no index: validated, passed through
    assert validated[-1] == photo


def test_resized_images_get_the_markers_from_the_encoder(photo_folder, tmp_path):
    """--max-side re-encodes write restart markers themselves; the loader's crops of them are the
    same with and without the splice, and --no-restart-index writes none."""
    import pipeline.decode as dm
    from convert.images import restart_blocks
    from convert.imagenet_to_shards import main
    from pipeline.augment import Transform

    assert main(["--src", str(photo_folder), "--out", str(tmp_path / "on"), "--no-progress", "--max-side", "96"]) == 0
    assert main(["--src", str(photo_folder), "--out", str(tmp_path / "off"), "--no-progress", "--max-side", "96",
                 "--no-restart-index"]) == 0
    on, off = shard_samples(tmp_path / "on"), shard_samples(tmp_path / "off")
    resized = [p for p, (_, meta) in on.items() if "source_width" in meta]
    assert len(resized) >= 5
    tf = Transform(64, train=True)
    dec = dm.BatchDecoder(None, tf, seed=3, fast_dct=True)
    a, b = np.empty((64, 64, 3), np.uint8), np.empty((64, 64, 3), np.uint8)
    old = dm.use_restart_index
    try:
        for path in resized:
            data, meta = on[path]
            assert _jpeg.restart_layout(off[path][0]) is None and "restart_interval" not in off[path][1]
            layout = _jpeg.restart_layout(data)
            assert layout is not None and layout[2] == meta["restart_interval"]
            assert layout[2] == restart_blocks(meta["width"], 2) and layout[0] % layout[2] == 0
            assert np.abs(pixels(data).astype(int) - pixels(off[path][0])).max() == 0  # same coefficients
            sizes = np.array([[meta["width"], meta["height"]]] * 16)
            boxes, flips = tf.params(3, 0, np.arange(16), sizes)
            for i in range(16):
                dm.use_restart_index = False
                dec.decode_into(data, boxes[i], flips[i], a, sizes[i])
                dm.use_restart_index = True
                dec.decode_into(data, boxes[i], flips[i], b, sizes[i])
                assert np.array_equal(a, b), (path, i)
    finally:
        dm.use_restart_index = old


def test_restart_blocks_never_cross_a_row():
    from convert.images import restart_blocks

    assert restart_blocks(256, 2) == 2 and restart_blocks(240, 2) == 1  # 16 and 15 MCUs per row
    assert restart_blocks(100, 0) == 7 and restart_blocks(20, 4) == 2
    for w in range(1, 600, 7):
        n = restart_blocks(w, 2)
        assert -(-w // 16) % n == 0 and 1 <= n <= 2


def test_indexed_shards_stay_standard_jpeg_for_webdataset_and_dali(photo_folder, tmp_path):
    from convert.imagenet_to_shards import convert
    from pipeline.shard_format import load_manifest

    out = tmp_path / "shards"
    convert(photo_folder, out, progress=False, workers=1)
    want = {path: pixels(data) for path, (data, _) in shard_samples(out).items()}
    urls = [str(out / s["name"]) for s in load_manifest(out)["splits"]["train"]["shards"]]

    import webdataset as wds

    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"):
        assert np.array_equal(s["jpg"], want[s["json"]["path"]])
        seen += 1
    assert seen == len(want)

    dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import fn

    @dali.pipeline_def(batch_size=len(want), num_threads=1, device_id=None)
    def pipe():
        jpg = fn.readers.webdataset(paths=urls, ext=["jpg"], missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu", output_type=dali.types.RGB)

    p = pipe()
    p.build()
    (images,) = p.run()
    got = [np.asarray(images.at(i)) for i in range(len(want))]
    for g in got:  # DALI's CPU decoder (libjpeg-turbo) decodes every sample to the same pixels
        assert any(g.shape == w.shape and np.abs(g.astype(int) - w).max() <= 1 for w in want.values())


def test_fuzz_target_reaches_the_splice_and_the_transcode(tmp_path):
    """The fuzz target (tests/fuzz) on mutants of its seeds, hostile offset tables included."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fuzz_jpeg", Path(__file__).parent / "fuzz" / "fuzz_jpeg.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    corpus = [v for k, v in fuzz.seed_inputs().items() if k.startswith("splice_")]
    assert len(corpus) >= 10
    stats = fuzz.run_mutations(corpus, 3000, seed=5, crash_dir=tmp_path)
    kinds = " ".join(stats)
    assert "splice+scan-decoded" in kinds and "splice-none" in kinds and "+transcoded" in kinds, stats


@pytest.mark.parametrize("sub", list(SAMPLINGS))
def test_spliced_region_is_the_full_decode_of_the_original(sub):
    """Exact IDCT and fancy upsampling: the pixels of a full Pillow decode of the source, except
    within 2 px of the decoded region's cut edges (chroma upsampling has no neighbour there)."""
    src = fx.pil_jpeg(fx.photo(333, 250, seed=8), quality=90, subsampling=sub)
    full = pixels(src).astype(int)
    out, _, _ = _jpeg.add_restarts(src, 2)
    for box in BOXES:
        (left, top, width, rows), got = region(_jpeg.decode_region_rst, out, box, 1, fast=False)
        diff = np.abs(got.astype(int) - full[top:top + rows, left:left + width])
        if min(diff.shape[:2]) > 4:
            assert diff[2:-2, 2:-2].max() == 0, box
        assert diff.max() <= 40, box
