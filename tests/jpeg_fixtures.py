"""Test JPEGs made on the fly, never committed: photo-like pictures, files with unusual sampling
factors or restart markers (through tests/jpeg_encoder.c, compiled at test time against the
system libjpeg and called with ctypes), and byte surgery that turns a good file into a damaged
or hostile one.

    rgb = photo(320, 240, seed=1)
    data = encode(rgb, sampling=((2, 4), (1, 1), (1, 1)), restart_interval=4)
    bad = damage_entropy(data)

Tests that need the encoder call `require_encoder()`, which skips them (with the compiler's
message) where no C compiler or libjpeg headers are installed.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import shlex
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ENCODER_SOURCE = Path(__file__).with_name("jpeg_encoder.c")

# Scan layouts the encoder writes (its `scans` argument).
SCANS = {"baseline": 0, "progressive": 1, "per_component": 2}


class EncoderUnavailable(RuntimeError):
    """The test encoder cannot be built here (no C compiler or no libjpeg headers)."""


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    source = ENCODER_SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(cc).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"resnet_shards_jpeg_encoder_{tag}_{os.getuid()}.so"
    if not out.exists():
        partial = out.with_suffix(f".{os.getpid()}.partial")
        cmd = [*cc, "-O2", "-shared", "-fPIC", str(ENCODER_SOURCE), "-o", str(partial), "-ljpeg"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except OSError as e:
            raise EncoderUnavailable(f"cannot run the C compiler {cc[0]!r}: {e}") from None
        if r.returncode != 0:
            raise EncoderUnavailable(f"cannot build tests/jpeg_encoder.c: {r.stderr.strip()[-500:]}")
        os.replace(partial, out)  # atomic: concurrent test processes never load a half-written file
    lib = ctypes.CDLL(str(out))
    lib.jpeg_fixture_encode.restype = ctypes.c_long
    lib.jpeg_fixture_encode.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                                        ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong]
    lib.jpeg_fixture_error.restype = ctypes.c_char_p
    return lib


def encoder_unavailable_reason() -> str | None:
    """None when `encode` works here, else why not."""
    try:
        _library()
    except EncoderUnavailable as e:
        return str(e)
    return None


def require_encoder() -> None:
    """Skip the calling test, with the reason, when the encoder cannot be built."""
    import pytest

    reason = encoder_unavailable_reason()
    if reason is not None:
        pytest.skip(f"test JPEG encoder unavailable: {reason}")


def encode(rgb: np.ndarray, quality: int = 90, sampling=((2, 2), (1, 1), (1, 1)), scans: str = "baseline",
           restart_interval: int = 0) -> bytes:
    """JPEG of an (h, w, 3) uint8 RGB array with the given (h, v) sampling factors of Y, Cb, Cr,
    scan layout (a key of SCANS) and restart interval (in MCUs, 0 = none)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError("encode needs an (h, w, 3) RGB array")
    lib = _library()
    hs = (ctypes.c_int * 3)(*(s[0] for s in sampling))
    vs = (ctypes.c_int * 3)(*(s[1] for s in sampling))
    cap = w * h * 3 + 65536
    while True:
        out = ctypes.create_string_buffer(cap)
        n = lib.jpeg_fixture_encode(rgb.tobytes(), w, h, quality, hs, vs, SCANS[scans], restart_interval, out, cap)
        if n == 0:
            raise ValueError(f"libjpeg refused to encode: {lib.jpeg_fixture_error().decode()}")
        if n > 0:
            return out.raw[:n]
        cap = -n


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 picture with a photo's statistics: smooth shading at several scales,
    a few hard-edged objects and sensor noise (flat colours or pure noise compress unlike
    photos and exercise other decoder paths)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((2, 90), (6, 40), (24, 18)):
        grid = rng.uniform(0, 255, (cells, max(2, cells * w // max(h, 1)), 3)).astype(np.uint8)
        acc += (np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128) \
            * (amp / 128)
    acc += 128
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        acc[mask] = acc[mask] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    acc += rng.normal(0, 4, acc.shape)
    return np.clip(acc, 0, 255).astype(np.uint8)


def pil_jpeg(rgb: np.ndarray, quality: int = 90, **save) -> bytes:
    """Pillow's JPEG of an array (any Pillow save option: subsampling, progressive, ...)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **save)
    return buf.getvalue()


ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
          7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
          39, 46, 53, 60, 61, 54, 47, 55, 62, 63]  # zigzag index -> natural (row-major) index


def single_block(dc: int, ac: dict[int, int] | None = None) -> bytes:
    """An 8 x 8 grey baseline JPEG of one block, written by hand: DC `dc` and the AC coefficients
    `ac` ({zigzag index 1..63: value}), all quantisers 1, with Huffman tables that hold whatever
    sizes the values need, up to 15 bits (an 8-bit encoder writes at most 11 for DC and 10 for
    AC; libjpeg's decoder reads the rest without a warning)."""
    ac = ac or {}
    symbols: list[tuple[int, int, int]] = []  # (table 0 DC / 1 AC, symbol, value)

    def size(v: int) -> int:
        return abs(v).bit_length()

    symbols.append((0, size(dc), dc))
    run = 0
    for k in range(1, 64):
        v = ac.get(k, 0)
        if v == 0:
            run += 1
            continue
        while run > 15:
            symbols.append((1, 0xF0, 0))
            run -= 16
        symbols.append((1, run << 4 | size(v), v))
        run = 0
    if run:
        symbols.append((1, 0x00, 0))  # EOB
    codes = {}
    dht = b""
    for table in (0, 1):
        used = sorted({s for t, s, _ in symbols if t == table})
        length = max(1, len(used).bit_length())  # n < 2 ** length: the all-ones code stays unused
        counts = [0] * 16
        counts[length - 1] = len(used)
        codes[table] = {s: (i, length) for i, s in enumerate(used)}
        body = bytes([table << 4]) + bytes(counts) + bytes(used)
        dht += b"\xff\xc4" + (2 + len(body)).to_bytes(2, "big") + body
    bits = ""
    for table, sym, v in symbols:
        code, length = codes[table][sym]
        bits += format(code, f"0{length}b")
        n = sym & 15 if table else sym
        if n:  # the value's bits: v itself, or v - 1 in n bits if negative
            bits += format(v if v > 0 else v + (1 << n) - 1, f"0{n}b")
    bits += "1" * (-len(bits) % 8)
    entropy = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return (b"\xff\xd8"
            + b"\xff\xdb\x00\x43\x00" + b"\x01" * 64
            + b"\xff\xc0\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00"
            + dht
            + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + entropy + b"\xff\xd9")


# -- byte surgery ---------------------------------------------------------------------------

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
SOS, EOI = 0xDA, 0xD9


@dataclass
class Segment:
    marker: int  # the byte after 0xFF
    start: int  # offset of the 0xFF
    end: int  # one past the segment; for SOS, one past its entropy-coded data
    data_start: int  # SOS: first byte of entropy-coded data; otherwise end


def segments(data: bytes) -> list[Segment]:
    """The marker segments of a well-formed JPEG, in file order (SOI first)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    out = [Segment(0xD8, 0, 2, 2)]
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"expected a marker at {i}")
        while i + 1 < len(data) and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker, start = data[i + 1], i
        if marker == EOI or 0xD0 <= marker <= 0xD7:
            out.append(Segment(marker, start, i + 2, i + 2))
            i += 2
            if marker == EOI:
                break
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        end = i + 2 + length
        if marker != SOS:
            out.append(Segment(marker, start, end, end))
            i = end
            continue
        j = end  # entropy-coded data runs to the next marker other than a stuffed 0 or RSTn
        while j + 1 < len(data) and not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
            j += 1
        if j + 1 >= len(data):
            j = len(data)
        out.append(Segment(marker, start, j, end))
        i = j
    return out


def scans(data: bytes) -> list[Segment]:
    return [s for s in segments(data) if s.marker == SOS]


def with_dimensions(data: bytes, width: int, height: int) -> bytes:
    """The file with its SOF header claiming width x height: the classic decompression bomb."""
    sof = next(s for s in segments(data) if s.marker in SOF_MARKERS)
    b = bytearray(data)
    b[sof.start + 5:sof.start + 7] = height.to_bytes(2, "big")
    b[sof.start + 7:sof.start + 9] = width.to_bytes(2, "big")
    return bytes(b)


def damage_entropy(data: bytes, scan: int = 0, at: float = 0.5) -> bytes:
    """Overwrite 16 bytes of a scan's entropy-coded data with 64 one-bits (never a valid
    Huffman code), keeping the byte stuffing valid so only the Huffman decoder can notice."""
    s = scans(data)[scan]
    pos = s.data_start + int((s.end - s.data_start - 16) * at)
    return data[:pos] + b"\xff\x00" * 8 + data[pos + 16:]


def cut_scan(data: bytes, scan: int = -1, at: float = 0.5) -> bytes:
    """The file cut in the middle of a scan and closed with EOI: a well-formed ending that
    hides the missing data (libjpeg warns 'premature end of data segment')."""
    s = scans(data)[scan]
    pos = s.data_start + int((s.end - s.data_start) * at)
    while data[pos - 1] == 0xFF:  # do not leave half of a stuffed byte or marker behind
        pos -= 1
    return data[:pos] + b"\xff\xd9"


def duplicate_scan(data: bytes, scan: int = 0) -> bytes:
    """The file with one scan (header and data) repeated right after itself."""
    s = scans(data)[scan]
    return data[:s.end] + data[s.start:s.end] + data[s.end:]


def insert_before_eoi(data: bytes, junk: bytes) -> bytes:
    """Bytes between the last scan and EOI: libjpeg's 'extraneous bytes before marker 0xd9'."""
    eoi = segments(data)[-1]
    assert eoi.marker == EOI
    return data[:eoi.start] + junk + data[eoi.start:]


def strip_eoi(data: bytes) -> bytes:
    eoi = segments(data)[-1]
    assert eoi.marker == EOI
    return data[:eoi.start]


def set_scan_params(data: bytes, scan: int, ss: int, se: int, ah_al: int = 0) -> bytes:
    """Rewrite the spectral selection (Ss, Se) and successive approximation bytes of a scan."""
    s = scans(data)[scan]
    b = bytearray(data)
    b[s.data_start - 3:s.data_start] = bytes([ss, se, ah_al])
    return bytes(b)
