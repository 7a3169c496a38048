"""Fuzz target for kernels._jpeg: header, decode_region, validate, decode_scaled, add_restarts
and decode_region_rst on hostile bytes.

An input is 8 parameter bytes (box, DCT scale, fast flag, output buffer size) followed by the
JPEG. `check_one` runs all three calls and checks the module's contract:
  * nothing crashes, and only the documented exceptions come out: CorruptJPEG or
    UnsupportedJPEG for the data, a plain ValueError only for the caller's mistakes (a box
    outside the image, a buffer that is really too small), never MemoryError or RuntimeError
    (the fuzz limits keep every legal decode far below the machine's memory);
  * a successful decode_region returns a region inside the buffer that contains the requested
    box, and writes nothing past that region (the rest of the buffer keeps its fill pattern);
  * the limits hold: a multi-scan file over max_multiscan_pixels is refused as a bomb, and the
    process's peak RSS grows less than RSS_GROWTH_KB;
  * validate agrees with the others: what it accepts has the header's dimensions, and decodes;
    decode_scaled (validate plus a decode at n/8) calls corrupt exactly what validate does, and
    so does add_restarts (validate's checks while it reads the coefficients), besides its own
    refusals (TRANSCODE_OWN_REFUSALS).

Splice inputs (decode_region_rst, the restart-interval splice): 8 parameter bytes, SPLICE_TAG,
a 2-byte little-endian length, that many bytes of restart offsets (add_restarts' table, mutated
like everything else: an untrusted index), then the JPEG. `check_one` runs decode_region_rst
with and without the table under the same contract as decode_region, then the checks above on
the JPEG; and what validate accepts must not be called corrupt by the splice either.

Seed corpus (generated, nothing committed):
    python tests/fuzz/fuzz_jpeg.py --make-corpus CORPUS
With atheris (pip install atheris; libFuzzer's options apply):
    python tests/fuzz/fuzz_jpeg.py -max_total_time=600 -timeout=10 -rss_limit_mb=3000 CORPUS
    (-runs=N for a bounded run, -jobs=2 -workers=2 for both cores; crashes land in ./crash-*)
Without atheris, a built-in mutator (random and JPEG-aware byte edits, no coverage guidance):
    python tests/fuzz/fuzz_jpeg.py --mutate 100000 --seed 1 CORPUS
tests/test_jpeg_hostile.py runs both for a few thousand inputs.

Sanitizers. The C code is what matters, so build the extension instrumented, into a separate
folder, and put that folder first on the path (gcc and clang both work for ASan/UBSan):
    mkdir -p /tmp/asan/kernels && touch /tmp/asan/kernels/__init__.py
    cc -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \\
       -shared -fPIC -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \\
       kernels/_jpeg.c -ljpeg -o /tmp/asan/kernels/_jpeg.abi3.so
    ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(cc -print-file-name=libasan.so)" \\
       FUZZ_JPEG_PATH=/tmp/asan python tests/fuzz/fuzz_jpeg.py --mutate 200000 CORPUS
Coverage-guided on the C code needs clang: add -fsanitize=fuzzer-no-link to the flags above and
preload atheris's runtime instead: LD_PRELOAD="$(python -c 'import atheris;
print(atheris.path())')/asan_with_fuzzer.so". With gcc (no libFuzzer instrumentation), atheris
is guided by this file's Python only, which is close to blind mutation of the seeds.
The system libjpeg is not instrumented either way: ASan sees its writes into our buffers only
through the intercepted memcpy/memset, which is how libjpeg copies rows out.
"""
from __future__ import annotations

import io
import os
import random
import resource
import struct
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE.parents[1]), os.environ.get("FUZZ_JPEG_PATH")):
    if p and p not in sys.path:
        sys.path.insert(0, p)  # FUZZ_JPEG_PATH (an instrumented build) ends up first

import numpy as np  # noqa: E402

from kernels import _jpeg  # noqa: E402

PARAMS = 8
# Small enough that a legal decode stays far below RSS_GROWTH, large enough for every seed.
FUZZ_LIMITS = {"max_memory": 256 << 20, "max_scans": 100, "max_multiscan_pixels": 16_000_000}
RSS_GROWTH_KB = 1 << 20  # peak RSS may grow this much over its value when fuzzing starts
MAX_OUT = 32 << 20  # largest output buffer the target allocates
FILL = 0xA5


