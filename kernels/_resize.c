/* Crop + antialiased bilinear resize + optional horizontal flip of an RGB uint8 image, straight
 * into the caller's batch slot, with explicit SIMD chosen at run time.
 *
 * The filter is kernels/resize.py's numba kernel (the reference, itself Pillow's BILINEAR
 * resize with a box): a triangle widened by the downscale factor, weights normalised per
 * output, a vertical pass over the crop's columns into float32 and a horizontal pass that adds
 * 0.5 and truncates. Here the two passes run one output row at a time (the row of vertical sums
 * stays in L1), in one of three implementations of the same arithmetic:
 *
 *   "avx512"   AVX-512 F/BW/VL: the vertical pass 16 columns per vector. The horizontal pass
 *              16 output values per vector, each vector's inputs gathered from a 32-float
 *              window by one two-register permute (vpermt2ps) per tap, the window loaded once
 *              for all taps up to a downscale of about 1.2 and once per tap up to about 1.8;
 *              beyond that 4 output pixels per vector (an RGB pixel per 128-bit lane).
 *   "avx2"     AVX2 + FMA: the vertical pass 8 columns per vector; the horizontal pass 2
 *              pixels per vector (a 128-bit lane each), 8 pixels a step.
 *   "portable" plain C (what the compiler makes of it for the build's baseline).
 *
 * One build serves every x86-64 machine: the SIMD functions carry their own `target`
 * attributes and are only called where the CPU (and the OS, for the AVX-512 state) supports
 * them; other compilers and architectures get the portable path only.
 *
 * resize_crop(src, x0, y0, w, h, out, flip, isa="auto") -> the isa used
 *     src: C-contiguous (H, W, 3) uint8 buffer; out: writable C-contiguous (OH, OW, 3) uint8.
 *     Resizes the source box (x0, y0, w, h) (floats, source pixels) to out's size, mirrored
 *     left-right if flip. ValueError for a bad buffer, a zero size, a box that is not finite,
 *     not positive or outside the image (more than one pixel past an edge: a region decoded at
 *     a DCT scale may round the box's far edge up to that much), or an isa this CPU lacks.
 *     The GIL is released while resizing.
 * isas() -> tuple of the isas this CPU can run, best first ("auto" picks the first).
 *
 * Output against the numba reference: the same coefficients (computed in double, stored as
 * float32, as numba does), the same float32 sums in the same order, fused multiply-adds in
 * the SIMD paths (numba's fastmath contracts them too), and the same truncation. Values differ
 * only where a sum lands within a rounding error of an integer boundary: by one level, on a
 * handful of values per image at most (the portable path, without FMA, rounds each product
 * separately and so differs a little more often). kernels/resize.py gives the measured
 * counts; tests/test_resize_simd.py holds the bound. Zero-weight taps (every output runs its
 * axis's largest tap count) add exactly 0, so they change nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_SIMD 1
#include <immintrin.h>
#else
#define HAVE_X86_SIMD 0
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_COUNT = 3 };
#define MAX_SIDE 65535
static const char *isa_names[ISA_COUNT] = {"portable", "avx2", "avx512"};
static int isa_ok[ISA_COUNT] = {1, 0, 0}; /* set at import from the CPU's features */

/* -- coefficients ---------------------------------------------------------------------------
 * One axis: for each output, the first input it reads and its weights. Mirrors the numba
 * kernel's coeffs() line for line (double arithmetic, int() truncation, float32 weights
 * divided by the double total), so that both paths sum the same float32 weights. */
typedef struct {
    int out;     /* outputs */
    int taps;    /* largest count: the horizontal tables are zero-padded to it */
    int lo, hi;  /* the inputs read: [lo, hi) */
    int *first;  /* per output: first input, absolute */
    int *count;  /* per output: inputs read (0 past the image) */
    float *w;    /* out x ksize weights */
    int ksize;
} axis_t;

