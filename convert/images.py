"""Validate one source image and turn it into the RGB JPEG a shard stores.

Every image is decoded here, so nothing undecodable reaches a shard. Validation of a JPEG that
passes through uses libjpeg's DCT scaling (1/8): the entropy-coded data is still read to its
last byte, which is what catches truncation, while the inverse DCT and colour conversion run on
1/64 of the pixels. `Image.verify()` would be cheaper still, but it decodes nothing and so
catches nothing.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageCms, JpegImagePlugin

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
    jpeg: bytes
    meta: dict  # goes into KEY.json


def _rejection(what: str, e: Exception) -> RejectedImage:
    msg = str(e)
    return RejectedImage(f"truncated: {msg}" if "truncated" in msg.lower() else f"{what}: {msg}")


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


def _encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:2:0 is what ImageNet's own files and every GPU decoder's fast path use.
    im.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def _resize_to_max_side(im: Image.Image, max_side: int) -> Image.Image:
    w, h = im.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if im.format == "JPEG":
        # DCT-domain downscale first (at most to 2x the target, never below it), then an
        # antialiased resize; this is both faster and no worse than resizing full pixels.
        im.draft(im.mode if im.mode in ("RGB", "L") else None, (size[0] * 2, size[1] * 2))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=None)


def prepare_image(data: bytes, max_side: int | None = None, quality: int = 90) -> PreparedImage:
    """Return the shard JPEG and its metadata, or raise RejectedImage.

    RGB JPEGs within `max_side` pass through byte for byte. Anything else (CMYK, gray, PNG,
    RGBA, or a larger image when `max_side` is set) is decoded, converted and re-encoded.
    """
    if not data:
        raise RejectedImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise RejectedImage("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise _rejection("unreadable header", e) from None

    w, h = im.size
    fmt = im.format
    if w < 1 or h < 1:
        raise RejectedImage(f"degenerate size {w}x{h}")
    needs_resize = max_side is not None and max(w, h) > max_side
    passthrough = fmt == "JPEG" and im.mode == "RGB" and not needs_resize
    try:
        if passthrough:
            meta = _jpeg_meta(im)
            # Luma-only 1/8 decode: every byte of every component is still entropy-decoded.
            im.draft("L", (math.ceil(w / 8), math.ceil(h / 8)))
            im.load()
            return PreparedImage(data, {"width": w, "height": h, "source_format": fmt, **meta})
        if needs_resize:
            im = _resize_to_max_side(im, max_side)
        else:
            im.load()
        rgb = _to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise _rejection("decode failed", e) from None

    repaired = fmt != "JPEG" or im.mode != "RGB"
    q = max(quality, REPAIR_MIN_QUALITY) if repaired and not needs_resize else quality
    jpeg = _encode(rgb, q)
    meta = {"width": rgb.width, "height": rgb.height, "source_format": fmt,
            "progressive": False, "subsampling": "4:2:0", "reencoded": True, "quality": q}
    if repaired:
        meta["source_mode"] = im.mode
    if needs_resize:
        meta["source_width"], meta["source_height"] = w, h
    return PreparedImage(jpeg, meta)