def peak_rss_kb() -> int:
    """This process's peak RSS: VmHWM (per address space, so a fresh exec starts low), else
    ru_maxrss (which on Linux keeps the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_rss_ceiling_kb = peak_rss_kb() + RSS_GROWTH_KB


SPLICE_TAG = b"RSTX"


class InvariantError(AssertionError):
    """The module broke its contract on this input."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _params(p: bytes, width: int, height: int):
    fx, fy, fw, fh, dsel, flags, slack = struct.unpack("<BBBBBBH", p)
    denom = (1, 2, 4, 8)[dsel & 3]
    w_, h_ = max(width, 1), max(height, 1)
    x, y = fx * w_ // 256, fy * h_ // 256
    if flags & 2:  # now and then a box outside the image
        x += w_
    w = 1 + fw * w_ // 256 if not flags & 8 else 1 + fw * 4096  # sometimes past the right edge
    h = 1 + fh * h_ // 256
    return x, y, w, h, denom, bool(flags & 1), bool(flags & 4), slack


def _out_size(x: int, y: int, w: int, h: int, denom: int, tight: bool, slack: int, W: int, H: int):
    """(rows, full_width, n): the box's rows and the image's width at 1/denom, and the output
    buffer's size in bytes: whole rows plus slack, or (`tight`) maybe too small."""
    rows = max(_ceil_div(min(y + h, H), denom) - y // denom, 1)
    full_width = _ceil_div(W, denom)
    if tight:  # maybe too small: the requested width plus a little
        n = (_ceil_div(min(x + w, W), denom) - x // denom + slack % 64) * rows * 3
    else:
        n = full_width * rows * 3 + slack % 4096
    return rows, full_width, max(1, min(n, MAX_OUT))


def _check_caller_error(what: str, msg: str, inside: bool, n: int, need: int) -> None:
    """A ValueError from a decode is the caller's mistake only: a box outside the image, or a
    buffer of fewer than `need` bytes."""
    if "outside" in msg:
        if inside:
            raise InvariantError(f"{what}: a box inside the image called outside") from None
    elif "too small" in msg:
        if n >= need:
            raise InvariantError(f"{what}: a {n}-byte buffer (of {need} needed) called too small") from None
    else:
        raise InvariantError(f"{what}: unexpected ValueError: {msg}") from None


def _check_region(name: str, result, buf: np.ndarray, n: int, x: int, y: int, w: int, h: int, denom: int,
                  W: int, H: int) -> None:
    """The box and buffer invariants of a successful decode_region or decode_region_rst."""
    left, top, width, got_rows = result
    full_width = _ceil_div(W, denom)
    x1, y1 = _ceil_div(min(x + w, W), denom), _ceil_div(min(y + h, H), denom)
    if not (left <= x // denom and left + width >= x1 and left + width <= full_width):
        raise InvariantError(f"{name}: columns [{left}, {left + width}) do not contain [{x // denom}, {x1})")
    if not (top == y // denom and top + got_rows == y1):
        raise InvariantError(f"{name}: rows [{top}, {top + got_rows}) are not [{y // denom}, {y1})")
    end = width * got_rows * 3
    if end > n:
        raise InvariantError(f"{name}: region of {end} bytes returned in a {n}-byte buffer")
    if end < n and not (buf[end:] == FILL).all():
        raise InvariantError(f"{name}: bytes written past the returned region ({end} of {n})")


def check_scaled(data: bytes, num: int, header, valid, bomb: bool) -> None:
    """decode_scaled is validate plus a decode: it calls corrupt exactly what validate does, and
    what it decodes validate accepts, with the header's size at scale num/8."""
    W, H = (header[0], header[1]) if header else (64, 64)
    ow, oh = _ceil_div(W * num, 8), _ceil_div(H * num, 8)
    buf = np.full(max(1, min(ow * oh * 3, MAX_OUT)), FILL, np.uint8)
    try:
        got = _jpeg.decode_scaled(data, num, buf)
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG) as e:
        # Unsupported is allowed (sampling libjpeg cannot upsample to RGB: Pillow then decides).
        if valid is not None and isinstance(e, _jpeg.CorruptJPEG) and ow * oh * 3 <= MAX_OUT:
            raise InvariantError(f"validate accepted a file decode_scaled calls corrupt: {e}") from None
        if bomb and isinstance(e, _jpeg.CorruptJPEG) and "decompression bomb" not in str(e):
            raise InvariantError(f"decode_scaled refused a multi-scan bomb for another reason: {e}") from None
        return
    except ValueError as e:
        if "too small" not in str(e) or ow * oh * 3 <= buf.size:
            raise InvariantError(f"decode_scaled: unexpected ValueError: {e}") from None
        return
    if valid is None or tuple(got) != (ow, oh):
        raise InvariantError(f"decode_scaled gave {got} for a {W}x{H} file validate says {valid} of, at {num}/8")


# What add_restarts refuses on its own account, beyond validate's checks: a single-scan image over
# the multi-scan pixel limit (it holds every coefficient), coefficients it could not re-encode.
TRANSCODE_OWN_REFUSALS = ("decompression bomb", "corrupt JPEG data: DCT coefficient out of range")


def check_transcode(data: bytes, interval: int, header, valid) -> str:
    """add_restarts on hostile bytes: only the data's exceptions. It reads the coefficients under
    validate's checks (the converter's one pass), so it calls corrupt exactly what validate does,
    besides TRANSCODE_OWN_REFUSALS, and transcodes nothing validate refuses; what it writes is a
    valid JPEG of the same size whose restart layout decode_region_rst can splice."""
    try:
        out, n, table = _jpeg.add_restarts(data, interval)
    except _jpeg.UnsupportedJPEG:
        return ""
    except _jpeg.CorruptJPEG as e:
        if valid is not None and not str(e).startswith(TRANSCODE_OWN_REFUSALS):
            raise InvariantError(f"validate accepted a file add_restarts calls corrupt: {e}") from None
        return ""
    if header is None:
        raise InvariantError("add_restarts succeeded on a file whose header fails")
    if valid is None:
        raise InvariantError("add_restarts transcoded a file validate refuses")
    try:
        v = _jpeg.validate(out)
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG) as e:
        raise InvariantError(f"add_restarts wrote a JPEG validate refuses: {e}") from None
    layout = _jpeg.restart_layout(out, table)
    if tuple(v[:2]) != tuple(header[:2]) or layout is None or layout[2] != n or layout != _jpeg.restart_layout(out):
        raise InvariantError(f"add_restarts wrote {v} with layout {layout}, interval {n}, from {header}")
    return "+transcoded"


def check_splice(p: bytes, table: bytes, data: bytes) -> str:
    """decode_region_rst on hostile data and a hostile offset table, with and without the table."""
    try:
        header = _jpeg.header(data)
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG):
        header = None
    W, H = (header[0], header[1]) if header else (64, 64)
    x, y, w, h, denom, fast, tight, slack = _params(p, W, H)
    rows, full_width, n = _out_size(x, y, w, h, denom, tight, slack, W, H)
    # The table is only checked where it points (a stray marker inside an interval passes it; the
    # scan refuses such a file), so the two may disagree on damaged data; neither may crash.
    outcome = "splice" if _jpeg.restart_layout(data, table) is not None else "splice-none"
    if _jpeg.restart_layout(data) is not None:
        outcome += "+scan"
    corrupt = False
    for offsets in (table, None):
        buf = np.full(n, FILL, np.uint8)
        try:
            r = _jpeg.decode_region_rst(data, x, y, w, h, denom, buf, fast, offsets=offsets)
        except _jpeg.CorruptJPEG:
            corrupt = True
        except _jpeg.UnsupportedJPEG:
            pass
        except ValueError as e:
            _check_caller_error("splice", str(e), x < W and y < H and header is not None, n, full_width * rows * 3)
        else:
            if header is None:
                raise InvariantError("decode_region_rst succeeded on a file whose header fails")
            _check_region("splice", r, buf, n, x, y, w, h, denom, W, H)
            outcome += "-decoded"
    if corrupt:
        try:
            _jpeg.validate(data)
        except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG):
            pass
        else:
            raise InvariantError("validate accepted a file decode_region_rst calls corrupt")
    return outcome