static void axis_free(axis_t *a) {
    free(a->first);
    free(a->count);
    free(a->w);
}

/* 0, or -1 with MemoryError set. */
static int axis_coeffs(axis_t *a, double in0, double in_len, int in_size, int out_size) {
    double scale = in_len / out_size;
    double support = scale > 1.0 ? scale : 1.0; /* filterscale; the triangle's support is 1 */
    a->ksize = (int)ceil(support) * 2 + 1;
    a->out = out_size;
    a->first = malloc(sizeof(int) * (size_t)out_size);
    a->count = malloc(sizeof(int) * (size_t)out_size);
    a->w = calloc((size_t)out_size * (size_t)a->ksize, sizeof(float));
    if (a->first == NULL || a->count == NULL || a->w == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    a->taps = 0;
    a->lo = in_size;
    a->hi = 0;
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        float *w = a->w + (size_t)xx * a->ksize;
        double total = 0.0;
        for (int x = 0; x < xmax; x++) {
            double t = 1.0 - fabs((x + xmin - center + 0.5) / support);
            if (t < 0.0) t = 0.0;
            w[x] = (float)t;
            total += t;
        }
        if (total > 0)
            for (int x = 0; x < xmax; x++) w[x] = (float)((double)w[x] / total);
        int n = xmax > 0 ? xmax : 0;
        a->first[xx] = xmin;
        a->count[xx] = n;
        if (n > 0) {
            if (xmin < a->lo) a->lo = xmin;
            if (xmin + n > a->hi) a->hi = xmin + n;
        }
        if (n > a->taps) a->taps = n;
    }
    if (a->hi <= a->lo) a->lo = a->hi = 0; /* nothing read: every output is 0 */
    return 0;
}

/* -- the passes -------------------------------------------------------------------------------
 * vpass: trow[i] = sum_k w[k] * src[k * stride + i], i < n (n = the crop's columns x 3).
 * hpass: out pixel p = trunc(clamp(0.5 + sum_k w[p][k] * trow[3 first[p] + 3 k + c])), p < out_w,
 * from one of two layouts of the same weights (hplan_t). Taps past a pixel's count have weight
 * 0 and read finite values (trow is zero-padded), so every pixel runs `taps` taps. */
typedef struct {
    int out_w, taps;
    /* By pixel: off[p] = 3 first[p]; per group of 4 pixels and per tap, 16 floats: each pixel's
     * weight in its 3 colour lanes and 0 in the fourth (a 128-bit lane per pixel). */
    int *off;
    float *wexp;
    /* By output value (AVX-512): per group of 16 values of the output row, the trow offset
     * `base` of its leftmost input, `idx` (16 int32: where each value's tap-0 input lies in the
     * 32 floats from base) and per tap the 16 values' weights. NULL where some group's inputs
     * spread over more than 32 floats (downscales by more than about 1.8); `window` where every
     * tap's inputs fit in those 32 floats (about up to 1.2). */
    int groups, window;
    int *base;
    int32_t *idx;
    float *w;
} hplan_t;

typedef void (*vpass_fn)(const uint8_t *src, size_t stride, int n, const float *w, int cnt, float *trow);
typedef void (*hpass_fn)(const float *trow, const hplan_t *h, uint8_t *dst);

