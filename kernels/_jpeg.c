/* Region-of-interest JPEG decode and strict validation with libjpeg-turbo.
 *
 * RandomResizedCrop throws away on average half of each image, so the loader decodes only
 * the crop: rows above it are skipped (jpeg_skip_scanlines: entropy decode only, no IDCT or
 * colour conversion), columns outside it are cropped at iMCU granularity
 * (jpeg_crop_scanline), decoding stops at the crop's last row (the rest of the entropy-coded
 * data is never read), and the DCT scale (1/2, 1/4, 1/8) is the largest that still covers the
 * output size. No Python binding of libjpeg-turbo exposes these calls, hence this file.
 *
 * decode_region(data, x, y, w, h, denom, out, fast=True) -> (left, top, width, rows)
 *     Decodes the source-pixel box [x, x+w) x [y, y+h) (clipped to the image) at scale
 *     1/denom into `out` (a writable C-contiguous buffer), as RGB rows of `width * 3` bytes.
 *     The returned box is in scaled pixels and contains the requested one (it may be widened
 *     to iMCU edges). fast: libjpeg's fast integer IDCT and, where the library is known to be
 *     safe with it, plain (merged) upsampling.
 * header(data) -> (width, height, components, multi_scan)
 *     From the headers only. multi_scan: the file has several scans (progressive, or one
 *     scan per component), so decoding it buffers the coefficients of the whole image.
 * validate(data) -> (width, height, components, multi_scan)
 *     Entropy-decodes the whole file to its EOI cheaply (DCT scale 1/8, no colour
 *     conversion) under the same strict policy and limits: the converter's admission check.
 * add_restarts(data, interval_mcus, optimize=False) -> (jpeg, interval, offsets)
 * decode_region_rst(data, x, y, w, h, denom, out, fast=True, offsets=None) -> (left, top, width, rows)
 * restart_layout(data, offsets=None) -> (mcus_per_row, mcu_rows, interval) or None
 *     Restart-indexed JPEGs: see "restart-indexed JPEGs" below.
 * set_limits(*, max_memory=None, max_scans=None, max_multiscan_pixels=None) -> old limits
 * get_limits() -> {"max_memory": ..., "max_scans": ..., "max_multiscan_pixels": ...}
 * features() -> dict: the library actually loaded and which safe paths are in use.
 *
 * Errors:
 *     CorruptJPEG (a ValueError): the bytes are damaged or hostile: bad header, truncated,
 *         any of libjpeg's corrupt-data warnings, a limit exceeded, too many scans.
 *     UnsupportedJPEG (a ValueError): a valid JPEG this fast path cannot turn into RGB
 *         (CMYK/YCCK, unsupported process or precision); the caller may fall back to Pillow.
 *     ValueError (exactly): the caller's mistake (bad denom, a box outside the image, `out`
 *         too small, read-only or not contiguous).
 *     MemoryError: a real allocation failure.
 *     RuntimeError: libjpeg reported that this module misused it (a bug here).
 * The GIL is released while decoding, so loader threads can decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dladdr */
#endif
#include <Python.h>
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

#ifndef LIBJPEG_TURBO_VERSION_NUMBER
#define LIBJPEG_TURBO_VERSION_NUMBER 0 /* not libjpeg-turbo's headers: assume the worst */
#define LIBJPEG_TURBO_VERSION unknown
#endif
#define STR_(x) #x
#define STR(x) STR_(x)

/* libjpeg-turbo < 2.1.3 overruns the application's buffer when merged (plain, 4:2:0)
 * upsampling is combined with jpeg_crop_scanline (libjpeg-turbo #574, ChangeLog 2.1.3[4]):
 * without these headers the merged path is not even compiled in. */
#define MERGED_CROP_SAFE_AT_BUILD (LIBJPEG_TURBO_VERSION_NUMBER >= 2001003)

#if JPEG_LIB_VERSION >= 70
#define DCT_SCALED(c) ((c)->DCT_h_scaled_size)
#define MIN_DCT_SCALED(d) ((d)->min_DCT_h_scaled_size)
#else
#define DCT_SCALED(c) ((c)->DCT_scaled_size)
#define MIN_DCT_SCALED(d) ((d)->min_DCT_scaled_size)
#endif

static PyObject *CorruptJPEG, *UnsupportedJPEG;

/* -- limits ----------------------------------------------------------------------------------
 * Defaults that never reject a real photo. The largest ImageNet images are about 10,000 x
 * 7,000 px (70 MP), mostly baseline. A multi-scan file (progressive, or one scan per
 * component) makes libjpeg hold the whole image's coefficients, 2 bytes each: 3 bytes per pixel
 * at 4:2:0, 6 at 4:4:4, 8 for 4:4:4:4 CMYK, whatever the crop or scale. 100 MP covers the
 * largest photo with room to spare; at 8 bytes per pixel that is 800 MB, under the 1 GiB memory
 * cap, which is then a backstop for what the pixel cap does not foresee. Bombs claiming
 * 16000^2 (750 MB) to 65500^2 (12.5 GB) are refused before anything is allocated.
 * Scans: libjpeg's progressive script writes 10 (6 for grey), Photoshop 3 to 5, mozjpeg's
 * optimised scripts about a dozen; 100 leaves a wide margin while bounding the decode time of
 * a hostile many-scan file (each scan costs a pass over the image's blocks).
 * Read and written only with the GIL held (decoders copy them before releasing it). */
typedef struct {
    long long max_memory;
    long long max_scans;
    long long max_multiscan_pixels;
} limits_t;

static const limits_t default_limits = {1LL << 30, 100, 100000000LL};
static limits_t limits = {1LL << 30, 100, 100000000LL};

/* -- features decided at import (see probe_* below) ---------------------------------------- */
static int merged_crop_fixed = 0; /* probe: the loaded library has the #574 fix */
static int crop_669_fixed = 0;    /* probe: the loaded library has the #669 fix */
static int use_merged = 0;        /* fast=True may use merged upsampling with crop/skip */
static int workaround_669 = 1;    /* decode affected files at full width instead of cropping */

/* -- error handling -------------------------------------------------------------------------- */
enum { FAIL_NONE = 0, FAIL_CORRUPT, FAIL_UNSUPPORTED, FAIL_NOMEM, FAIL_INTERNAL };

typedef struct {
    struct jpeg_error_mgr pub; /* first: libjpeg's callbacks get a pointer to it */
    struct jpeg_progress_mgr progress;
    jmp_buf jump;
    int failure;
    const char *corrupt; /* how a data error reads: "corrupt JPEG data", "bad JPEG header" */
    long long max_scans, max_memory;
    char message[JMSG_LENGTH_MAX + 160];
} context;

static void fail(j_common_ptr cinfo, int kind, const char *fmt, ...) {
    context *ctx = (context *)cinfo->err;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->message, sizeof ctx->message, fmt, ap);
    va_end(ap);
    ctx->failure = kind;
    longjmp(ctx->jump, 1);
}

/* libjpeg's own text without its "Corrupt JPEG data: " prefix (ours says the same). */
static const char *libjpeg_text(j_common_ptr cinfo, char *buf) {
    static const char prefix[] = "Corrupt JPEG data: ";
    (*cinfo->err->format_message)(cinfo, buf);
    return strncmp(buf, prefix, sizeof prefix - 1) == 0 ? buf + sizeof prefix - 1 : buf;
}

static void on_error(j_common_ptr cinfo) {
    char text[JMSG_LENGTH_MAX];
    const char *what = libjpeg_text(cinfo, text);
    context *ctx = (context *)cinfo->err;
    switch (cinfo->err->msg_code) {
    case JERR_OUT_OF_MEMORY:
        /* Cases 2 and 4: malloc failed. The others are size sanity checks that only an
         * absurd header can fail. */
        if (cinfo->err->msg_parm.i[0] == 2 || cinfo->err->msg_parm.i[0] == 4)
            fail(cinfo, FAIL_NOMEM, "libjpeg could not allocate memory (%s)", what);
        fail(cinfo, FAIL_CORRUPT, "decompression bomb: %s", what);
        break;
    case JERR_NO_BACKING_STORE:
        /* Only reached when max_memory_to_use (our limit) is below what the image needs. */
        fail(cinfo, FAIL_CORRUPT,
             "decompression bomb: decoding needs more than the %lld-byte memory limit "
             "(kernels._jpeg.set_limits)", ctx->max_memory);
        break;
    case JERR_CONVERSION_NOTIMPL:
    case JERR_NOT_COMPILED:
    case JERR_NOTIMPL:
    case JERR_SOF_UNSUPPORTED:
    case JERR_BAD_PRECISION:
    case JERR_ARITH_NOTIMPL:
        fail(cinfo, FAIL_UNSUPPORTED, "unsupported JPEG: %s", what);
        break;
    case JERR_BAD_STATE:
    case JERR_BAD_CROP_SPEC:
    case JERR_BAD_LIB_VERSION:
    case JERR_BAD_STRUCT_SIZE:
    case JERR_BAD_BUFFER_MODE:
    case JERR_BAD_POOL_ID:
    case JERR_BAD_ALLOC_CHUNK:
    case JERR_BAD_ALIGN_TYPE:
        fail(cinfo, FAIL_INTERNAL, "kernels._jpeg misused libjpeg: %s", what);
        break;
    default:
        fail(cinfo, FAIL_CORRUPT, "%s: %s", ctx->corrupt, what);
    }
}