def check_one(blob: bytes) -> str:
    """Run the module on one input and check its contract; returns the outcome (for stats).
    Raises InvariantError on a violation (a crash ends the process instead)."""
    if len(blob) < PARAMS:
        return "short"
    p, data = blob[:PARAMS], blob[PARAMS:]
    splice = ""
    if data.startswith(SPLICE_TAG) and len(data) >= len(SPLICE_TAG) + 2:
        k = len(SPLICE_TAG)
        t = struct.unpack("<H", data[k:k + 2])[0]
        table, data = data[k + 2:k + 2 + t], data[k + 2 + t:]
        splice = check_splice(p, table, data) + ":"
    header = None
    try:
        header = _jpeg.header(data)
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG):
        pass
    W, H = (header[0], header[1]) if header else (64, 64)
    multi = bool(header and header[3])
    bomb = multi and W * H > _jpeg.get_limits()["max_multiscan_pixels"]
    x, y, w, h, denom, fast, tight, slack = _params(p, W, H)
    outside = x >= W or y >= H
    rows, full_width, n = _out_size(x, y, w, h, denom, tight, slack, W, H)
    buf = np.full(n, FILL, np.uint8)
    outcome = "decoded"
    try:
        left, top, width, got_rows = _jpeg.decode_region(data, x, y, w, h, denom, buf, fast)
    except _jpeg.CorruptJPEG as e:
        outcome = "corrupt"
        if bomb and "decompression bomb" not in str(e):
            raise InvariantError(f"a multi-scan {W}x{H} file was refused for another reason: {e}") from None
    except _jpeg.UnsupportedJPEG:
        outcome = "unsupported"
        if bomb:
            raise InvariantError(f"a multi-scan {W}x{H} bomb was called unsupported") from None
    except ValueError as e:
        outcome = "caller-error"
        _check_caller_error("decode_region", str(e), not outside, n, full_width * rows * 3)
    else:
        if header is None:
            raise InvariantError("decode_region succeeded on a file whose header fails")
        if bomb:
            raise InvariantError(f"a multi-scan {W}x{H} file over the limit was decoded")
        _check_region("decode_region", (left, top, width, got_rows), buf, n, x, y, w, h, denom, W, H)
    try:
        v = _jpeg.validate(data)
    except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG) as e:
        if bomb and "decompression bomb" not in str(e):
            raise InvariantError(f"validate refused a {W}x{H} multi-scan bomb for another reason: {e}") from None
    else:
        if header is None or tuple(v) != tuple(header):
            raise InvariantError(f"validate says {v}, header says {header}")
        if bomb:
            raise InvariantError(f"validate accepted a multi-scan {W}x{H} file over the limit")
        if outcome == "corrupt":
            # decode_region reads less than validate (only the box's rows) and never more, so
            # a file validate accepts must decode.
            raise InvariantError("validate accepted a file decode_region calls corrupt")
        outcome += "+valid"
    check_scaled(data, p[4] % 8 + 1, header, v if "+valid" in outcome else None, bomb)
    outcome += check_transcode(data, p[5] % 9, header, v if "+valid" in outcome else None)
    rss = peak_rss_kb()
    if rss > _rss_ceiling_kb:
        raise InvariantError(f"peak RSS {rss >> 10} MB exceeds {_rss_ceiling_kb >> 10} MB")
    return splice + outcome