static void vpass_portable(const uint8_t *src, size_t stride, int n, const float *w, int cnt, float *trow) {
    if (cnt == 0) {
        memset(trow, 0, sizeof(float) * (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++) trow[i] = w[0] * (float)src[i];
    for (int k = 1; k < cnt; k++) {
        const uint8_t *s = src + (size_t)k * stride;
        float wk = w[k];
        for (int i = 0; i < n; i++) trow[i] += wk * (float)s[i];
    }
}

static inline uint8_t to_u8(float a) {
    if (a < 0.0f) a = 0.0f;
    if (a > 255.0f) a = 255.0f;
    return (uint8_t)a;
}

static void hpass_portable(const float *trow, const hplan_t *h, uint8_t *dst) {
    int taps = h->taps;
    for (int p = 0; p < h->out_w; p++) {
        const float *w = h->wexp + (size_t)(p >> 2) * taps * 16 + (p & 3) * 4;
        const float *t = trow + h->off[p];
        float a0 = 0.5f, a1 = 0.5f, a2 = 0.5f;
        for (int k = 0; k < taps; k++) {
            float wk = w[(size_t)k * 16];
            a0 += wk * t[3 * k];
            a1 += wk * t[3 * k + 1];
            a2 += wk * t[3 * k + 2];
        }
        dst[3 * p] = to_u8(a0);
        dst[3 * p + 1] = to_u8(a1);
        dst[3 * p + 2] = to_u8(a2);
    }
}

#if HAVE_X86_SIMD
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

AVX2_TARGET static void vpass_avx2(const uint8_t *src, size_t stride, int n, const float *w, int cnt,
                                   float *trow) {
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < cnt; k++) {
            const uint8_t *s = src + (size_t)k * stride + i;
            __m256 wk = _mm256_broadcast_ss(w + k);
            __m128i b = _mm_loadu_si128((const __m128i *)s), c = _mm_loadu_si128((const __m128i *)(s + 16));
            a0 = _mm256_fmadd_ps(wk, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), a0);
            a1 = _mm256_fmadd_ps(wk, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), a1);
            a2 = _mm256_fmadd_ps(wk, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), a2);
            a3 = _mm256_fmadd_ps(wk, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), a3);
        }
        _mm256_storeu_ps(trow + i, a0);
        _mm256_storeu_ps(trow + i + 8, a1);
        _mm256_storeu_ps(trow + i + 16, a2);
        _mm256_storeu_ps(trow + i + 24, a3);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int k = 0; k < cnt; k++) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(src + (size_t)k * stride + i));
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), a);
        }
        _mm256_storeu_ps(trow + i, a);
    }
    for (; i < n; i++) { /* the same fused arithmetic as the vectors, one column at a time */
        float a = 0.0f;
        for (int k = 0; k < cnt; k++) a = fmaf(w[k], (float)src[(size_t)k * stride + i], a);
        trow[i] = a;
    }
}

/* By pixel, 2 per vector (a 128-bit lane each), 8 per step. */
AVX2_TARGET static void hpass_avx2(const float *trow, const hplan_t *h, uint8_t *dst) {
    const int *off = h->off, taps = h->taps, out_w = h->out_w;
    const size_t ws = (size_t)taps * 16; /* from one group of 4 pixels' weights to the next's */
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
    /* per 128-bit lane, 4 RGBx pixels -> 12 RGB bytes, then the two lanes' 12 bytes together */
    const __m256i compact = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                                             0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    const __m256i pixels = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), join = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 3, 7);
    for (int p = 0; p < out_w; p += 8) {
        const float *w = h->wexp + (size_t)(p >> 2) * ws;
        const float *t[8];
        for (int j = 0; j < 8; j++) t[j] = trow + off[p + j];
        __m256 a[4] = {half, half, half, half}; /* pixel pairs (0, 1), (2, 3), (4, 5), (6, 7) */
        for (int k = 0; k < taps; k++, w += 16) {
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(t[2 * j] + 3 * k)),
                                                _mm_loadu_ps(t[2 * j + 1] + 3 * k), 1);
                a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (j >> 1) * ws + (j & 1) * 8), v, a[j]);
            }
        }
        __m256i i[4];
        for (int j = 0; j < 4; j++) i[j] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(a[j], lo), hi));
        /* packs/packus work per lane: lane 0 gets pixels 0 2 4 6, lane 1 pixels 1 3 5 7 */
        __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        b = _mm256_permutevar8x32_epi32(b, pixels);
        b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(b, compact), join);
        uint8_t *d = dst + 3 * p;
        if (p + 11 <= out_w) { /* 32 bytes fit in the row: the last 8 are rewritten next */
            _mm256_storeu_si256((__m256i *)d, b);
        } else {
            uint8_t buf[32];
            int m = out_w - p < 8 ? out_w - p : 8;
            _mm256_storeu_si256((__m256i *)buf, b);
            memcpy(d, buf, (size_t)m * 3);
        }
    }
}