/* Warnings that mean the pixels are not the image's. libjpeg's default is to go on, filling
 * what it lost with grey or garbage; Pillow does too, so these files would pass every check.
 * In: JWRN_JPEG_EOF (data ends early; also a file that lacks only its EOI, which Pillow calls
 * truncated too), JWRN_HIT_MARKER (a scan ends before its last MCU: cut or damaged data),
 * JWRN_HUFF_BAD_CODE and JWRN_ARITH_BAD_CODE (damaged entropy-coded data), JWRN_MUST_RESYNC
 * (a restart marker is missing or out of order: data was lost in between),
 * JWRN_BOGUS_PROGRESSION (a progressive scan refines what was never sent or resends it: no
 * encoder writes that), and JWRN_NOT_SEQUENTIAL unless Ss, Se, Ah and Al are all zero.
 * Out (accepted): JWRN_EXTRANEOUS_DATA (bytes between segments, common in real ImageNet files;
 * skipped, the pixels are intact), JWRN_NOT_SEQUENTIAL with all-zero parameters (libjpeg's
 * note: some old baseline encoders wrote zeros there; the sequential decoder ignores them),
 * JWRN_ADOBE_XFORM and JWRN_JFIF_MAJOR (unknown metadata versions; libjpeg's assumption is the
 * usual one), JWRN_BOGUS_ICC (only from jpeg_read_icc_profile, never called here) and
 * JWRN_TOO_MUCH_DATA (a caller error this module never makes). */
static void on_message(j_common_ptr cinfo, int level) {
    if (level >= 0) return; /* trace messages */
    char text[JMSG_LENGTH_MAX];
    switch (cinfo->err->msg_code) {
    case JWRN_JPEG_EOF:
        fail(cinfo, FAIL_CORRUPT, "truncated JPEG: premature end of data");
        break;
    case JWRN_NOT_SEQUENTIAL: {
        j_decompress_ptr d = (j_decompress_ptr)cinfo;
        if (!cinfo->is_decompressor || (d->Ss == 0 && d->Se == 0 && d->Ah == 0 && d->Al == 0)) return;
        fail(cinfo, FAIL_CORRUPT, "corrupt JPEG data: %s", libjpeg_text(cinfo, text));
        break;
    }
    case JWRN_HIT_MARKER:
    case JWRN_HUFF_BAD_CODE:
#if JPEG_LIB_VERSION >= 70 || defined(C_ARITH_CODING_SUPPORTED) || defined(D_ARITH_CODING_SUPPORTED)
    case JWRN_ARITH_BAD_CODE:
#endif
    case JWRN_MUST_RESYNC:
    case JWRN_BOGUS_PROGRESSION:
        fail(cinfo, FAIL_CORRUPT, "corrupt JPEG data: %s", libjpeg_text(cinfo, text));
        break;
    default:
        return;
    }
}

/* Called by libjpeg between units of input work; a scan cap as djpeg -maxscans has. */
static void on_progress(j_common_ptr cinfo) {
    context *ctx = (context *)cinfo->err;
    if (cinfo->is_decompressor && ((j_decompress_ptr)cinfo)->input_scan_number > ctx->max_scans)
        fail(cinfo, FAIL_CORRUPT, "corrupt JPEG data: more than %lld scans (the limit; "
             "kernels._jpeg.set_limits)", ctx->max_scans);
}

/* Sets up cinfo and ctx; call setjmp(ctx->jump) right after, then create(). */
static void prepare(struct jpeg_decompress_struct *cinfo, context *ctx, const limits_t *lim) {
    /* Zeroed so that jpeg_destroy_decompress is safe even if jpeg_create fails early. */
    memset(cinfo, 0, sizeof *cinfo);
    memset(ctx, 0, sizeof *ctx);
    cinfo->err = jpeg_std_error(&ctx->pub);
    ctx->pub.error_exit = on_error;
    ctx->pub.emit_message = on_message;
    ctx->progress.progress_monitor = on_progress;
    ctx->corrupt = "corrupt JPEG data";
    ctx->max_scans = lim->max_scans;
    ctx->max_memory = lim->max_memory;
}

static void create(struct jpeg_decompress_struct *cinfo, context *ctx, const Py_buffer *data) {
    jpeg_create_decompress(cinfo);
    cinfo->progress = &ctx->progress;
    /* Caps the whole-image buffers of multi-scan files (jmemnobs: beyond it libjpeg would
     * need a backing store, which it does not have, and fails with JERR_NO_BACKING_STORE). */
    cinfo->mem->max_memory_to_use = (long)ctx->max_memory;
    jpeg_mem_src(cinfo, (const unsigned char *)data->buf, (unsigned long)data->len);
}

/* After jpeg_read_header: refuse multi-scan files too large to buffer. */
static void check_multiscan(j_decompress_ptr cinfo, const limits_t *lim) {
    if (jpeg_has_multiple_scans(cinfo) &&
        (unsigned long long)cinfo->image_width * cinfo->image_height > (unsigned long long)lim->max_multiscan_pixels)
        fail((j_common_ptr)cinfo, FAIL_CORRUPT,
             "decompression bomb: a multi-scan JPEG of %u x %u pixels (the limit is %lld pixels; "
             "kernels._jpeg.set_limits)", (unsigned)cinfo->image_width, (unsigned)cinfo->image_height,
             lim->max_multiscan_pixels);
}

/* Raises the Python exception for a failed decode; returns NULL. */
static PyObject *raise_failure(const context *ctx) {
    switch (ctx->failure) {
    case FAIL_UNSUPPORTED:
        PyErr_SetString(UnsupportedJPEG, ctx->message);
        break;
    case FAIL_NOMEM:
        PyErr_SetString(PyExc_MemoryError, ctx->message);
        break;
    case FAIL_INTERNAL:
        PyErr_SetString(PyExc_RuntimeError, ctx->message);
        break;
    default:
        PyErr_SetString(CorruptJPEG, ctx->message);
    }
    return NULL;
}

/* libjpeg-turbo < 3.0 (#669): with fancy upsampling at DCT scale 1/2 or 1/4, a component whose
 * upsampling is done partly by IDCT scaling (2x4 and 4x2 luma sampling) gets a wrong
 * downsampled_width from jpeg_crop_scanline, so part of every cropped row is never upsampled
 * and the colour converter reads uninitialised memory. True when this file, as set up, is
 * such a case (the test mirrors jinit_upsampler's choice of a width-driven upsampler). */
static int crop_would_hit_669(j_decompress_ptr cinfo) {
    int min = MIN_DCT_SCALED(cinfo);
    if (!cinfo->do_fancy_upsampling || min <= 1) return 0;
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        jpeg_component_info *c = &cinfo->comp_info[ci];
        int s = DCT_SCALED(c);
        if (s == min) continue;
        if (c->h_samp_factor * s / min != cinfo->max_h_samp_factor ||
            c->v_samp_factor * s / min != cinfo->max_v_samp_factor)
            return 1;
    }
    return 0;
}

/* -- buffers ------------------------------------------------------------------------------- */
static int get_output_buffer(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0) return 0;
    if (!PyObject_CheckBuffer(obj)) return -1; /* not a buffer at all: keep the TypeError */
    PyErr_Clear();
    const char *why = "it is read-only or not C-contiguous";
    Py_buffer probe;
    if (PyObject_GetBuffer(obj, &probe, PyBUF_RECORDS_RO) == 0) {
        why = probe.readonly ? "it is read-only" : "it is not C-contiguous";
        PyBuffer_Release(&probe);
    } else {
        PyErr_Clear();
    }
    PyErr_Format(PyExc_ValueError, "decode_region: out must be a writable C-contiguous buffer (%s)", why);
    return -1;
}

/* -- header ---------------------------------------------------------------------------------- */
static PyObject *py_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    struct jpeg_decompress_struct cinfo;
    context ctx;
    limits_t lim = limits;
    prepare(&cinfo, &ctx, &lim);
    ctx.corrupt = "bad JPEG header";
    if (setjmp(ctx.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return raise_failure(&ctx);
    }
    create(&cinfo, &ctx, &data);
    jpeg_read_header(&cinfo, TRUE);
    PyObject *res = Py_BuildValue("(IIii)", cinfo.image_width, cinfo.image_height, cinfo.num_components,
                                  (int)jpeg_has_multiple_scans(&cinfo));
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return res;
}

/* -- decode_region ----------------------------------------------------------------------------- */
enum { BOX_OK = 0, BOX_OUTSIDE, BOX_TOO_SMALL };