# -- seeds ----------------------------------------------------------------------------------

def seed_inputs() -> dict[str, bytes]:
    """Small JPEGs of every kind the loader meets, and some it should not, each with parameter
    bytes in front. Made with Pillow, plus tests/jpeg_encoder.c where it builds."""
    from PIL import Image

    import jpeg_fixtures as fx

    rng = np.random.default_rng(0)
    jpegs: dict[str, bytes] = {}
    for i, (w, h) in enumerate(((48, 40), (97, 33), (16, 16), (130, 70))):
        rgb = fx.photo(w, h, seed=i)
        for sub in ("4:2:0", "4:2:2", "4:4:4"):
            jpegs[f"pil_{w}x{h}_{sub}"] = fx.pil_jpeg(rgb, subsampling=sub)
            jpegs[f"pil_{w}x{h}_{sub}_prog"] = fx.pil_jpeg(rgb, subsampling=sub, progressive=True)
        grey = io.BytesIO()
        Image.fromarray(rgb).convert("L").save(grey, "JPEG", quality=85)
        jpegs[f"grey_{w}x{h}"] = grey.getvalue()
        cmyk = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG", quality=85)
        jpegs[f"cmyk_{w}x{h}"] = cmyk.getvalue()
    if fx.encoder_unavailable_reason() is None:
        rgb = fx.photo(72, 56, seed=9)
        for name, samp in (("2x4", ((2, 4), (1, 1), (1, 1))), ("4x2", ((4, 2), (1, 1), (1, 1))),
                           ("4x1", ((4, 1), (1, 1), (1, 1))), ("2x2_1x2", ((2, 2), (1, 2), (1, 1)))):
            for scans in fx.SCANS:
                jpegs[f"enc_{name}_{scans}"] = fx.encode(rgb, sampling=samp, scans=scans, restart_interval=2)
    base = jpegs["pil_48x40_4:2:0_prog"]
    jpegs["bomb_prog"] = fx.with_dimensions(base, 16000, 16000)
    jpegs["damaged"] = fx.damage_entropy(jpegs["pil_97x33_4:2:0"])
    # Large enough that libjpeg-turbo's fast Huffman decoder (which reads a bad code as 0, without
    # a warning) would run where the data is whole in memory: what validate's checked decoder finds.
    jpegs["damaged_early"] = fx.damage_entropy(fx.pil_jpeg(fx.photo(160, 120, seed=11)), at=0.1)
    jpegs["cut"] = fx.cut_scan(base)
    jpegs["dup_scan"] = fx.duplicate_scan(base)
    out = {}
    for name, data in jpegs.items():
        p = bytes(rng.integers(0, 256, PARAMS, dtype=np.uint8))
        out[name] = p + data
    # Restart-indexed files and their offset tables (the splice target), interval 1 MCU to 1 row.
    for i, name in enumerate(sorted(n for n in jpegs if n.startswith(("pil_", "grey_")) and "prog" not in n)):
        try:
            rst, _, table = _jpeg.add_restarts(jpegs[name], (0, 1, 2, 4)[i % 4])
        except (_jpeg.CorruptJPEG, _jpeg.UnsupportedJPEG):
            continue
        p = bytes(rng.integers(0, 256, PARAMS, dtype=np.uint8))
        out[f"splice_{name}"] = p + splice_input(table, rst)
    return out