AVX512_TARGET static void vpass_avx512(const uint8_t *src, size_t stride, int n, const float *w, int cnt,
                                       float *trow) {
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < cnt; k++) {
            const uint8_t *s = src + (size_t)k * stride + i;
            __m512 wk = _mm512_set1_ps(w[k]);
            a0 = _mm512_fmadd_ps(wk, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s))),
                                 a0);
            a1 = _mm512_fmadd_ps(
                wk, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16)))), a1);
            a2 = _mm512_fmadd_ps(
                wk, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 32)))), a2);
            a3 = _mm512_fmadd_ps(
                wk, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 48)))), a3);
        }
        _mm512_storeu_ps(trow + i, a0);
        _mm512_storeu_ps(trow + i + 16, a1);
        _mm512_storeu_ps(trow + i + 32, a2);
        _mm512_storeu_ps(trow + i + 48, a3);
    }
    for (; i < n; i += 16) { /* the last chunk masked: nothing is read past the crop's columns */
        int left = n - i;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 a = _mm512_setzero_ps();
        for (int k = 0; k < cnt; k++) {
            __m128i b = _mm_maskz_loadu_epi8(m, src + (size_t)k * stride + i);
            a = _mm512_fmadd_ps(_mm512_set1_ps(w[k]), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), a);
        }
        _mm512_mask_storeu_ps(trow + i, m, a);
    }
}

/* A vector of 16 sums -> 16 bytes, truncated as the reference does (clamped first). */
AVX512_TARGET static inline __m128i sums_to_u8(__m512 a) {
    a = _mm512_min_ps(_mm512_max_ps(a, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
    return _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(a));
}

/* 4 vectors of 16 sums -> 64 bytes at dst (the first `left` of them), packed in registers: a
 * store form of vpmovusdb, which the compiler makes of a convert-and-store, is microcoded on
 * some CPUs (AMD Zen 4). */
AVX512_TARGET static inline void store_values(uint8_t *dst, const __m512 a[4], int left) {
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f);
    /* packs/packus leave 128-bit lane q holding dwords (a0_q, a1_q, a2_q, a3_q); put them in order */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512i i[4];
    for (int j = 0; j < 4; j++) i[j] = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(a[j], lo), hi));
    __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(i[0], i[1]), _mm512_packs_epi32(i[2], i[3]));
    b = _mm512_permutexvar_epi32(order, b);
    if (left >= 64) _mm512_storeu_si512(dst, b);
    else _mm512_mask_storeu_epi8(dst, ((__mmask64)1 << left) - 1, b);
}

/* By output value, 16 per vector, four vectors side by side (independent chains hide the
 * permute's and the FMA's latency). Each group's inputs come from the 32 floats at its base,
 * permuted into place: loaded once for all taps when they fit (h->window: tap k's index is
 * tap 0's + 3 k), else once per tap from base + 3 k. */
