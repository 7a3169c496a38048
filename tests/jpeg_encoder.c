/* Test-only JPEG encoder over the system libjpeg, for files Pillow cannot write: any
 * sampling factors (2x4 and 4x2 luma included), restart markers, one scan per component.
 * tests/jpeg_fixtures.py compiles it at test time and calls it through ctypes.
 *
 * long jpeg_fixture_encode(rgb, width, height, quality, h_samp[3], v_samp[3], scans,
 *                          restart_interval, out, out_cap)
 *     rgb: width * height * 3 bytes, row-major RGB. h_samp/v_samp: sampling factors of
 *     Y, Cb, Cr (1..4). scans: 0 = one interleaved scan (baseline), 1 = progressive
 *     (libjpeg's standard script, 10 scans), 2 = sequential, one scan per component.
 *     restart_interval: MCUs between restart markers, 0 = none.
 *     Returns the JPEG's size when it fits in out[0:out_cap], minus that size when it does
 *     not (call again with a bigger buffer), and 0 on error (see jpeg_fixture_error()).
 * const char *jpeg_fixture_error(void): libjpeg's message for the last failure.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

static char last_error[JMSG_LENGTH_MAX];
/* The destination manager's buffer: written by libjpeg through a pointer and read after a
 * longjmp, so it lives outside the function's frame. */
static _Thread_local unsigned char *dst;
static _Thread_local unsigned long dst_size;

const char *jpeg_fixture_error(void) { return last_error; }

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    (*cinfo->err->format_message)(cinfo, last_error);
    longjmp(((error_mgr *)cinfo->err)->jump, 1);
}

long jpeg_fixture_encode(const unsigned char *rgb, int width, int height, int quality,
                         const int h_samp[3], const int v_samp[3], int scans,
                         int restart_interval, unsigned char *out, unsigned long out_cap) {
    struct jpeg_compress_struct cinfo;
    error_mgr err;
    jpeg_scan_info per_component[3];

    last_error[0] = 0;
    if (width < 1 || height < 1 || scans < 0 || scans > 2 || restart_interval < 0) {
        snprintf(last_error, sizeof last_error, "bad arguments");
        return 0;
    }
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    if (setjmp(err.jump)) {
        jpeg_destroy_compress(&cinfo);
        free(dst);
        dst = NULL;
        return 0;
    }
    dst = NULL;
    dst_size = 0;
    jpeg_create_compress(&cinfo);
    jpeg_mem_dest(&cinfo, &dst, &dst_size);
    cinfo.image_width = (JDIMENSION)width;
    cinfo.image_height = (JDIMENSION)height;
    cinfo.input_components = 3;
    cinfo.in_color_space = JCS_RGB;
    jpeg_set_defaults(&cinfo);
    jpeg_set_quality(&cinfo, quality, TRUE);
    for (int c = 0; c < 3; c++) {
        cinfo.comp_info[c].h_samp_factor = h_samp[c];
        cinfo.comp_info[c].v_samp_factor = v_samp[c];
    }
    cinfo.restart_interval = (unsigned int)restart_interval;
    if (scans == 1) {
        jpeg_simple_progression(&cinfo);
    } else if (scans == 2) {
        for (int c = 0; c < 3; c++) {
            per_component[c].comps_in_scan = 1;
            per_component[c].component_index[0] = c;
            per_component[c].Ss = 0;
            per_component[c].Se = DCTSIZE2 - 1;
            per_component[c].Ah = 0;
            per_component[c].Al = 0;
        }
        cinfo.scan_info = per_component;
        cinfo.num_scans = 3;
    }
    jpeg_start_compress(&cinfo, TRUE);
    while (cinfo.next_scanline < cinfo.image_height) {
        JSAMPROW row = (JSAMPROW)(rgb + (size_t)cinfo.next_scanline * (size_t)width * 3);
        jpeg_write_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    long n = (long)dst_size;
    if ((unsigned long)n <= out_cap) memcpy(out, dst, (size_t)n);
    else n = -n;
    free(dst);
    dst = NULL;
    return n;
}
