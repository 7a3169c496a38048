"""Validate one source image and turn it into the RGB JPEG a shard stores.

Every image is decoded here, so nothing undecodable reaches a shard. A JPEG is validated with
kernels._jpeg.validate when the extension is built: it entropy-decodes the whole file to its EOI
with libjpeg's DCT scaling (1/8), so the inverse DCT runs on 1/64 of the pixels, and it refuses
what Pillow lets through: damaged entropy-coded data (libjpeg's corrupt-data warnings, which
Pillow ignores, leaving grey or garbage pixels), and decompression bombs over the extension's
limits (the same limits the loader applies, so nothing admitted here is refused there).
A JPEG that --max-side shrinks is validated by its own decode (kernels._jpeg.decode_scaled: the
same checks, at a DCT scale in eighths), and one given a restart index by its transcode
(kernels._jpeg.add_restarts reads every coefficient under the same checks), so its entropy-coded
data is read once, not twice.
Without the extension, Pillow's luma-only 1/8 draft decode does the reading; it catches
truncation but not damage. `Image.verify()` would be cheaper still, but it decodes nothing and
so catches nothing.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageCms, JpegImagePlugin

from pipeline.shard_format import JPEG_EXT, PNG_EXT

try:  # the strict JPEG validator is part of the optional compiled extension (see setup.py)
    from kernels import _jpeg
except ImportError:  # pragma: no cover - exercised where libjpeg-turbo headers are missing
    _jpeg = None
if _jpeg is not None and not all(hasattr(_jpeg, f) for f in ("validate", "add_restarts", "restart_layout")):
    _jpeg = None  # pragma: no cover - a stale build: Pillow checks, no restart index
# add_restarts reads the coefficients under validate's checks, so the transcode is the validation
# (one entropy-decoding pass). An older build's is not: there the file is validated first.
_TRANSCODE_VALIDATES = _jpeg is not None and bool(_jpeg.features().get("checked_transcode"))

# What torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Repairs (CMYK, gray, PNG, RGBA) re-encode an image that would otherwise pass through, so they
# never go below this quality: the repair must not add visible loss.
REPAIR_MIN_QUALITY = 95

_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


class RejectedImage(Exception):
    """The file cannot become a training image; `reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PreparedImage:
    jpeg: bytes  # the image a shard stores: a JPEG, or a PNG where `ext` says so (keep_png)
    meta: dict  # goes into KEY.json
    ext: str = JPEG_EXT


def _rejection(what: str, e: Exception) -> RejectedImage:
    msg = str(e)
    return RejectedImage(f"truncated: {msg}" if "truncated" in msg.lower() else f"{what}: {msg}")


def _validate_jpeg(data: bytes) -> bool:
    """Strictly validate a JPEG with the extension; False when it is not built or cannot read
    this file (UnsupportedJPEG: Pillow then decodes it, as it did before the extension)."""
    if _jpeg is None:
        return False
    try:
        _jpeg.validate(data)
    except _jpeg.UnsupportedJPEG:
        return False
    except _jpeg.CorruptJPEG as e:
        raise _rejected_jpeg(e) from None
    return True


def _rejected_jpeg(e: Exception) -> RejectedImage:
    msg = str(e)
    # The extension's messages already say what is wrong: "truncated JPEG: ...",
    # "corrupt JPEG data: ...", "decompression bomb: ...", "bad JPEG header: ...".
    known = msg.startswith(("truncated", "corrupt JPEG data", "decompression bomb", "bad JPEG header"))
    return RejectedImage(msg if known else f"corrupt JPEG data: {msg}")


def _jpeg_meta(im: Image.Image) -> dict:
    """Decode-routing facts of an opened JPEG: progressive or baseline, chroma subsampling."""
    meta = {"progressive": bool(im.info.get("progressive") or im.info.get("progression"))}
    if im.mode == "RGB":
        meta["subsampling"] = _SUBSAMPLING.get(JpegImagePlugin.get_sampling(im), "other")
    return meta


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB with the right colours."""
    icc = im.info.get("icc_profile")
    if im.mode == "CMYK" and icc:
        # A CMYK photo's colours are only defined through its profile; the naive formula gives
        # visibly wrong hues for print-separated images.
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion below
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels carry arbitrary colours; composite over white as a viewer shows them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the top 8 bits rather than clipping at 255.
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")


def _encode(im: Image.Image, quality: int, restart_interval: int | None = None) -> bytes:
    """Baseline 4:2:0 JPEG; with `restart_interval` (MCUs, 0: one MCU row) the encoder writes the
    restart markers itself (the interval chosen as `add_restarts` chooses it), at no extra cost."""
    buf = io.BytesIO()
    extra = {}
    if restart_interval is not None:
        extra["restart_marker_blocks"] = restart_blocks(im.width, restart_interval)
    # 4:2:0 is what ImageNet's own files and every GPU decoder's fast path use.
    im.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", **extra)
    return buf.getvalue()


def _lossless_png(rgb: Image.Image, source_mode: str) -> PreparedImage:
    buf = io.BytesIO()
    # compress_level 1: every level is lossless; the fast one keeps conversion quick.
    rgb.save(buf, format="PNG", compress_level=1)
    meta = {"width": rgb.width, "height": rgb.height, "source_format": "PNG", "reencoded": True, "lossless": True}
    if source_mode != "RGB":
        meta["source_mode"] = source_mode
    return PreparedImage(buf.getvalue(), meta, PNG_EXT)


def restart_blocks(width: int, target: int) -> int:
    """MCUs between restart markers for a 4:2:0 image `width` px wide: the largest divisor of its
    MCUs per row that is at most `target` (0: the whole row), so no interval crosses a row and the
    loader can splice any column range."""
    per_row = -(-width // 16)
    if target <= 0 or target >= per_row:
        return per_row
    return max(d for d in range(1, target + 1) if per_row % d == 0)


# The antialiased downscale filter. Hamming (a windowed sinc with half Lanczos-3's support)
# costs 0.43x Lanczos-3 on ~500 px photos going to 256 px, the most common --max-side case,
# where the DCT-domain draft below cannot help (it would go under the target). Its pixels are
# 41.5 dB (median PSNR) from Lanczos-3's, while re-encoding at quality 90 alone is 35.3 dB from
# them: the difference is well under the JPEG's own loss. (Bicubic: 47 dB at 0.69x the cost.)
RESIZE_FILTER = Image.Resampling.HAMMING


def target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def dct_scale_eighths(w: int, h: int, size: tuple[int, int], min_ratio: float) -> int:
    """The smallest libjpeg scale n/8 whose output is at least `min_ratio` x `size` both ways."""
    for n in range(1, 8):
        if -(-w * n // 8) >= min_ratio * size[0] and -(-h * n // 8) >= min_ratio * size[1]:
            return n
    return 8


# The decode's DCT-domain downscale stops at this multiple of the target; the antialiased resize
# does the rest. Going closer costs quality: on 100 real-photo JPEGs to 256 px, PSNR against a
# Lanczos-3 downscale of the full decode fell from 32.4 dB (median) at 2x to 29.0 dB at 1x (the
# scaled IDCT truncates each block's spectrum, with no overlap between blocks), for 1.65x the
# speed instead of 1.26x. At 2x it matches the previous path (Pillow's draft, 32.55 dB).
DCT_SCALE_MARGIN = 2.0


def _decode_resized_jpeg(data: bytes, w: int, h: int, max_side: int) -> Image.Image | None:
    """Validate and decode in one pass (kernels._jpeg.decode_scaled), at the smallest DCT scale
    that stays above the target, then resize: None when the extension cannot (not built, CMYK)."""
    if _jpeg is None:
        return None
    size = target_size(w, h, max_side)
    n = dct_scale_eighths(w, h, size, DCT_SCALE_MARGIN)
    ow, oh = -(-w * n // 8), -(-h * n // 8)
    buf = bytearray(ow * oh * 3)
    try:
        _jpeg.decode_scaled(data, n, buf)
    except _jpeg.UnsupportedJPEG:
        return None
    except _jpeg.CorruptJPEG as e:
        raise _rejected_jpeg(e) from None
    im = Image.frombuffer("RGB", (ow, oh), bytes(buf), "raw", "RGB", 0, 1)
    return im if (ow, oh) == size else im.resize(size, RESIZE_FILTER, reducing_gap=None)


def _resize_to_max_side(im: Image.Image, max_side: int) -> Image.Image:
    w, h = im.size
    size = target_size(w, h, max_side)
    if im.format == "JPEG":
        # DCT-domain downscale first (at most to 2x the target, never below it), then an
        # antialiased resize; this is both faster and no worse than resizing full pixels.
        im.draft(im.mode if im.mode in ("RGB", "L") else None, (size[0] * 2, size[1] * 2))
    return im.resize(size, RESIZE_FILTER, reducing_gap=None)


def _restart_transcode(jpeg: bytes, interval_mcus: int | None) -> tuple[bytes, int] | None:
    """(the transcoded JPEG, its interval) from kernels._jpeg.add_restarts, or None when
    `interval_mcus` is None, the extension is not built, or the file is one it does not transcode
    (progressive, arithmetic-coded, multi-scan, CMYK). Damage raises RejectedImage: the transcode
    reads every coefficient under validate's checks (and refuses what it could not re-encode)."""
    if interval_mcus is None or _jpeg is None:
        return None
    try:
        out, interval, _ = _jpeg.add_restarts(jpeg, interval_mcus)
    except _jpeg.UnsupportedJPEG:
        return None
    except _jpeg.CorruptJPEG as e:
        raise _rejected_jpeg(e) from None
    return out, interval


def add_restart_index(jpeg: bytes, meta: dict, interval_mcus: int | None) -> bytes:
    """The JPEG losslessly transcoded with a restart marker every few MCUs (kernels._jpeg
    .add_restarts), so the loader can decode only the restart intervals a crop covers; the
    interval goes into `meta`. Unchanged where `_restart_transcode` gives None."""
    done = _restart_transcode(jpeg, interval_mcus)
    if done is None:
        return jpeg
    meta["restart_interval"] = done[1]
    return done[0]


def prepare_image(data: bytes, max_side: int | None = None, quality: int = 90,
                  restart_interval: int | None = None, keep_png: bool = False) -> PreparedImage:
    """Return the image a shard stores (a JPEG, unless `keep_png`) and its metadata, or raise
    RejectedImage.

    RGB JPEGs within `max_side` keep their DCT coefficients (and their bytes when
    `restart_interval` is None). Anything else (CMYK, gray, PNG, RGBA, or a larger image when
    `max_side` is set) is decoded, converted and re-encoded.
    `restart_interval` (MCUs; 0: one MCU row): full-size JPEGs, passed through or repaired, are
    then losslessly transcoded with restart markers (`add_restart_index`); resized ones get the
    markers from the encoder.
    `keep_png`: PNGs within `max_side` are stored as lossless RGB PNGs instead (what small images
    such as CIFAR's want: JPEG's 4:2:0 chroma costs them visible detail).
    """
    if not data:
        raise RejectedImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise RejectedImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would end the whole run
        raise RejectedImage(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise _rejection("unreadable header", e) from None

    w, h = im.size
    fmt = im.format
    if w < 1 or h < 1:
        raise RejectedImage(f"degenerate size {w}x{h}")
    needs_resize = max_side is not None and max(w, h) > max_side
    passthrough = fmt == "JPEG" and im.mode == "RGB" and not needs_resize
    mode = im.mode
    # A JPEG to downscale is validated by the decode itself, and one to index by the transcode
    # (one entropy-decoding pass, not two).
    resized = _decode_resized_jpeg(data, w, h, max_side) if needs_resize and fmt == "JPEG" else None
    indexed = _restart_transcode(data, restart_interval) if passthrough and _TRANSCODE_VALIDATES else None
    # Every JPEG, repaired ones too: a CMYK file with damaged data would be re-encoded with the
    # damage baked in.
    validated = resized is not None or indexed is not None or (fmt == "JPEG" and _validate_jpeg(data))
    try:
        if passthrough:
            meta = _jpeg_meta(im)
            if not validated:
                # Luma-only 1/8 decode: every byte of every component is still entropy-decoded.
                im.draft("L", (math.ceil(w / 8), math.ceil(h / 8)))
                im.load()
            meta = {"width": w, "height": h, "source_format": fmt, **meta}
            if indexed is not None:
                meta["restart_interval"] = indexed[1]
                return PreparedImage(indexed[0], meta)
            if _TRANSCODE_VALIDATES:  # no index asked for, or add_restarts does not take this file
                return PreparedImage(data, meta)
            return PreparedImage(add_restart_index(data, meta, restart_interval), meta)
        if resized is not None:
            im = resized
        elif needs_resize:
            im = _resize_to_max_side(im, max_side)
        else:
            im.load()
        rgb = _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _rejection("decode failed", e) from None

    if keep_png and fmt == "PNG" and not needs_resize:
        return _lossless_png(rgb, mode)
    repaired = fmt != "JPEG" or mode != "RGB"
    q = max(quality, REPAIR_MIN_QUALITY) if repaired and not needs_resize else quality
    jpeg = _encode(rgb, q, restart_interval if needs_resize else None)
    meta = {"width": rgb.width, "height": rgb.height, "source_format": fmt,
            "progressive": False, "subsampling": "4:2:0", "reencoded": True, "quality": q}
    if repaired:
        meta["source_mode"] = mode
    if needs_resize:
        meta["source_width"], meta["source_height"] = w, h
        layout = _jpeg.restart_layout(jpeg) if restart_interval is not None and _jpeg is not None else None
        if layout is not None:  # the markers the encoder wrote, as the loader will find them
            meta["restart_interval"] = layout[2]
    else:
        # Repairs are kept at high quality: transcoded losslessly.
        jpeg = add_restart_index(jpeg, meta, restart_interval)
    return PreparedImage(jpeg, meta)