AVX512_TARGET static void hpass_avx512_values(const float *trow, const hplan_t *h, uint8_t *dst) {
    const int taps = h->taps, n = h->out_w * 3;
    const size_t ws = (size_t)taps * 16; /* from one group's weights to the next's */
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512i three = _mm512_set1_epi32(3);
    for (int g = 0; g < h->groups; g += 4) {
        const float *t0 = trow + h->base[g], *t1 = trow + h->base[g + 1], *t2 = trow + h->base[g + 2],
                    *t3 = trow + h->base[g + 3];
        __m512i x0 = _mm512_loadu_si512(h->idx + 16 * g), x1 = _mm512_loadu_si512(h->idx + 16 * g + 16),
                x2 = _mm512_loadu_si512(h->idx + 16 * g + 32), x3 = _mm512_loadu_si512(h->idx + 16 * g + 48);
        const float *w = h->w + (size_t)g * ws, *wend = w + ws;
        __m512 a[4] = {half, half, half, half};
        if (h->window) {
            const __m512 l0 = _mm512_loadu_ps(t0), r0 = _mm512_loadu_ps(t0 + 16), l1 = _mm512_loadu_ps(t1),
                         r1 = _mm512_loadu_ps(t1 + 16), l2 = _mm512_loadu_ps(t2), r2 = _mm512_loadu_ps(t2 + 16),
                         l3 = _mm512_loadu_ps(t3), r3 = _mm512_loadu_ps(t3 + 16);
            for (; w < wend; w += 16) {
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_permutex2var_ps(l0, x0, r0), a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(w + ws), _mm512_permutex2var_ps(l1, x1, r1), a[1]);
                a[2] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * ws), _mm512_permutex2var_ps(l2, x2, r2), a[2]);
                a[3] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * ws), _mm512_permutex2var_ps(l3, x3, r3), a[3]);
                x0 = _mm512_add_epi32(x0, three);
                x1 = _mm512_add_epi32(x1, three);
                x2 = _mm512_add_epi32(x2, three);
                x3 = _mm512_add_epi32(x3, three);
            }
        } else {
            for (; w < wend; w += 16, t0 += 3, t1 += 3, t2 += 3, t3 += 3) {
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(w),
                                       _mm512_permutex2var_ps(_mm512_loadu_ps(t0), x0, _mm512_loadu_ps(t0 + 16)), a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(w + ws),
                                       _mm512_permutex2var_ps(_mm512_loadu_ps(t1), x1, _mm512_loadu_ps(t1 + 16)), a[1]);
                a[2] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * ws),
                                       _mm512_permutex2var_ps(_mm512_loadu_ps(t2), x2, _mm512_loadu_ps(t2 + 16)), a[2]);
                a[3] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * ws),
                                       _mm512_permutex2var_ps(_mm512_loadu_ps(t3), x3, _mm512_loadu_ps(t3 + 16)), a[3]);
            }
        }
        store_values(dst + 16 * g, a, n - 16 * g);
    }
}

/* By pixel, 4 per vector: any downscale. */
AVX512_TARGET static void hpass_avx512_pixels(const float *trow, const hplan_t *h, uint8_t *dst) {
    const int *off = h->off, taps = h->taps, out_w = h->out_w;
    const float *wexp = h->wexp;
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m128i compact = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    for (int p = 0; p < out_w; p += 4) {
        const float *w = wexp + (size_t)(p >> 2) * taps * 16;
        const float *t0 = trow + off[p], *t1 = trow + off[p + 1], *t2 = trow + off[p + 2],
                    *t3 = trow + off[p + 3];
        __m512 a = half;
        for (int k = 0; k < taps; k++, w += 16) {
            __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(t0 + 3 * k));
            v = _mm512_insertf32x4(v, _mm_loadu_ps(t1 + 3 * k), 1);
            v = _mm512_insertf32x4(v, _mm_loadu_ps(t2 + 3 * k), 2);
            v = _mm512_insertf32x4(v, _mm_loadu_ps(t3 + 3 * k), 3);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(w), v, a);
        }
        __m128i px = _mm_shuffle_epi8(sums_to_u8(a), compact);
        int left = out_w - p;
        __mmask16 m = left >= 4 ? (__mmask16)0x0FFF : (__mmask16)((1u << (3 * left)) - 1);
        _mm_mask_storeu_epi8(dst + 3 * p, m, px);
    }
}

AVX512_TARGET static void hpass_avx512(const float *trow, const hplan_t *h, uint8_t *dst) {
    if (h->w != NULL) hpass_avx512_values(trow, h, dst);
    else hpass_avx512_pixels(trow, h, dst);
}
#endif