static PyObject *py_decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    PyObject *out_obj;
    int x, y, w, h, denom, fast = 1;
    if (!PyArg_ParseTuple(args, "y*iiiiiO|p", &data, &x, &y, &w, &h, &denom, &out_obj, &fast)) return NULL;
    if (get_output_buffer(out_obj, &out) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8) || w <= 0 || h <= 0 || x < 0 || y < 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "decode_region: need w, h > 0, x, y >= 0 and denom in 1, 2, 4, 8");
        return NULL;
    }
    /* Copied under the GIL: set_limits may run in another thread while this one decodes. */
    limits_t lim = limits;
    int merged = fast && use_merged && MERGED_CROP_SAFE_AT_BUILD;
    int avoid_669 = workaround_669;
    struct jpeg_decompress_struct cinfo;
    context ctx;
    prepare(&cinfo, &ctx, &lim);
    /* volatile: read after a longjmp */
    volatile int box = BOX_OK;
    volatile JDIMENSION left = 0, width = 0, top = 0, rows = 0;
    volatile int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(ctx.jump)) {
        failed = 1;
    } else {
        ctx.corrupt = "bad JPEG header";
        create(&cinfo, &ctx, &data);
        jpeg_read_header(&cinfo, TRUE);
        ctx.corrupt = "corrupt JPEG data";
        /* Limits first: a bomb must not reach the caller's fallback decoder as "unsupported". */
        check_multiscan(&cinfo, &lim);
        if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK)
            fail((j_common_ptr)&cinfo, FAIL_UNSUPPORTED, "unsupported JPEG: %s colour space (no RGB conversion "
                 "in libjpeg)", cinfo.jpeg_color_space == JCS_CMYK ? "CMYK" : "YCCK");
        /* 64-bit: x + w can overflow int */
        int64_t sx1 = (int64_t)x + w, sy1 = (int64_t)y + h;
        if ((uint64_t)x >= cinfo.image_width || (uint64_t)y >= cinfo.image_height) {
            box = BOX_OUTSIDE;
        } else {
            if (sx1 > (int64_t)cinfo.image_width) sx1 = cinfo.image_width;
            if (sy1 > (int64_t)cinfo.image_height) sy1 = cinfo.image_height;
            cinfo.out_color_space = JCS_RGB;
            cinfo.scale_num = 1;
            cinfo.scale_denom = (unsigned int)denom;
            /* Fast integer IDCT and plain upsampling: the crop is resized right after, which
             * hides their small error, and they are the cheapest paths in libjpeg-turbo. Plain
             * upsampling only where cropping it is known not to overrun `out`. */
            cinfo.dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
            cinfo.do_fancy_upsampling = merged ? FALSE : TRUE;
            jpeg_start_decompress(&cinfo);
            JDIMENSION ow = cinfo.output_width, oh = cinfo.output_height;
            /* x < image_width implies x0 < ow = ceil(image_width / denom); likewise y0 < oh. */
            JDIMENSION x0 = (JDIMENSION)x / denom, y0 = (JDIMENSION)y / denom;
            JDIMENSION x1 = (JDIMENSION)((sx1 + denom - 1) / denom), y1 = (JDIMENSION)((sy1 + denom - 1) / denom);
            if (x1 > ow) x1 = ow;
            if (y1 > oh) y1 = oh;
            JDIMENSION xo = x0, cw = x1 - x0;
            int full_width = 0; /* decode whole rows and copy the box out of them */
            if (cw < ow) {
                if (avoid_669 && crop_would_hit_669(&cinfo)) full_width = 1;
                else jpeg_crop_scanline(&cinfo, &xo, &cw);
            } else {
                xo = 0;
                cw = ow;
            }
            size_t stride = (size_t)cw * 3;
            if ((size_t)out.len / stride < (size_t)(y1 - y0)) {
                box = BOX_TOO_SMALL;
            } else {
                JSAMPARRAY scratch = NULL;
                if (full_width)
                    scratch = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, ow * 3, 1);
                if (y0 > 0) jpeg_skip_scanlines(&cinfo, y0);
                unsigned char *dst = (unsigned char *)out.buf;
                while (cinfo.output_scanline < y1) {
                    JSAMPROW row = dst + stride * (cinfo.output_scanline - y0);
                    if (full_width) {
                        jpeg_read_scanlines(&cinfo, scratch, 1);
                        memcpy(row, scratch[0] + (size_t)xo * 3, stride);
                    } else {
                        jpeg_read_scanlines(&cinfo, &row, 1);
                    }
                }
                left = xo;
                width = cw;
                top = y0;
                rows = y1 - y0;
            }
        }
        /* Abort rather than finish: the entropy-coded data after the crop is never read. */
        jpeg_abort_decompress(&cinfo);
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (failed) return raise_failure(&ctx);
    if (box == BOX_OUTSIDE) {
        PyErr_SetString(PyExc_ValueError, "decode_region: the box lies outside the image");
        return NULL;
    }
    if (box == BOX_TOO_SMALL) {
        PyErr_SetString(PyExc_ValueError, "decode_region: output buffer too small");
        return NULL;
    }
    return Py_BuildValue("(IIII)", left, top, width, rows);
}

/* -- validate ----------------------------------------------------------------------------------
 * libjpeg-turbo's fast Huffman decoder (baseline files, used while a whole MCU's worst case
 * is in the input buffer) decodes an invalid code as 0 without a warning, so damage inside a
 * baseline scan goes unnoticed when the whole file is in memory. Feeding the data in chunks
 * smaller than that worst case (512 bytes per block) keeps libjpeg on its checked decoder,
 * which reports JWRN_HUFF_BAD_CODE. decode_scaled and add_restarts read through it too (they
 * are the converter's validation where they run). decode_region keeps the fast decoder: the
 * converter has already validated what is in a shard. */
#define VALIDATE_CHUNK 256

typedef struct {
    struct jpeg_source_mgr pub;
    const JOCTET *data;
    size_t len, pos;
} chunked_source;

static void chunked_init(j_decompress_ptr cinfo) {}
static void chunked_term(j_decompress_ptr cinfo) {}

static boolean chunked_fill(j_decompress_ptr cinfo) {
    static const JOCTET fake_eoi[2] = {0xFF, JPEG_EOI};
    chunked_source *src = (chunked_source *)cinfo->src;
    if (src->pos >= src->len) {
        WARNMS(cinfo, JWRN_JPEG_EOF); /* raises: see on_message */
        src->pub.next_input_byte = fake_eoi;
        src->pub.bytes_in_buffer = 2;
        return TRUE;
    }
    size_t n = src->len - src->pos < VALIDATE_CHUNK ? src->len - src->pos : VALIDATE_CHUNK;
    src->pub.next_input_byte = src->data + src->pos;
    src->pub.bytes_in_buffer = n;
    src->pos += n;
    return TRUE;
}

static void chunked_skip(j_decompress_ptr cinfo, long num_bytes) {
    chunked_source *src = (chunked_source *)cinfo->src;
    if (num_bytes <= 0) return;
    if ((size_t)num_bytes > src->pub.bytes_in_buffer) {
        /* Jump straight to the target rather than refilling chunk by chunk. */
        size_t ahead = (size_t)num_bytes - src->pub.bytes_in_buffer;
        src->pos = ahead > src->len - src->pos ? src->len : src->pos + ahead;
        src->pub.bytes_in_buffer = 0;
        chunked_fill(cinfo);
        return;
    }
    src->pub.next_input_byte += num_bytes;
    src->pub.bytes_in_buffer -= (size_t)num_bytes;
}

static void chunked_setup(chunked_source *src, const Py_buffer *data) {
    memset(src, 0, sizeof *src);
    src->data = (const JOCTET *)data->buf;
    src->len = (size_t)data->len;
    src->pub.init_source = chunked_init;
    src->pub.fill_input_buffer = chunked_fill;
    src->pub.skip_input_data = chunked_skip;
    src->pub.resync_to_restart = jpeg_resync_to_restart;
    src->pub.term_source = chunked_term;
}

/* Inside the caller's setjmp: the decompressor on the chunked source (the checked Huffman
 * decoder), its header read and the multi-scan limit applied. The strict reading every entry
 * point that admits untrusted bytes shares (validate, decode_scaled, add_restarts): with
 * on_message and on_error, the one damage policy. keep_markers: APPn and COM are saved. */
static void open_checked(j_decompress_ptr cinfo, context *ctx, const Py_buffer *data, chunked_source *src,
                         const limits_t *lim, int keep_markers) {
    ctx->corrupt = "bad JPEG header";
    create(cinfo, ctx, data);
    cinfo->src = &src->pub; /* replaces create()'s memory source (pool memory, freed later) */
    if (keep_markers) {
        for (int m = 0; m < 16; m++) jpeg_save_markers(cinfo, JPEG_APP0 + m, 0xFFFF);
        jpeg_save_markers(cinfo, JPEG_COM, 0xFFFF);
    }
    jpeg_read_header(cinfo, TRUE);
    ctx->corrupt = "corrupt JPEG data";
    check_multiscan(cinfo, lim);
}

