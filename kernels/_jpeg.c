/* Region-of-interest JPEG decode with libjpeg-turbo.
 *
 * RandomResizedCrop throws away on average half of each image, so the loader decodes only
 * the crop: rows above it are skipped (jpeg_skip_scanlines: entropy decode only, no IDCT or
 * colour conversion), columns outside it are cropped at iMCU granularity
 * (jpeg_crop_scanline), decoding stops at the crop's last row (the rest of the entropy-coded
 * data is never read), and the DCT scale (1/2, 1/4, 1/8) is the largest that still covers the
 * output size. No Python binding of libjpeg-turbo exposes these calls, hence this file.
 *
 * decode_region(data, x, y, w, h, denom, out) -> (left, top, width, height)
 *     Decodes the source-pixel box [x, x+w) x [y, y+h) at scale 1/denom into `out`
 *     (a writable C-contiguous uint8 buffer), as RGB rows of `width * 3` bytes. The returned
 *     box is in scaled pixels and contains the requested one (it is widened to iMCU edges).
 * header(data) -> (width, height, components, progressive)
 *
 * Errors raise ValueError; a file that ends early raises ValueError("truncated ...") instead
 * of libjpeg's default of filling the rest with grey. The GIL is released while decoding, so
 * loader threads can decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *err = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    error_mgr *err = (error_mgr *)cinfo->err;
    /* Warnings (level -1) are mostly harmless ("extraneous bytes before marker"); only a
     * premature end of data means the pixels are not the image's. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) err->truncated = 1;
}

static void setup(struct jpeg_decompress_struct *cinfo, error_mgr *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->truncated = 0;
    err->message[0] = 0;
}

static PyObject *py_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    setup(&cinfo, &err);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "bad JPEG header: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    PyObject *res = Py_BuildValue("(IIii)", cinfo.image_width, cinfo.image_height, cinfo.num_components,
                                  (int)jpeg_has_multiple_scans(&cinfo));
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return res;
}

static PyObject *py_decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int x, y, w, h, denom, fast = 1;
    if (!PyArg_ParseTuple(args, "y*iiiiiw*|p", &data, &x, &y, &w, &h, &denom, &out, &fast)) return NULL;
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8) || w <= 0 || h <= 0 || x < 0 || y < 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "decode_region: need w, h > 0, x, y >= 0 and denom in 1, 2, 4, 8");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    setup(&cinfo, &err);
    /* volatile: read after a longjmp */
    volatile int too_small = 0, bad_box = 0;
    volatile JDIMENSION left = 0, width = 0, top = 0, rows = 0;
    volatile int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        cinfo.out_color_space = JCS_RGB;
        cinfo.scale_num = 1;
        cinfo.scale_denom = (unsigned int)denom;
        /* Fast integer IDCT and plain upsampling: the crop is resized right after, which
         * hides their small error, and they are the cheapest paths in libjpeg-turbo. */
        cinfo.dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
        cinfo.do_fancy_upsampling = fast ? FALSE : TRUE;
        jpeg_start_decompress(&cinfo);
        JDIMENSION ow = cinfo.output_width, oh = cinfo.output_height;
        JDIMENSION x0 = (JDIMENSION)x / denom, y0 = (JDIMENSION)y / denom;
        JDIMENSION x1 = ((JDIMENSION)(x + w) + denom - 1) / denom;
        JDIMENSION y1 = ((JDIMENSION)(y + h) + denom - 1) / denom;
        if (x1 > ow) x1 = ow;
        if (y1 > oh) y1 = oh;
        if (x0 >= x1 || y0 >= y1) {
            bad_box = 1;
        } else {
            JDIMENSION xo = x0, cw = x1 - x0;
            if (cw < ow) jpeg_crop_scanline(&cinfo, &xo, &cw);
            else { xo = 0; cw = ow; }
            size_t stride = (size_t)cw * 3;
            if ((size_t)out.len < stride * (y1 - y0)) {
                too_small = 1;
            } else {
                if (y0 > 0) jpeg_skip_scanlines(&cinfo, y0);
                unsigned char *dst = (unsigned char *)out.buf;
                while (cinfo.output_scanline < y1) {
                    JSAMPROW row = dst + stride * (cinfo.output_scanline - y0);
                    jpeg_read_scanlines(&cinfo, &row, 1);
                }
                left = xo; width = cw; top = y0; rows = y1 - y0;
            }
        }
        /* Abort rather than finish: the entropy-coded data after the crop is never read. */
        jpeg_abort_decompress(&cinfo);
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (failed) {
        PyErr_Format(PyExc_ValueError, "JPEG decode failed: %s", err.message);
        return NULL;
    }
    if (err.truncated) {
        PyErr_SetString(PyExc_ValueError, "truncated JPEG (premature end of data)");
        return NULL;
    }
    if (bad_box) {
        PyErr_SetString(PyExc_ValueError, "decode_region: the box lies outside the image");
        return NULL;
    }
    if (too_small) {
        PyErr_SetString(PyExc_ValueError, "decode_region: output buffer too small");
        return NULL;
    }
    return Py_BuildValue("(IIII)", left, top, width, rows);
}

static PyMethodDef methods[] = {
    {"decode_region", py_decode_region, METH_VARARGS, "Decode a box of a JPEG at 1/denom scale into out."},
    {"header", py_header, METH_VARARGS, "(width, height, components, progressive) of a JPEG."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "Region-of-interest JPEG decode.", -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