def splice_input(table: bytes, jpeg: bytes) -> bytes:
    """The splice target's input after the parameter bytes."""
    return SPLICE_TAG + struct.pack("<H", len(table)) + table + jpeg


def make_corpus(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, blob in seed_inputs().items():
        path = directory / f"seed_{name.replace(':', '')}"
        path.write_bytes(blob)
        paths.append(path)
    return paths


# -- built-in mutator (no atheris needed) ---------------------------------------------------

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def mutate(blob: bytes, rnd: random.Random, corpus: list[bytes]) -> bytes:
    b = bytearray(blob)
    for _ in range(rnd.randint(1, 4)):
        if len(b) <= PARAMS + 2:
            break
        op = rnd.randrange(10)
        i = rnd.randrange(len(b))
        if op == 9 and b[PARAMS:PARAMS + len(SPLICE_TAG)] == SPLICE_TAG and len(b) >= PARAMS + len(SPLICE_TAG) + 2:
            # an offset of the table
            k = PARAMS + len(SPLICE_TAG)
            t = struct.unpack("<H", bytes(b[k:k + 2]))[0] // 4
            t = min(t, (len(b) - k - 2) // 4)
            if t > 0:
                j = k + 2 + 4 * rnd.randrange(t)
                v = struct.unpack("<I", bytes(b[j:j + 4]))[0]
                v = rnd.choice((v + 1, v - 1, v + 2, v - 2, 0, 0xFFFFFFFF, v + rnd.randrange(1, 4096),
                                rnd.randrange(1 << 32))) & 0xFFFFFFFF
                b[j:j + 4] = struct.pack("<I", v)
        elif op == 0:  # bit flip
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            b[i] = rnd.choice(_INTERESTING)
        elif op == 2:  # a marker's length or a header field: the bytes right after an 0xFF
            ffs = [k for k in range(PARAMS, len(b) - 4) if b[k] == 0xFF and b[k + 1] not in (0, 0xFF)]
            if ffs:
                k = rnd.choice(ffs) + rnd.randrange(2, 10)
                if k < len(b):
                    b[k] = rnd.randrange(256)
        elif op == 3:  # truncate
            del b[rnd.randrange(PARAMS + 2, len(b)):]
        elif op == 4:  # delete a run
            del b[i:i + rnd.randrange(1, 64)]
        elif op == 5:  # duplicate a run
            n = rnd.randrange(1, 256)
            b[i:i] = b[i:i + n]
        elif op == 6:  # splice another input's tail
            other = rnd.choice(corpus)
            j = rnd.randrange(PARAMS, len(other))
            b = b[:i] + bytearray(other[j:])
        elif op == 7:  # new parameters
            b[:PARAMS] = bytes(rnd.randrange(256) for _ in range(PARAMS))
        else:  # insert random bytes
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 16)))
    return bytes(b)