static PyObject *py_validate(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    limits_t lim = limits;
    struct jpeg_decompress_struct cinfo;
    context ctx;
    prepare(&cinfo, &ctx, &lim);
    volatile int failed = 0;
    volatile JDIMENSION iw = 0, ih = 0;
    volatile int comps = 0, multi = 0;
    chunked_source src;
    chunked_setup(&src, &data);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(ctx.jump)) {
        failed = 1;
    } else {
        open_checked(&cinfo, &ctx, &data, &src, &lim, 0);
        iw = cinfo.image_width;
        ih = cinfo.image_height;
        comps = cinfo.num_components;
        multi = jpeg_has_multiple_scans(&cinfo);
        /* Every byte is still entropy-decoded (that is what finds damage), but the IDCT runs
         * at 1/8 (DC only) and only on what the output needs: luma for YCbCr and grey, the
         * components as stored for anything else (CMYK, YCCK: no conversion is needed to
         * read the data, and libjpeg has none from them to grey). */
        J_COLOR_SPACE cs = cinfo.jpeg_color_space;
        cinfo.out_color_space = (cs == JCS_YCbCr || cs == JCS_GRAYSCALE || cs == JCS_RGB) ? JCS_GRAYSCALE : cs;
        cinfo.scale_num = 1;
        cinfo.scale_denom = 8;
        cinfo.dct_method = JDCT_IFAST;
        cinfo.do_fancy_upsampling = FALSE;
        jpeg_start_decompress(&cinfo);
        int nrows = cinfo.rec_outbuf_height > 0 ? cinfo.rec_outbuf_height : 1;
        JSAMPARRAY rows = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                                      cinfo.output_width * cinfo.output_components,
                                                      (JDIMENSION)nrows);
        while (cinfo.output_scanline < cinfo.output_height) jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)nrows);
        jpeg_finish_decompress(&cinfo); /* reads on to EOI: damage after the last row counts */
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (failed) return raise_failure(&ctx);
    return Py_BuildValue("(IIii)", iw, ih, comps, multi);
}

/* decode_scaled(data, scale_num, out) -> (width, height)
 * validate's checks and a decode in one pass, for the converter's resize: the whole image at
 * scale scale_num/8 (libjpeg's scaled IDCTs, 1..8: a DCT-domain downscale at any eighth, where
 * Pillow's draft only halves), RGB, accurate IDCT and fancy upsampling (the pixels are stored
 * again), through the checked Huffman decoder and on to EOI, under the strict policy. One
 * entropy-decoding pass instead of validate's plus Pillow's. */
static PyObject *py_decode_scaled(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    PyObject *out_obj;
    int num;
    if (!PyArg_ParseTuple(args, "y*iO", &data, &num, &out_obj)) return NULL;
    if (get_output_buffer(out_obj, &out) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (num < 1 || num > 8) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "decode_scaled: scale_num must be in 1..8");
        return NULL;
    }
    limits_t lim = limits;
    struct jpeg_decompress_struct cinfo;
    context ctx;
    prepare(&cinfo, &ctx, &lim);
    volatile int failed = 0, too_small = 0;
    volatile JDIMENSION ow = 0, oh = 0;
    chunked_source src;
    chunked_setup(&src, &data);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(ctx.jump)) {
        failed = 1;
    } else {
        open_checked(&cinfo, &ctx, &data, &src, &lim, 0);
        if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK)
            fail((j_common_ptr)&cinfo, FAIL_UNSUPPORTED, "unsupported JPEG: %s colour space (no RGB conversion "
                 "in libjpeg)", cinfo.jpeg_color_space == JCS_CMYK ? "CMYK" : "YCCK");
        cinfo.out_color_space = JCS_RGB;
        cinfo.scale_num = (unsigned int)num;
        cinfo.scale_denom = 8;
        cinfo.dct_method = JDCT_ISLOW;
        cinfo.do_fancy_upsampling = TRUE;
        jpeg_start_decompress(&cinfo);
        ow = cinfo.output_width;
        oh = cinfo.output_height;
        size_t stride = (size_t)ow * 3;
        if ((size_t)out.len / stride < (size_t)oh) {
            too_small = 1;
            jpeg_abort_decompress(&cinfo);
        } else {
            unsigned char *dst = (unsigned char *)out.buf;
            while (cinfo.output_scanline < oh) {
                JSAMPROW row = dst + stride * cinfo.output_scanline;
                jpeg_read_scanlines(&cinfo, &row, 1);
            }
            jpeg_finish_decompress(&cinfo); /* reads on to EOI: damage after the last row counts */
        }
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (failed) return raise_failure(&ctx);
    if (too_small) {
        PyErr_Format(PyExc_ValueError, "decode_scaled: output buffer too small for %u x %u RGB", (unsigned)ow,
                     (unsigned)oh);
        return NULL;
    }
    return Py_BuildValue("(II)", ow, oh);
}

/* -- restart-indexed JPEGs -----------------------------------------------------------------------
 * A baseline JPEG with a restart marker every N MCUs, where N divides the MCUs per row, is
 * randomly addressable: DC prediction restarts at each marker, so the intervals that cover a
 * crop form a valid JPEG of their own once given a header with the region's size and markers
 * renumbered 0..7 in sequence. decode_region_rst decodes that small stream instead of the whole
 * file, so entropy decoding (the dominant cost at ImageNet sizes) touches only the crop's MCUs.
 *
 * add_restarts(data, interval_mcus, optimize=False) -> (jpeg, interval, offsets)
 *     Losslessly transcodes a single-scan Huffman 8-bit grey or YCbCr JPEG (the DCT coefficients
 *     are copied, never requantised) with a restart marker every `interval` MCUs: the largest
 *     divisor of the MCUs per row that is at most `interval_mcus` (0: one MCU row). APPn and COM
 *     markers are kept (EXIF, ICC: the loader applies neither, but other readers of the shard
 *     may). The coefficients are read under validate's checks (the checked Huffman decoder, the
 *     strict policy, on to EOI), so the transcode is also the file's validation: one entropy-
 *     decoding pass where validate and a transcode took two. It calls corrupt exactly what
 *     validate does, and besides refuses a single-scan image over the multi-scan pixel limit
 *     (it holds every coefficient) and coefficients no 8-bit encoder writes (it could not code
 *     them again). optimize: Huffman tables optimised for the image (libjpeg's extra gathering
 *     pass) instead of the standard ones; see TRANSCODE_TABLES for why it is off.
 *     offsets: little-endian uint32, the byte offset of each interval's entropy-coded data,
 *     then that of the EOI marker. Raises UnsupportedJPEG for progressive, arithmetic-coded,
 *     multi-scan, 12-bit, CMYK/YCCK or RGB files (the converter validates and passes those
 *     through), CorruptJPEG for damaged ones.
 * decode_region_rst(data, x, y, w, h, denom, out, fast=True, offsets=None)
 *     decode_region's contract. Files whose restart layout does not allow splicing (none,
 *     an interval that does not divide the MCU rows, progressive, ...) and offsets that do not
 *     match the data take decode_region's path on the whole file: offsets are untrusted, and
 *     every one is checked against the bytes before anything is copied.
 * restart_layout(data, offsets=None) -> (mcus_per_row, mcu_rows, interval) or None
 *     Whether and how decode_region_rst can splice this file (tests and diagnostics). */

typedef struct {
    size_t sof;         /* offset of the SOF marker's Y field (height, then width) */
    size_t dri;         /* offset of the DRI segment's FF, 0 if none */
    size_t sos;         /* offset of the SOS marker's FF */
    size_t entropy;     /* first byte of entropy-coded data */
    unsigned width, height, mcu_w, mcu_h, mcus_per_row, mcu_rows, interval, n_intervals;
    size_t keep[24][2]; /* header segments to copy (offset, length), in order */
    int n_keep;
} rst_layout;

static unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* Walks the headers up to SOS. 0: a single-scan baseline/extended Huffman file with a restart
 * interval that never crosses an MCU row; -1: anything else (including damage: the whole-file
 * path then decides). Reads nothing outside [d, d + n). */
static int rst_parse(const unsigned char *d, size_t n, rst_layout *L) {
    memset(L, 0, sizeof *L);
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return -1;
    size_t p = 2;
    int ncomp = 0, maxh = 0, maxv = 0;
    for (;;) {
        if (p + 4 > n || d[p] != 0xFF) return -1;
        while (p + 4 <= n && d[p + 1] == 0xFF) p++; /* fill bytes */
        if (p + 4 > n) return -1;
        unsigned m = d[p + 1];
        unsigned len = be16(d + p + 2);
        if (len < 2 || p + 2 + len > n) return -1;
        const unsigned char *s = d + p + 4; /* segment body, len - 2 bytes */
        int keep = 0;
        if (m == 0xC0 || m == 0xC1) {
            if (L->sof || len < 8 || s[0] != 8) return -1;
            L->sof = p + 5;
            L->height = be16(s + 1);
            L->width = be16(s + 3);
            ncomp = s[5];
            if ((ncomp != 1 && ncomp != 3) || len != 8 + 3u * ncomp || !L->height || !L->width) return -1;
            for (int c = 0; c < ncomp; c++) {
                int h = s[6 + 3 * c + 1] >> 4, v = s[6 + 3 * c + 1] & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4) return -1;
                if (h > maxh) maxh = h;
                if (v > maxv) maxv = v;
            }
            keep = 1;
        } else if (m == 0xDD) {
            if (len != 4) return -1;
            L->dri = p;
            L->interval = be16(s);
            keep = 1;
        } else if (m == 0xDA) {
            if (!L->sof || len < 3 || s[0] != ncomp) return -1; /* one scan of every component */
            L->sos = p;
            L->entropy = p + 2 + len;
            keep = 1;
        } else if (m == 0xDB || m == 0xC4 || m == 0xE0 || m == 0xEE) {
            keep = 1; /* tables; JFIF and Adobe, which say how to convert the colours */
        } else if (!((m >= 0xE1 && m <= 0xEF) || m == 0xFE)) {
            return -1; /* what libjpeg would not skip either: it decides on the whole file */
        }
        if (keep) {
            if (L->n_keep == (int)(sizeof L->keep / sizeof L->keep[0])) return -1;
            L->keep[L->n_keep][0] = p;
            L->keep[L->n_keep][1] = 2 + len;
            L->n_keep++;
        }
        p += 2 + len;
        if (L->sos) break;
    }
    if (!L->dri || !L->interval) return -1;
    /* A single-component scan is not interleaved: its MCU is one 8x8 block. */
    L->mcu_w = ncomp == 1 ? 8 : 8 * maxh;
    L->mcu_h = ncomp == 1 ? 8 : 8 * maxv;
    L->mcus_per_row = (L->width + L->mcu_w - 1) / L->mcu_w;
    L->mcu_rows = (L->height + L->mcu_h - 1) / L->mcu_h;
    if (L->mcus_per_row % L->interval) return -1;
    L->n_intervals = L->mcu_rows * (L->mcus_per_row / L->interval);
    return 0;
}