static const vpass_fn vpasses[ISA_COUNT] = {
    vpass_portable,
#if HAVE_X86_SIMD
    vpass_avx2, vpass_avx512,
#else
    NULL, NULL,
#endif
};
static const hpass_fn hpasses[ISA_COUNT] = {
    hpass_portable,
#if HAVE_X86_SIMD
    hpass_avx2, hpass_avx512,
#else
    NULL, NULL,
#endif
};

/* -- the horizontal plan ---------------------------------------------------------------------- */
static void hplan_free(hplan_t *h) {
    free(h->off);
    free(h->wexp);
    free(h->base);
    free(h->idx);
    free(h->w);
}

/* The horizontal tables in output order (the flip: output p takes column out_w - 1 - p's
 * filter); the by-value tables too if `values` and every group's inputs fit its window.
 * 0, or -1 with MemoryError set. */
static int hplan_build(hplan_t *h, const axis_t *ax, int flip, int values) {
    int out_w = ax->out, taps = ax->taps > 0 ? ax->taps : 1, pg = (out_w + 7) / 8 * 2; /* AVX2: 8 a step */
    h->out_w = out_w;
    h->taps = taps;
    h->off = calloc((size_t)pg * 4, sizeof(int));
    h->wexp = calloc((size_t)pg * taps * 16, sizeof(float));
    if (h->off == NULL || h->wexp == NULL) goto nomem;
    for (int p = 0; p < out_w; p++) {
        int ox = flip ? out_w - 1 - p : p;
        int n = ax->count[ox];
        h->off[p] = n > 0 ? (ax->first[ox] - ax->lo) * 3 : 0;
        float *dst = h->wexp + (size_t)(p >> 2) * taps * 16 + (p & 3) * 4;
        const float *w = ax->w + (size_t)ox * ax->ksize;
        for (int k = 0; k < n; k++) dst[(size_t)k * 16] = dst[(size_t)k * 16 + 1] = dst[(size_t)k * 16 + 2] = w[k];
    }
    if (!values) return 0;
    int n = out_w * 3, groups = (n + 15) / 16;
    /* Fits: in every group, the inputs of tap 0 lie within 32 floats of the leftmost one;
     * `window`: those of every tap do. */
    int window = 1;
    for (int g = 0; g < groups; g++) {
        int lo = INT32_MAX, hi = 0;
        for (int j = 16 * g; j < n && j < 16 * g + 16; j++) {
            int p = j / 3, ox = flip ? out_w - 1 - p : p;
            if (ax->count[ox] == 0) continue; /* all-zero weights: reads anything finite */
            int at = h->off[p] + j % 3;
            if (at < lo) lo = at;
            if (at > hi) hi = at;
        }
        if (lo != INT32_MAX && hi - (lo - lo % 3) > 31) return 0;
        if (lo != INT32_MAX && hi - (lo - lo % 3) + 3 * (taps - 1) > 31) window = 0;
    }
    h->groups = groups;
    h->window = window;
    int padded = (groups + 3) / 4 * 4; /* the kernel runs 4 groups at a time; the rest weigh 0 */
    h->base = calloc((size_t)padded, sizeof(int));
    h->idx = calloc((size_t)padded * 16, sizeof(int32_t));
    h->w = calloc((size_t)padded * taps * 16, sizeof(float));
    if (h->base == NULL || h->idx == NULL || h->w == NULL) goto nomem;
    for (int g = 0; g < groups; g++) {
        int base = INT32_MAX;
        for (int j = 16 * g; j < n && j < 16 * g + 16; j++) {
            int p = j / 3, ox = flip ? out_w - 1 - p : p;
            if (ax->count[ox] > 0 && h->off[p] < base) base = h->off[p];
        }
        if (base == INT32_MAX) base = 0;
        h->base[g] = base;
        for (int j = 16 * g; j < n && j < 16 * g + 16; j++) {
            int p = j / 3, c = j % 3, l = j - 16 * g, ox = flip ? out_w - 1 - p : p;
            int cnt = ax->count[ox];
            h->idx[16 * g + l] = cnt > 0 ? h->off[p] - base + c : c;
            const float *w = ax->w + (size_t)ox * ax->ksize;
            for (int k = 0; k < cnt; k++) h->w[((size_t)g * taps + k) * 16 + l] = w[k];
        }
    }
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* -- arguments ------------------------------------------------------------------------------ */
/* A (rows, cols, 3) uint8 C-contiguous buffer; 0, or -1 with ValueError/TypeError set. */
static int get_image(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        if (!PyObject_CheckBuffer(obj)) return -1; /* not a buffer at all: keep the TypeError */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "resize_crop: %s must be a %sC-contiguous uint8 array", name,
                     writable ? "writable " : "");
        return -1;
    }
    const char *why = NULL;
    if (view->ndim != 3 || view->shape[2] != 3) why = "of shape (rows, columns, 3)";
    else if (view->itemsize != 1 || (view->format != NULL && strcmp(view->format, "B") != 0)) why = "uint8";
    else if (view->shape[0] < 1 || view->shape[1] < 1) why = "not empty";
    else if (view->shape[0] > MAX_SIDE || view->shape[1] > MAX_SIDE)
        why = "at most 65535 pixels on a side (JPEG's limit)"; /* and the tables stay small */
    if (why != NULL) {
        PyErr_Format(PyExc_ValueError, "resize_crop: %s must be %s", name, why);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int parse_isa(const char *s) {
    if (s == NULL || strcmp(s, "auto") == 0) {
        for (int i = ISA_COUNT - 1; i >= 0; i--)
            if (isa_ok[i]) return i;
    }
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(s, isa_names[i]) == 0) {
            if (isa_ok[i]) return i;
            PyErr_Format(PyExc_ValueError, "resize_crop: isa %s is not supported by this CPU (or build)", s);
            return -1;
        }
    PyErr_Format(PyExc_ValueError, "resize_crop: isa must be auto, portable, avx2 or avx512, not %s", s);
    return -1;
}