def run_mutations(corpus: list[bytes], iterations: int, seed: int = 0, crash_dir: Path | None = None) -> Counter:
    """Check every seed, then `iterations` mutants of them; raises InvariantError (after saving
    the input to crash_dir) on a violation. Sets the fuzz limits and restores the old ones."""
    global _rss_ceiling_kb
    rnd = random.Random(seed)
    stats: Counter = Counter()
    _rss_ceiling_kb = peak_rss_kb() + RSS_GROWTH_KB
    old = _jpeg.set_limits(**FUZZ_LIMITS)
    try:
        inputs = list(corpus) + [None] * iterations
        for item in inputs:
            blob = item if item is not None else mutate(rnd.choice(corpus), rnd, corpus)
            try:
                stats[check_one(blob)] += 1
            except InvariantError:
                if crash_dir is not None:
                    crash_dir.mkdir(parents=True, exist_ok=True)
                    (crash_dir / f"violation-{seed}-{sum(stats.values())}").write_bytes(blob)
                raise
    finally:
        _jpeg.set_limits(**old)
    return stats


# Kinds of libjpeg message: with an uninstrumented extension, these branches (and those of
# check_one) are all the coverage libFuzzer sees, so inputs reaching a new kind of failure are
# kept in the corpus rather than thrown away as "nothing new".
_MESSAGE_KINDS = ("Huffman", "premature end of data segment", "truncated", "progression", "scans",
                  "decompression bomb", "memory", "SOS", "SOF", "DQT", "DHT", "DRI", "marker", "RST",
                  "sampling", "precision", "component", "colour", "color", "Empty", "Not a JPEG",
                  "too small", "outside", "arithmetic", "Bogus", "Invalid", "Unsupported")


def _feature(outcome: str, message: str) -> int:
    n = 0
    for i, kind in enumerate(_MESSAGE_KINDS):
        if kind in message:
            n = i + 1
            break
    return n * 16 + len(outcome)


def _atheris_main(argv: list[str]) -> None:
    import atheris

    _jpeg.set_limits(**FUZZ_LIMITS)
    checked = atheris.instrument_func(check_one)
    feature = atheris.instrument_func(_feature)

    def one_input(data: bytes) -> None:
        try:
            h = _jpeg.header(data[PARAMS:])
            message = f"header {h[2]} {h[3]}"
        except ValueError as e:
            message = str(e)
        feature(checked(data), message)

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "--make-corpus":
        paths = make_corpus(Path(argv[2]))
        print(f"wrote {len(paths)} seeds to {argv[2]}")
        return 0
    if len(argv) >= 2 and argv[1] == "--mutate":
        import argparse

        ap = argparse.ArgumentParser(prog="fuzz_jpeg.py --mutate")
        ap.add_argument("iterations", type=int)
        ap.add_argument("corpus", type=Path)
        ap.add_argument("--seed", type=int, default=0)
        args = ap.parse_args(argv[2:])
        corpus = [p.read_bytes() for p in sorted(args.corpus.iterdir()) if p.is_file()]
        if not corpus:
            corpus = list(seed_inputs().values())
        stats = run_mutations(corpus, args.iterations, args.seed, crash_dir=Path.cwd())
        print(dict(stats))
        return 0
    _atheris_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