/* Fills offs[0..n_intervals] (interval starts, then the EOI marker's offset) by scanning the
 * entropy-coded data. -1 unless the markers are exactly RST0..7 in sequence, n_intervals - 1 of
 * them, then EOI. With upto < n_intervals it stops once offs[0..upto] are known: a region decode
 * needs no more (and, like decode_region, reads nothing after its last row). */
static int rst_scan(const unsigned char *d, size_t n, const rst_layout *L, uint32_t *offs, unsigned upto) {
    size_t p = L->entropy;
    unsigned k = 0;
    if (n > UINT32_MAX) return -1;
    offs[k++] = (uint32_t)p;
    for (;;) {
        if (k > upto) return 0;
        const unsigned char *f = memchr(d + p, 0xFF, n - p);
        if (f == NULL) return -1;
        p = (size_t)(f - d);
        while (p + 1 < n && d[p + 1] == 0xFF) p++;
        if (p + 1 >= n) return -1;
        unsigned m = d[p + 1];
        p += 2;
        if (m == 0x00) continue;
        if (m >= 0xD0 && m <= 0xD7) {
            if (k >= L->n_intervals || m != 0xD0 + ((k - 1) & 7)) return -1;
            offs[k++] = (uint32_t)p;
            continue;
        }
        if (m != 0xD9 || k != L->n_intervals) return -1;
        offs[k] = (uint32_t)(p - 2);
        return 0;
    }
}

/* Checks caller-given offsets against the bytes: the right count, in order, each interval start
 * right after the RST marker that belongs there, the end on an EOI. Then every range copied
 * lies in the buffer. Offsets that pass but still lie (one that skips a marker) only make
 * libjpeg see a misplaced marker: a CorruptJPEG, never a read outside the buffer. */
static int rst_check(const unsigned char *d, size_t n, const rst_layout *L, const uint32_t *offs, size_t count) {
    if (count != (size_t)L->n_intervals + 1 || offs[0] != L->entropy) return -1;
    for (size_t i = 1; i < L->n_intervals; i++) {
        if ((uint64_t)offs[i] <= (uint64_t)offs[i - 1] + 2 || offs[i] > n || d[offs[i] - 2] != 0xFF ||
            d[offs[i] - 1] != 0xD0 + ((i - 1) & 7))
            return -1;
    }
    size_t end = offs[L->n_intervals];
    if (end < offs[L->n_intervals - 1] || end + 2 > n || d[end] != 0xFF || d[end + 1] != 0xD9) return -1;
    return 0;
}

/* Writes the spliced JPEG of MCU rows [r0, r1) and columns [c0, c1) (c0, c1 multiples of the
 * interval, or c1 the row's end) into dst, or measures it (dst NULL). Returns its size. */
static size_t rst_splice(const unsigned char *d, const rst_layout *L, const uint32_t *offs, unsigned r0,
                         unsigned r1, unsigned c0, unsigned c1, unsigned char *dst) {
    size_t q = 0;
#define PUT(src, len) do { if (dst) memcpy(dst + q, (src), (len)); q += (len); } while (0)
    static const unsigned char soi[2] = {0xFF, 0xD8};
    PUT(soi, 2);
    unsigned w = (c1 * L->mcu_w < L->width ? c1 * L->mcu_w : L->width) - c0 * L->mcu_w;
    unsigned h = (r1 * L->mcu_h < L->height ? r1 * L->mcu_h : L->height) - r0 * L->mcu_h;
    for (int i = 0; i < L->n_keep; i++) {
        size_t at = q;
        PUT(d + L->keep[i][0], L->keep[i][1]);
        if (dst && L->keep[i][0] + 5 == L->sof) {
            dst[at + 5] = (unsigned char)(h >> 8);
            dst[at + 6] = (unsigned char)h;
            dst[at + 7] = (unsigned char)(w >> 8);
            dst[at + 8] = (unsigned char)w;
        }
    }
    unsigned per_row = L->mcus_per_row / L->interval, k = 0;
    for (unsigned r = r0; r < r1; r++) {
        for (unsigned c = c0 / L->interval; c < (c1 + L->interval - 1) / L->interval; c++) {
            size_t i = (size_t)r * per_row + c;
            size_t a = offs[i], b = i + 1 < L->n_intervals ? offs[i + 1] - 2 : offs[i + 1];
            if (k) {
                unsigned char rst[2] = {0xFF, (unsigned char)(0xD0 + ((k - 1) & 7))};
                PUT(rst, 2);
            }
            PUT(d + a, b - a);
            k++;
        }
    }
    static const unsigned char eoi[2] = {0xFF, 0xD9};
    PUT(eoi, 2);
#undef PUT
    return q;
}

/* The layout and offsets of `data` (offsets from `given` when not NULL; else scanned, only as far
 * as the MCU row that holds pixel row y_end - 1); 0, or -1 when the file cannot be spliced. *offs
 * is malloc'ed. */
static int rst_prepare(const Py_buffer *data, const Py_buffer *given, rst_layout *L, uint32_t **offs,
                       uint64_t y_end) {
    *offs = NULL;
    const unsigned char *d = data->buf;
    size_t n = (size_t)data->len;
    if (n > UINT32_MAX || rst_parse(d, n, L) < 0) return -1; /* offsets are 32-bit */
    if (given != NULL) {
        if (given->len % 4) return -1;
        size_t count = (size_t)given->len / 4;
        if (count != (size_t)L->n_intervals + 1) return -1;
        *offs = malloc(count * sizeof **offs);
        if (*offs == NULL) return -1;
        const unsigned char *g = given->buf;
        for (size_t i = 0; i < count; i++)
            (*offs)[i] = (uint32_t)g[4 * i] | (uint32_t)g[4 * i + 1] << 8 | (uint32_t)g[4 * i + 2] << 16 |
                         (uint32_t)g[4 * i + 3] << 24;
        if (rst_check(d, n, L, *offs, count) == 0) return 0;
    } else {
        *offs = malloc(((size_t)L->n_intervals + 1) * sizeof **offs);
        unsigned upto = L->n_intervals;
        if (y_end >= 1 && y_end < L->height)
            upto = (unsigned)((y_end - 1) / L->mcu_h + 1) * (L->mcus_per_row / L->interval);
        if (*offs != NULL && rst_scan(d, n, L, *offs, upto) == 0) return 0;
    }
    free(*offs);
    *offs = NULL;
    return -1;
}