/* -- resize ---------------------------------------------------------------------------------- */
static PyObject *py_resize_crop(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"src", "x0", "y0", "w", "h", "out", "flip", "isa", NULL};
    PyObject *src_obj, *out_obj;
    double x0, y0, bw, bh;
    int flip;
    const char *isa_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OddddOp|z:resize_crop", kw, &src_obj, &x0, &y0, &bw, &bh,
                                     &out_obj, &flip, &isa_name))
        return NULL;
    int isa = parse_isa(isa_name);
    if (isa < 0) return NULL;
    Py_buffer src, out;
    if (get_image(src_obj, &src, 0, "src") < 0) return NULL;
    if (get_image(out_obj, &out, 1, "out") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int in_h = (int)src.shape[0], in_w = (int)src.shape[1];
    int out_h = (int)out.shape[0], out_w = (int)out.shape[1];
    /* Written so that NaN fails every test. */
    if (!(isfinite(x0) && isfinite(y0) && isfinite(bw) && isfinite(bh) && bw > 0 && bh > 0 && x0 >= -1.0 &&
          y0 >= -1.0 && x0 + bw <= in_w + 1.0 && y0 + bh <= in_h + 1.0)) {
        char box[160]; /* PyErr_Format has no float conversions */
        snprintf(box, sizeof box, "(%g, %g, %g, %g)", x0, y0, bw, bh);
        PyErr_Format(PyExc_ValueError, "resize_crop: box %s must have a positive size and lie inside the %d x %d "
                     "image (up to one pixel past an edge)", box, in_w, in_h);
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        return NULL;
    }
    axis_t ax = {0}, ay = {0};
    hplan_t hp = {0};
    float *trow = NULL, *trow_mem = NULL;
    PyObject *result = NULL;
    if (axis_coeffs(&ax, x0, bw, in_w, out_w) < 0 || axis_coeffs(&ay, y0, bh, in_h, out_h) < 0 ||
        hplan_build(&hp, &ax, flip, isa == ISA_AVX512) < 0)
        goto done;
    int span = ax.hi - ax.lo; /* the crop's columns that any output reads */
    /* Zero padding after the columns: taps past a pixel's count, the fourth float of the last
     * pixel's 4-float load and the 32-float windows of the by-value path. */
    size_t row_floats = ((size_t)(span + hp.taps) * 3 + 64 + 15) / 16 * 16;
    trow_mem = calloc(2 * row_floats + 16, sizeof(float));
    if (trow_mem == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    trow = (float *)(((uintptr_t)trow_mem + 63) & ~(uintptr_t)63); /* the vertical pass's stores: whole lines */
    vpass_fn vpass = vpasses[isa];
    hpass_fn hpass = hpasses[isa];
    const uint8_t *s = (const uint8_t *)src.buf;
    uint8_t *o = (uint8_t *)out.buf;
    size_t stride = (size_t)in_w * 3;
    Py_BEGIN_ALLOW_THREADS
    /* Two row buffers, the horizontal pass one row behind: its unaligned loads then read
     * stores that have left the store buffer (a load spanning two pending stores stalls). */
    for (int oy = 0; oy <= out_h; oy++) {
        if (oy < out_h) {
            int cnt = ay.count[oy];
            const uint8_t *rows = cnt > 0 ? s + (size_t)ay.first[oy] * stride + (size_t)ax.lo * 3 : s;
            vpass(rows, stride, span * 3, ay.w + (size_t)oy * ay.ksize, cnt, trow + (oy & 1) * row_floats);
        }
        if (oy > 0) hpass(trow + ((oy - 1) & 1) * row_floats, &hp, o + (size_t)(oy - 1) * out_w * 3);
    }
    Py_END_ALLOW_THREADS
    result = PyUnicode_FromString(isa_names[isa]);
done:
    axis_free(&ax);
    axis_free(&ay);
    hplan_free(&hp);
    free(trow_mem);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_isas(PyObject *self, PyObject *unused) {
    PyObject *t = PyTuple_New(0);
    for (int i = ISA_COUNT - 1; i >= 0 && t != NULL; i--) {
        if (!isa_ok[i]) continue;
        PyObject *name = PyUnicode_FromString(isa_names[i]);
        PyObject *one = name ? PyTuple_Pack(1, name) : NULL;
        Py_XDECREF(name);
        PyObject *joined = one ? PySequence_Concat(t, one) : NULL;
        Py_XDECREF(one);
        Py_DECREF(t);
        t = joined;
    }
    return t;
}

static PyMethodDef methods[] = {
    {"resize_crop", (PyCFunction)(void (*)(void))py_resize_crop, METH_VARARGS | METH_KEYWORDS,
     "resize_crop(src, x0, y0, w, h, out, flip, isa='auto') -> the isa used\n\n"
     "Resize the box (x0, y0, w, h) of src, a C-contiguous (H, W, 3) uint8 array, into out (OH, OW,\n"
     "3) uint8, mirrored left-right if flip: kernels.resize's filter. isa: 'auto' (the best this CPU\n"
     "runs), 'avx512', 'avx2' or 'portable'. ValueError for bad arrays, a bad box or an isa the CPU\n"
     "lacks."},
    {"isas", py_isas, METH_NOARGS, "isas() -> the isas this CPU runs, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resize",
                                    "Crop + antialiased bilinear resize + flip with run-time SIMD dispatch.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__resize(void) {
#if HAVE_X86_SIMD
    /* libgcc's checks include the OS's support for the AVX and AVX-512 register state. */
    __builtin_cpu_init();
    isa_ok[ISA_AVX2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    isa_ok[ISA_AVX512] = isa_ok[ISA_AVX2] && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
    return PyModule_Create(&module);
}