static int get_offsets(PyObject *obj, Py_buffer *view) {
    if (obj == NULL || obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    return 1;
}

static PyObject *py_restart_layout(PyObject *self, PyObject *args) {
    Py_buffer data, given;
    PyObject *offs_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*|O", &data, &offs_obj)) return NULL;
    int have = get_offsets(offs_obj, &given);
    if (have < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    rst_layout L;
    uint32_t *offs;
    int ok = rst_prepare(&data, have ? &given : NULL, &L, &offs, UINT64_MAX) == 0;
    free(offs);
    if (have) PyBuffer_Release(&given);
    PyBuffer_Release(&data);
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("(III)", L.mcus_per_row, L.mcu_rows, L.interval);
}

static PyObject *py_decode_region_rst(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"data", "x", "y", "w", "h", "denom", "out", "fast", "offsets", NULL};
    Py_buffer data, given;
    PyObject *data_obj, *out_obj, *offs_obj = Py_None;
    int x, y, w, h, denom, fast = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiiiiiO|pO:decode_region_rst", kw, &data_obj, &x, &y, &w,
                                     &h, &denom, &out_obj, &fast, &offs_obj))
        return NULL;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0) return NULL;
    int have = get_offsets(offs_obj, &given);
    if (have < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    rst_layout L;
    uint32_t *offs = NULL;
    PyObject *src = NULL; /* the spliced JPEG, or NULL: the whole file */
    unsigned px0 = 0, py0 = 0;
    int usable = x >= 0 && y >= 0 && w > 0 && h > 0 && (denom == 1 || denom == 2 || denom == 4 || denom == 8) &&
                 rst_prepare(&data, have ? &given : NULL, &L, &offs, (uint64_t)y + (uint64_t)h) == 0 &&
                 (unsigned)x < L.width && (unsigned)y < L.height;
    if (usable) {
        int64_t sx1 = (int64_t)x + w, sy1 = (int64_t)y + h;
        if (sx1 > L.width) sx1 = L.width;
        if (sy1 > L.height) sy1 = L.height;
        unsigned c0 = (unsigned)x / L.mcu_w / L.interval * L.interval;
        unsigned c1 = (unsigned)((sx1 + L.mcu_w - 1) / L.mcu_w);
        c1 = (c1 + L.interval - 1) / L.interval * L.interval;
        if (c1 > L.mcus_per_row) c1 = L.mcus_per_row;
        unsigned r0 = (unsigned)y / L.mcu_h, r1 = (unsigned)((sy1 + L.mcu_h - 1) / L.mcu_h);
        size_t size = rst_splice(data.buf, &L, offs, r0, r1, c0, c1, NULL);
        src = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
        if (src == NULL) {
            free(offs);
            if (have) PyBuffer_Release(&given);
            PyBuffer_Release(&data);
            return NULL;
        }
        rst_splice(data.buf, &L, offs, r0, r1, c0, c1, (unsigned char *)PyBytes_AsString(src));
        px0 = c0 * L.mcu_w;
        py0 = r0 * L.mcu_h;
    }
    free(offs);
    if (have) PyBuffer_Release(&given);
    PyBuffer_Release(&data);
    PyObject *call;
    if (src != NULL) {
        call = Py_BuildValue("(NiiiiiOi)", src, x - (int)px0, y - (int)py0, w, h, denom, out_obj, fast);
    } else {
        call = Py_BuildValue("(OiiiiiOi)", data_obj, x, y, w, h, denom, out_obj, fast);
    }
    if (call == NULL) return NULL;
    PyObject *res = py_decode_region(self, call);
    Py_DECREF(call);
    if (res == NULL || src == NULL) return res;
    unsigned left, top, width, rows;
    int ok = PyArg_ParseTuple(res, "IIII", &left, &top, &width, &rows);
    Py_DECREF(res);
    if (!ok) return NULL;
    /* px0, py0 are multiples of 8, so exact at every DCT scale. */
    return Py_BuildValue("(IIII)", left + px0 / denom, top + py0 / denom, width, rows);
}

/* -- add_restarts -------------------------------------------------------------------------------- */
/* A growable memory destination whose buffer this module owns, so an error exit (a longjmp out of
 * libjpeg) can free it; jpeg_mem_dest's buffer is only reachable through libjpeg's private state
 * until it finishes. */
typedef struct {
    struct jpeg_destination_mgr pub;
    unsigned char *buf;
    size_t cap, len;
} grow_dest;

static void grow_init(j_compress_ptr cinfo) {
    grow_dest *d = (grow_dest *)cinfo->dest;
    d->pub.next_output_byte = d->buf;
    d->pub.free_in_buffer = d->cap;
}

static boolean grow_empty(j_compress_ptr cinfo) {
    grow_dest *d = (grow_dest *)cinfo->dest;
    unsigned char *bigger = d->cap <= SIZE_MAX / 2 ? realloc(d->buf, d->cap * 2) : NULL;
    if (bigger == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 4); /* case 4: a failed malloc */
    d->buf = bigger;
    d->pub.next_output_byte = bigger + d->cap;
    d->pub.free_in_buffer = d->cap;
    d->cap *= 2;
    return TRUE;
}

static void grow_term(j_compress_ptr cinfo) {
    grow_dest *d = (grow_dest *)cinfo->dest;
    d->len = d->cap - d->pub.free_in_buffer;
}

/* libjpeg's decoder stores coefficients of any size the file's Huffman codes give (up to 15 bits),
 * and validate accepts them: it checks the stream, not the values. Re-encoding needs them within
 * what an 8-bit encoder writes: AC within +-1023 (10 bits), DC within -1024..1023, so that every
 * DC difference (11 bits) has a code. Checks every block the encoder will read (the padding
 * blocks of an interleaved scan's edge MCUs are not re-encoded). */
static void check_coefficient_range(j_decompress_ptr cinfo, jvirt_barray_ptr *coefs) {
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        jpeg_component_info *c = &cinfo->comp_info[ci];
        JDIMENSION step = (JDIMENSION)c->v_samp_factor; /* the rows the array was requested to give */
        for (JDIMENSION r0 = 0; r0 < c->height_in_blocks; r0 += step) {
            JBLOCKARRAY rows = (*cinfo->mem->access_virt_barray)((j_common_ptr)cinfo, coefs[ci], r0, step, FALSE);
            for (JDIMENSION r = 0; r < step && r0 + r < c->height_in_blocks; r++) {
                /* A row's blocks are contiguous: one vectorised pass over all of them against the
                 * AC range, and only a row where that fails block by block (a DC of -1024). */
                const JCOEF *k = rows[r][0];
                size_t n = (size_t)c->width_in_blocks * DCTSIZE2;
                unsigned bad = 0;
                for (size_t i = 0; i < n; i++) bad |= (uint16_t)(k[i] + 1023) > 2046u;
                if (!bad) continue;
                for (size_t b = 0; b < n; b += DCTSIZE2) {
                    bad = (unsigned)(k[b] + 1024) > 2047u;
                    for (int i = 1; i < DCTSIZE2; i++) bad |= (unsigned)(k[b + i] + 1023) > 2046u;
                    if (bad)
                        fail((j_common_ptr)cinfo, FAIL_CORRUPT, "corrupt JPEG data: DCT coefficient out of range "
                             "(beyond what an 8-bit encoder writes)");
                }
            }
        }
    }
}

/* TRANSCODE_TABLES: the standard Huffman tables (optimize=False) unless the caller asks. Chosen
 * by the figures (benchmarks/RESULTS.md, 2-core AMD EPYC, medians side by side): libjpeg's
 * optimisation is a second pass over every coefficient that halves the transcode's rate (133
 * against 272 img/s on one core), for files 3.0 % smaller (-0.89 % against +2.09 % vs the source
 * on benchmarks.restart_index's q90 photos; 5.5 % on the photo set's mix) that the loader decodes
 * no faster (0.99-1.01x). With the standard tables the converter with the index runs at 0.87-0.94x
 * the reference's per-core rate, with optimised ones 0.47x. */
static PyObject *py_add_restarts(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"data", "interval_mcus", "optimize", NULL};
    Py_buffer data;
    int target, optimize = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*i|p:add_restarts", kw, &data, &target, &optimize)) return NULL;
    if (target < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "add_restarts: interval_mcus must be >= 0");
        return NULL;
    }
    limits_t lim = limits;
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    context ctx;
    prepare(&src, &ctx, &lim);
    memset(&dst, 0, sizeof dst);
    grow_dest dest; /* its address is libjpeg's: in memory, valid after a longjmp */
    memset(&dest, 0, sizeof dest);
    dest.pub.init_destination = grow_init;
    dest.pub.empty_output_buffer = grow_empty;
    dest.pub.term_destination = grow_term;
    dest.cap = (size_t)data.len + (size_t)data.len / 8 + 4096; /* markers and all: rarely grows */
    dest.buf = malloc(dest.cap);
    if (dest.buf == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    volatile unsigned interval = 0;
    volatile int failed = 0, dst_made = 0;
    chunked_source in;
    chunked_setup(&in, &data);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(ctx.jump)) {
        failed = 1;
    } else {
        /* validate's checked reading: this pass is the converter's validation of the file. */
        open_checked(&src, &ctx, &data, &in, &lim, 1);
        /* The whole image's coefficients are held: the multi-scan pixel cap applies. */
        if ((unsigned long long)src.image_width * src.image_height > (unsigned long long)lim.max_multiscan_pixels)
            fail((j_common_ptr)&src, FAIL_CORRUPT, "decompression bomb: %u x %u pixels (the limit is %lld pixels; "
                 "kernels._jpeg.set_limits)", (unsigned)src.image_width, (unsigned)src.image_height,
                 lim.max_multiscan_pixels);
        if (src.progressive_mode || src.arith_code || jpeg_has_multiple_scans(&src) || src.data_precision != 8 ||
            !((src.num_components == 3 && src.jpeg_color_space == JCS_YCbCr) ||
              (src.num_components == 1 && src.jpeg_color_space == JCS_GRAYSCALE)))
            fail((j_common_ptr)&src, FAIL_UNSUPPORTED, "unsupported JPEG: restart markers are only added to "
                 "single-scan Huffman 8-bit grey or YCbCr files");
        /* Sampling ratios libjpeg cannot upsample (3:2, say) still transcode, but the RGB decode
         * of the result fails as the source's does; leave such files as they are. */
        for (int ci = 0; ci < src.num_components; ci++)
            if (src.max_h_samp_factor % src.comp_info[ci].h_samp_factor ||
                src.max_v_samp_factor % src.comp_info[ci].v_samp_factor)
                fail((j_common_ptr)&src, FAIL_UNSUPPORTED, "unsupported JPEG: fractional sampling");
        jvirt_barray_ptr *coefs = jpeg_read_coefficients(&src); /* to EOI: damage after the scan counts */
        check_coefficient_range(&src, coefs);
        dst.err = src.err;
        jpeg_create_compress(&dst);
        dst_made = 1;
        dst.mem->max_memory_to_use = (long)ctx.max_memory;
        dst.dest = &dest.pub;
        jpeg_copy_critical_parameters(&src, &dst);
        int mcu_w = src.num_components == 1 ? 8 : 8 * src.max_h_samp_factor;
        unsigned mpr = (src.image_width + mcu_w - 1) / mcu_w;
        unsigned n = target == 0 || (unsigned)target >= mpr ? mpr : (unsigned)target;
        while (mpr % n) n--;
        if (n > 65535) n = 1; /* DRI is 16 bits; a 1-MCU interval divides every row */
        interval = n;
        dst.restart_interval = n;
        dst.optimize_coding = optimize ? TRUE : FALSE;
        jpeg_write_coefficients(&dst, coefs);
        for (jpeg_saved_marker_ptr m = src.marker_list; m != NULL; m = m->next) {
            /* As jpegtran: the JFIF and Adobe markers libjpeg writes itself are not copied. */
            if (dst.write_JFIF_header && m->marker == JPEG_APP0 && m->data_length >= 5 &&
                memcmp(m->data, "JFIF", 5) == 0)
                continue;
            if (dst.write_Adobe_marker && m->marker == JPEG_APP0 + 14 && m->data_length >= 5 &&
                memcmp(m->data, "Adobe", 5) == 0)
                continue;
            jpeg_write_marker(&dst, m->marker, m->data, m->data_length);
        }
        jpeg_finish_compress(&dst);
        jpeg_finish_decompress(&src);
    }
    if (dst_made) jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    unsigned char *out = dest.buf;
    size_t out_len = dest.len;
    if (failed) {
        free(out);
        return raise_failure(&ctx);
    }
    rst_layout L;
    uint32_t *offs = NULL;
    Py_buffer view;
    PyObject *res = NULL;
    if (PyBuffer_FillInfo(&view, NULL, out, (Py_ssize_t)out_len, 1, PyBUF_SIMPLE) == 0 &&
        rst_prepare(&view, NULL, &L, &offs, UINT64_MAX) == 0) {
        PyObject *table = PyBytes_FromStringAndSize(NULL, ((Py_ssize_t)L.n_intervals + 1) * 4);
        if (table != NULL) {
            unsigned char *t = (unsigned char *)PyBytes_AsString(table);
            for (size_t i = 0; i <= L.n_intervals; i++) {
                t[4 * i] = (unsigned char)offs[i];
                t[4 * i + 1] = (unsigned char)(offs[i] >> 8);
                t[4 * i + 2] = (unsigned char)(offs[i] >> 16);
                t[4 * i + 3] = (unsigned char)(offs[i] >> 24);
            }
            res = Py_BuildValue("(y#IN)", (const char *)out, (Py_ssize_t)out_len, interval, table);
        }
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_RuntimeError, "add_restarts: the transcoded file has no usable restart layout");
    }
    free(offs);
    free(out);
    return res;
}

/* -- limits and features ------------------------------------------------------------------------ */
static PyObject *limits_dict(const limits_t *l) {
    return Py_BuildValue("{s:L,s:L,s:L}", "max_memory", l->max_memory, "max_scans", l->max_scans,
                         "max_multiscan_pixels", l->max_multiscan_pixels);
}

static int positive(PyObject *v, const char *name, long long cap, long long *dst) {
    if (v == NULL || v == Py_None) return 0;
    if (!PyLong_Check(v) || PyBool_Check(v)) {
        PyErr_Format(PyExc_TypeError, "set_limits: %s must be an int", name);
        return -1;
    }
    long long n = PyLong_AsLongLong(v);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        n = -1;
    }
    if (n < 1 || n > cap) {
        PyErr_Format(PyExc_ValueError, "set_limits: %s must be between 1 and %lld", name, cap);
        return -1;
    }
    *dst = n;
    return 0;
}

static PyObject *py_set_limits(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"max_memory", "max_scans", "max_multiscan_pixels", NULL};
    PyObject *mem = NULL, *scans = NULL, *pixels = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOO:set_limits", kw, &mem, &scans, &pixels)) return NULL;
    limits_t next = limits;
    if (positive(mem, "max_memory", LONG_MAX, &next.max_memory) < 0 ||
        positive(scans, "max_scans", INT_MAX, &next.max_scans) < 0 ||
        positive(pixels, "max_multiscan_pixels", LLONG_MAX, &next.max_multiscan_pixels) < 0)
        return NULL;
    PyObject *old = limits_dict(&limits);
    if (old != NULL) limits = next;
    return old;
}

static PyObject *py_get_limits(PyObject *self, PyObject *unused) { return limits_dict(&limits); }

static PyObject *py_default_limits(PyObject *self, PyObject *unused) { return limits_dict(&default_limits); }

/* Where the libjpeg actually loaded lives, and whether it has the 3.x 12-bit API: facts for
 * whoever debugs a module carried to another machine. Decisions use the probes, not these. */
static void loaded_library(char *path, size_t n, int *has_12bit_api) {
    Dl_info info;
    path[0] = 0;
    *has_12bit_api = 0;
    if (dladdr((void *)jpeg_std_error, &info) && info.dli_fname) {
        snprintf(path, n, "%s", info.dli_fname);
        void *lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
        if (lib) {
            *has_12bit_api = dlsym(lib, "jpeg12_read_scanlines") != NULL;
            dlclose(lib);
        }
    }
}

static PyObject *py_features(PyObject *self, PyObject *unused) {
    char path[1024];
    int has12;
    loaded_library(path, sizeof path, &has12);
    return Py_BuildValue("{s:s,s:i,s:s,s:O,s:O,s:O,s:O,s:O,s:O,s:O}",
                         "build_version", STR(LIBJPEG_TURBO_VERSION),
                         "build_version_number", (int)LIBJPEG_TURBO_VERSION_NUMBER,
                         "library", path,
                         "has_12bit_api", has12 ? Py_True : Py_False,
                         "merged_crop_safe_at_build", MERGED_CROP_SAFE_AT_BUILD ? Py_True : Py_False,
                         "merged_crop_fixed", merged_crop_fixed ? Py_True : Py_False,
                         "merged_upsampling", (use_merged && MERGED_CROP_SAFE_AT_BUILD) ? Py_True : Py_False,
                         "crop_669_fixed", crop_669_fixed ? Py_True : Py_False,
                         "workaround_669", workaround_669 ? Py_True : Py_False,
                         "checked_transcode", Py_True);
}

/* Tests only: force the safe paths (plain upsampling off, the #669 workaround on) on a library
 * that would not need them, or restore what the probes decided (no arguments). Never turns on
 * a path the probes found unsafe. */
static PyObject *py_override(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"merged_upsampling", "workaround_669", NULL};
    int merged = -1, avoid = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$pp:_override", kw, &merged, &avoid)) return NULL;
    if (merged == 1 && !(merged_crop_fixed && MERGED_CROP_SAFE_AT_BUILD)) {
        PyErr_SetString(PyExc_ValueError, "_override: merged upsampling with crop is unsafe with this libjpeg");
        return NULL;
    }
    if (avoid == 0 && !crop_669_fixed) {
        PyErr_SetString(PyExc_ValueError, "_override: this libjpeg needs the #669 workaround");
        return NULL;
    }
    use_merged = merged == -1 ? merged_crop_fixed : merged;
    workaround_669 = avoid == -1 ? !crop_669_fixed : avoid;
    Py_RETURN_NONE;
}

/* -- import-time probes of the loaded library ---------------------------------------------------
 * The headers say which libjpeg-turbo this was built against; the library loaded at run time
 * may be another (a module is carried to other machines with their own libjpeg.so.62), and
 * libjpeg.so.62 has no version call. So each fix is tested by running the code it fixed on a
 * tiny image the library itself encodes. A probe that cannot run counts as "not fixed". */
static int probe_encode(int w, int h, int hs0, int vs0, unsigned char **jpg, unsigned long *len) {
    struct jpeg_compress_struct c;
    context ctx;
    memset(&c, 0, sizeof c);
    memset(&ctx, 0, sizeof ctx);
    c.err = jpeg_std_error(&ctx.pub);
    ctx.pub.error_exit = on_error;
    *jpg = NULL;
    *len = 0;
    unsigned char *row = malloc((size_t)w * 3);
    if (row == NULL) return -1;
    if (setjmp(ctx.jump)) {
        jpeg_destroy_compress(&c);
        free(row);
        return -1;
    }
    jpeg_create_compress(&c);
    jpeg_mem_dest(&c, jpg, len);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = 3;
    c.in_color_space = JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, 90, TRUE);
    c.comp_info[0].h_samp_factor = hs0;
    c.comp_info[0].v_samp_factor = vs0;
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        for (int i = 0; i < w; i++) { /* mid-range colours: never 0, the probe's sentinel */
            row[i * 3] = (unsigned char)(100 + (i * 3) % 90);
            row[i * 3 + 1] = (unsigned char)(100 + (c.next_scanline * 5) % 90);
            row[i * 3 + 2] = 150;
        }
        JSAMPROW r = row;
        jpeg_write_scanlines(&c, &r, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    free(row);
    return 0;
}

/* #574 (fixed in 2.1.3): decode a 4:2:0 image with merged upsampling, cropped to its last 32
 * columns, one row at a time into a buffer with room for uncropped rows; a fixed library
 * writes nothing past the cropped rows. */
static int probe_merged_crop(void) {
    enum { W = 128, H = 16 };
    unsigned char *jpg;
    unsigned long len;
    if (probe_encode(W, H, 2, 2, &jpg, &len) < 0) return 0;
    static unsigned char buf[W * 3 * H]; /* a spill is at most one uncropped row */
    memset(buf, 0, sizeof buf);
    struct jpeg_decompress_struct d;
    context ctx;
    limits_t lim = default_limits;
    prepare(&d, &ctx, &lim);
    volatile int ok = 0;
    if (setjmp(ctx.jump) == 0) {
        jpeg_create_decompress(&d);
        jpeg_mem_src(&d, jpg, len);
        jpeg_read_header(&d, TRUE);
        d.out_color_space = JCS_RGB;
        d.do_fancy_upsampling = FALSE;
        jpeg_start_decompress(&d);
        JDIMENSION xo = W - 32, cw = 32;
        jpeg_crop_scanline(&d, &xo, &cw);
        if (cw == 32 && d.output_width == 32) {
            while (d.output_scanline < d.output_height) {
                JSAMPROW row = buf + (size_t)cw * 3 * d.output_scanline;
                jpeg_read_scanlines(&d, &row, 1);
            }
            ok = 1;
            for (size_t i = (size_t)cw * 3 * H; i < sizeof buf; i++)
                if (buf[i] != 0) ok = 0;
        }
        jpeg_abort_decompress(&d);
    }
    jpeg_destroy_decompress(&d);
    free(jpg);
    return ok;
}

/* #669 (fixed in 3.0): crop a 2x4-sampled image at scale 1/2 with fancy upsampling and check
 * the chroma's downsampled_width against the corrected formula. Nothing is decoded. */
static int probe_669(void) {
    unsigned char *jpg;
    unsigned long len;
    if (probe_encode(64, 64, 2, 4, &jpg, &len) < 0) return 0;
    struct jpeg_decompress_struct d;
    context ctx;
    limits_t lim = default_limits;
    prepare(&d, &ctx, &lim);
    volatile int ok = 0;
    if (setjmp(ctx.jump) == 0) {
        jpeg_create_decompress(&d);
        jpeg_mem_src(&d, jpg, len);
        jpeg_read_header(&d, TRUE);
        d.out_color_space = JCS_RGB;
        d.scale_num = 1;
        d.scale_denom = 2;
        d.do_fancy_upsampling = TRUE;
        jpeg_start_decompress(&d);
        JDIMENSION xo = 16, cw = 16;
        if (crop_would_hit_669(&d)) { /* the probe image must be an affected case */
            jpeg_crop_scanline(&d, &xo, &cw);
            ok = 1;
            for (int ci = 0; ci < d.num_components; ci++) {
                jpeg_component_info *c = &d.comp_info[ci];
                unsigned long long num = (unsigned long long)d.output_width * c->h_samp_factor * DCT_SCALED(c);
                unsigned long long den = (unsigned long long)d.max_h_samp_factor * MIN_DCT_SCALED(&d);
                if (c->downsampled_width != (JDIMENSION)((num + den - 1) / den)) ok = 0;
            }
        }
        jpeg_abort_decompress(&d);
    }
    jpeg_destroy_decompress(&d);
    free(jpg);
    return ok;
}

static PyMethodDef methods[] = {
    {"decode_region", py_decode_region, METH_VARARGS,
     "decode_region(data, x, y, w, h, denom, out, fast=True) -> (left, top, width, rows)\n\n"
     "Decode the source-pixel box [x, x+w) x [y, y+h) at scale 1/denom into `out` as RGB rows of\n"
     "width * 3 bytes; the returned box (scaled pixels) contains the requested one. Raises\n"
     "CorruptJPEG, UnsupportedJPEG (fall back to another decoder), ValueError (bad arguments,\n"
     "box outside the image, out too small, read-only or not C-contiguous) or MemoryError."},
    {"decode_region_rst", (PyCFunction)(void (*)(void))py_decode_region_rst, METH_VARARGS | METH_KEYWORDS,
     "decode_region_rst(data, x, y, w, h, denom, out, fast=True, offsets=None) -> (left, top, width, rows)\n\n"
     "decode_region's contract; a file with restart markers every N MCUs (N dividing the MCUs per\n"
     "row) is decoded from only the intervals that cover the box. offsets (add_restarts' table)\n"
     "are checked against the data; without them the markers are found by a scan. Any other\n"
     "file, or offsets that do not match, take decode_region's whole-file path."},
    {"add_restarts", (PyCFunction)(void (*)(void))py_add_restarts, METH_VARARGS | METH_KEYWORDS,
     "add_restarts(data, interval_mcus, optimize=False) -> (jpeg, interval, offsets)\n\n"
     "Losslessly transcode a single-scan Huffman grey/YCbCr JPEG with a restart marker every\n"
     "`interval` MCUs (the largest divisor of the MCUs per row <= interval_mcus; 0: one row),\n"
     "reading it under validate's checks: a success is also a validation. optimize: Huffman\n"
     "tables optimised for the image rather than the standard ones (about 2x the time).\n"
     "offsets: uint32 LE start of each interval's data, then the EOI's offset. Raises\n"
     "UnsupportedJPEG (progressive, arithmetic, multi-scan, 12-bit, CMYK...), CorruptJPEG."},
    {"restart_layout", py_restart_layout, METH_VARARGS,
     "restart_layout(data, offsets=None) -> (mcus_per_row, mcu_rows, interval) or None\n\n"
     "Whether decode_region_rst can splice this file (with these offsets)."},
    {"header", py_header, METH_VARARGS,
     "header(data) -> (width, height, components, multi_scan)\n\n"
     "From the headers only. multi_scan: several scans (progressive, or one per component),\n"
     "so a decode buffers the whole image's coefficients. Raises CorruptJPEG, UnsupportedJPEG."},
    {"decode_scaled", py_decode_scaled, METH_VARARGS,
     "decode_scaled(data, scale_num, out) -> (width, height)\n\n"
     "validate's checks and a decode in one pass: the whole image at scale scale_num/8 (1..8),\n"
     "RGB, into `out` (at least height rows of width * 3 bytes; width = ceil(w * scale_num / 8)).\n"
     "Raises CorruptJPEG, UnsupportedJPEG (CMYK, YCCK), ValueError (out too small), MemoryError."},
    {"validate", py_validate, METH_VARARGS,
     "validate(data) -> (width, height, components, multi_scan)\n\n"
     "Entropy-decode the whole file to its EOI (cheaply: DCT scale 1/8, no colour conversion)\n"
     "under the strict corrupt-data policy and the limits. Raises CorruptJPEG, UnsupportedJPEG,\n"
     "MemoryError. Accepts CMYK and YCCK files."},
    {"set_limits", (PyCFunction)(void (*)(void))py_set_limits, METH_VARARGS | METH_KEYWORDS,
     "set_limits(*, max_memory=None, max_scans=None, max_multiscan_pixels=None) -> dict\n\n"
     "Set the process-wide decode limits (positive ints; None keeps one) and return the previous\n"
     "ones, so set_limits(**old) restores them. A file over a limit raises CorruptJPEG."},
    {"get_limits", py_get_limits, METH_NOARGS, "get_limits() -> dict of the current decode limits."},
    {"default_limits", py_default_limits, METH_NOARGS, "default_limits() -> dict of the built-in limits."},
    {"features", py_features, METH_NOARGS,
     "features() -> dict\n\n"
     "build_version: the libjpeg-turbo headers built against; library: the file loaded;\n"
     "merged_crop_fixed / crop_669_fixed: what the import-time probes found in the loaded\n"
     "library; merged_upsampling: fast=True uses plain (merged) upsampling with crop and skip;\n"
     "workaround_669: 2x4/4x2-sampled files at scale 1/2 and 1/4 are decoded at full width;\n"
     "checked_transcode: add_restarts reads under validate's checks (older builds did not)."},
    {"_override", (PyCFunction)(void (*)(void))py_override, METH_VARARGS | METH_KEYWORDS,
     "_override(*, merged_upsampling=None, workaround_669=None): tests only; see features()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg",
                                    "Region-of-interest JPEG decode and strict validation (libjpeg-turbo).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    CorruptJPEG = PyErr_NewExceptionWithDoc(
        "kernels._jpeg.CorruptJPEG",
        "The JPEG's bytes are damaged or hostile (bad header, truncated, corrupt data, too many\n"
        "scans, a decompression bomb over the limits).", PyExc_ValueError, NULL);
    UnsupportedJPEG = PyErr_NewExceptionWithDoc(
        "kernels._jpeg.UnsupportedJPEG",
        "A JPEG this fast path cannot decode to RGB (CMYK, YCCK, unsupported process or\n"
        "precision); another decoder may manage.", PyExc_ValueError, NULL);
    if (CorruptJPEG == NULL || UnsupportedJPEG == NULL ||
        PyModule_AddObjectRef(m, "CorruptJPEG", CorruptJPEG) < 0 ||
        PyModule_AddObjectRef(m, "UnsupportedJPEG", UnsupportedJPEG) < 0 ||
        PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION", STR(LIBJPEG_TURBO_VERSION)) < 0 ||
        PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    merged_crop_fixed = probe_merged_crop();
    crop_669_fixed = probe_669();
    use_merged = merged_crop_fixed;
    workaround_669 = !crop_669_fixed;
    return m;
}
