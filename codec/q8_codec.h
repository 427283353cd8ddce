/* q8 codec primitives shared by every compiled CPU path (codec/_native.c, optim/_native.c).
 *
 * One block of the rule in docs/CODEC.md: absmax = max |x| (exact), then for each element
 * q = x / absmax (one IEEE fp32 division) and code = #{ j : thresholds[j] <= q }. The
 * 65536-entry LUT, indexed by the top 16 bits of q, gives a lower bound of that count
 * (codec/native.py::search_lut); a short scan over the thresholds finishes it.
 *
 * Compile with -ffp-contract=off and without fast-math. Callers run their work through
 * q8_parallel_blocks, which wraps it in Q8_SAVE_FP_MODE / Q8_RESTORE_FP_MODE so denormals
 * are honoured even if the process set flush-to-zero (e.g. torch.set_flush_denormal).
 */
#ifndef Q8_CODEC_H
#define Q8_CODEC_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#define Q8_SAVE_FP_MODE unsigned int q8_saved_csr_ = _mm_getcsr(); _mm_setcsr(q8_saved_csr_ & ~0x8040u);
#define Q8_RESTORE_FP_MODE _mm_setcsr(q8_saved_csr_);
#else
#define Q8_SAVE_FP_MODE
#define Q8_RESTORE_FP_MODE
#endif

#define Q8_CHUNK 256

#if defined(_OPENMP)
#define Q8_OPENMP 1
#else
#define Q8_OPENMP 0
#endif

/* Work over blocks [b0, b1), returning -1 or the first bad block it met. */
typedef int64_t (*q8_blocks_fn)(const void *job, int64_t b0, int64_t b1);

/* fn over blocks [b0, b1) split into `threads` contiguous ranges; -1 or the lowest bad
 * block. Built with OpenMP (Linux), the ranges run on the OpenMP pool of the calling thread:
 * the extension links libgomp.so.1, which resolves to the copy torch has already loaded, so
 * q8 shares torch's worker threads instead of competing with them (their idle spinning
 * after every torch op would otherwise take a core from q8's threads). Without OpenMP the
 * ranges run one after another. Each range sets its own thread's FP mode. */
static inline int64_t q8_parallel_blocks(q8_blocks_fn fn, const void *job, int64_t b0, int64_t b1,
                                         int threads) {
    const int64_t nblocks = b1 - b0;
    if (threads > nblocks) threads = (int)nblocks;
    if (threads < 1) threads = 1;
    int64_t bad = INT64_MAX;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(min : bad) if (threads > 1)
    for (int r = 0; r < threads; r++) {
        Q8_SAVE_FP_MODE
        const int64_t got = fn(job, b0 + nblocks * r / threads, b0 + nblocks * (r + 1) / threads);
        Q8_RESTORE_FP_MODE
        if (got >= 0 && got < bad) bad = got;
    }
    return bad == INT64_MAX ? -1 : bad;
}

/* The block layout of docs/CODEC.md: blocks never cross a row of `row_length` elements; each
 * row is cut into per_row = ceil(row_length / blocksize) blocks, the last one of a row possibly
 * shorter. The flat layout is the special case row_length = numel. */
typedef struct {
    int64_t row_length, blocksize, per_row;
} q8_layout;

static inline q8_layout q8_make_layout(int64_t row_length, int64_t blocksize) {
    const q8_layout l = {row_length, blocksize, (row_length + blocksize - 1) / blocksize};
    return l;
}

/* First element of block b; *len receives its number of elements. */
static inline int64_t q8_block_start(const q8_layout *l, int64_t b, int64_t *len) {
    const int64_t row = b / l->per_row, offset = (b - row * l->per_row) * l->blocksize;
    *len = l->row_length - offset < l->blocksize ? l->row_length - offset : l->blocksize;
    return row * l->row_length + offset;
}

static inline uint32_t q8_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* max |x[i]| over one block; *finite is cleared if any element is NaN or +-inf.
 * Works on bit patterns: with the sign bit cleared, the unsigned integer order of floats is
 * their numeric order and every NaN/inf pattern is >= that of +inf. Unlike a float max
 * (whose NaN semantics block it without fast-math), this integer max vectorises. */
static inline float q8_block_absmax(const float *x, int64_t len, int *finite) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        const uint32_t a = q8_f2u(x[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    *finite = m < 0x7f800000u;
    float f;
    memcpy(&f, &m, 4);
    return f;
}

/* Codes of one block of finite values whose absmax is m (all zero_code when m == 0). */
static inline void q8_encode_block(const float *x, int64_t len, float m, const float *thr,
                                   const uint8_t *lut, uint8_t zero_code, uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    /* Two passes per chunk of Q8_CHUNK elements (1 KiB of quotients, stays in L1): the divisions
     * first, as a loop of independent operations the compiler vectorises (a vector
     * division is correctly rounded like a scalar one), then the table look-ups. */
    float q[Q8_CHUNK];
    for (int64_t s = 0; s < len; s += Q8_CHUNK) {
        const int64_t k = len - s < Q8_CHUNK ? len - s : Q8_CHUNK;
        for (int64_t i = 0; i < k; i++) q[i] = x[s + i] / m;
        for (int64_t i = 0; i < k; i++) {
            unsigned c = lut[q8_f2u(q[i]) >> 16];
            /* For the built-in tables at most one threshold lies inside a LUT bucket, so
             * one branchless step (no mispredictions on random data) finishes the count;
             * the loop only goes on for denser tables. */
            c += (c < 255) & (q[i] >= thr[c < 255 ? c : 254]);
            while (c < 255 && q[i] >= thr[c]) c++;
            codes[s + i] = (uint8_t)c;
        }
    }
}

/* Wellons' lowbias32 integer hash (codec/blockwise.py::mix32). */
static inline uint32_t q8_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* Codes of one block of finite values whose absmax is m by deterministic stochastic
 * rounding (docs/CODEC.md; reference: codec/blockwise.py::quantize_stochastic). Element i
 * has global index index0 + i. q = x / m lies between entries f = floor and f + 1 of
 * `values`; it takes f + 1 when (u >> 8) * 2^-24 < (q - values[f]) / (values[f+1] -
 * values[f]), u = mix32(mix32(low32(index) ^ key) ^ high32(index)). A positive x never
 * takes zero_code. The nearest code (LUT + thresholds, as q8_encode_block) finds f. */
static inline void q8_encode_block_stochastic(const float *x, int64_t len, float m, const float *values,
                                              const float *thr, const uint8_t *lut, uint8_t zero_code,
                                              uint32_t key, int64_t index0, uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        const float q = x[i] / m;
        unsigned c = lut[q8_f2u(q) >> 16];
        while (c < 255 && q >= thr[c]) c++;
        unsigned f = (values[c] <= q || c == 0) ? c : c - 1;
        if (f < 255) {
            const float frac = (q - values[f]) / (values[f + 1] - values[f]);
            const uint64_t index = (uint64_t)(index0 + i);
            const uint32_t u = q8_mix32(q8_mix32((uint32_t)index ^ key) ^ (uint32_t)(index >> 32));
            f += (float)(u >> 8) * 0x1p-24f < frac;
        }
        if (f == zero_code && zero_code < 255 && x[i] > 0.0f) f = zero_code + 1u;
        codes[i] = (uint8_t)f;
    }
}

/* Decode one block: out[i] = table[codes[i]] * m (one fp32 multiplication). */
static inline void q8_decode_block(const uint8_t *codes, int64_t len, float m, const float *table,
                                   float *out) {
    for (int64_t i = 0; i < len; i++) out[i] = table[codes[i]] * m;
}


/* ---- Search trees: the block rule without a 64 KiB look-up table ------------------------------
 *
 * A search tree is 255 sorted keys in breadth-first order of a perfect binary search tree
 * (codec/codes.py::search_tree; level k holds 2^k keys from index 2^k - 1), padded to 256
 * floats. Descending it from the root, j = 2j + (key <= q) at each of the 8 levels, ends
 * with j = #{keys <= q}. With the 255 thresholds as keys that is the nearest code (the rule
 * of docs/CODEC.md, ties to the lower entry); with values[1..255] it is the floor index f of
 * the stochastic rule, and the path passes both neighbours of q: the last key <= q is
 * values[f] and the last key > q is values[f + 1] (when f < 255), so no table look-up is
 * left. The same integer and IEEE operations as the scalar path above: the same codes. */

/* Nearest code of q: the thresholds' tree descended. */
static inline unsigned q8_tree_count(const float *tree, float q) {
    unsigned j = 0;
    for (int k = 0; k < 8; k++) j = 2 * j + (tree[(1u << k) - 1 + j] <= q);
    return j;
}

/* The stochastic rule's floor index f (0 if no key <= q) and values[f], values[f + 1] (the
 * latter only meaningful when f < 255), from the tree of values[1..255]; lo starts at
 * values[0]. */
static inline unsigned q8_tree_floor(const float *tree, float value0, float q, float *lo, float *hi) {
    unsigned j = 0;
    float l = value0, h = value0;
    for (int k = 0; k < 8; k++) {
        const float key = tree[(1u << k) - 1 + j];
        const int le = key <= q;
        l = le ? key : l;
        h = le ? h : key;
        j = 2 * j + (unsigned)le;
    }
    *lo = l;
    *hi = h;
    return j;
}

/* The stochastic rule's draw for global element index `index`: u >> 8 as a fraction of 2^24. */
static inline float q8_draw(uint32_t key, uint64_t index) {
    const uint32_t u = q8_mix32(q8_mix32((uint32_t)index ^ key) ^ (uint32_t)(index >> 32));
    return (float)(u >> 8) * 0x1p-24f;
}

/* One block's nearest codes through the thresholds' tree (same codes as q8_encode_block). */
static inline void q8_encode_block_tree(const float *x, int64_t len, float m, const float *tree,
                                        uint8_t zero_code, uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    for (int64_t i = 0; i < len; i++) codes[i] = (uint8_t)q8_tree_count(tree, x[i] / m);
}

/* One block's stochastic codes through the tree of values[1..255] (same codes as
 * q8_encode_block_stochastic). */
static inline void q8_encode_block_tree_stochastic(const float *x, int64_t len, float m, const float *tree,
                                                   float value0, uint8_t zero_code, uint32_t key,
                                                   int64_t index0, uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        const float q = x[i] / m;
        float lo, hi;
        unsigned f = q8_tree_floor(tree, value0, q, &lo, &hi);
        if (f < 255) f += q8_draw(key, (uint64_t)(index0 + i)) < (q - lo) / (hi - lo);
        if (f == zero_code && zero_code < 255 && x[i] > 0.0f) f = zero_code + 1u;
        codes[i] = (uint8_t)f;
    }
}

/* ---- AVX-512: 16 elements at a time, the same operations ------------------------------------
 *
 * Table look-ups are register permutes (vpermt2ps over 32 entries, blended by the high
 * index bits), not gathers (slow on current Intel cores). Every float operation is the
 * scalar path's (division, multiplication, comparison: correctly rounded, no FMA), so the
 * codes are identical. Used where the CPU has AVX-512F (q8_has_avx512()). */
#if defined(__x86_64__) && defined(__GNUC__)
#define Q8_HAVE_AVX512 1
#include <immintrin.h>
#define Q8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

static inline int q8_has_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
    return cached;
}

/* Mask of the first `len` (<= 16) lanes. */
Q8_AVX512 static inline __mmask16 q8_lanes(int64_t len) {
    return len >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << len) - 1u);
}

/* t[idx] for 16 indices in 0..255, t given as 16 registers of 16 entries. */
Q8_AVX512 static inline __m512 q8_lookup256(__m512i idx, const __m512 *t) {
    __m512 r[4];
    for (int k = 0; k < 4; k++) {
        const __m512 a = _mm512_permutex2var_ps(t[4 * k], idx, t[4 * k + 1]);
        const __m512 b = _mm512_permutex2var_ps(t[4 * k + 2], idx, t[4 * k + 3]);
        r[k] = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), a, b);
    }
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __m512 lo = _mm512_mask_blend_ps(b6, r[0], r[1]), hi = _mm512_mask_blend_ps(b6, r[2], r[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(128)), lo, hi);
}

/* The key of level k (0..7) at local index j of a search tree (see above). */
Q8_AVX512 static inline __m512 q8_tree_level(const float *tree, int k, __m512i j) {
    const float *level = tree + (1 << k) - 1;
    if (k <= 4) return _mm512_permutexvar_ps(j, _mm512_loadu_ps(level));
    if (k == 5) return _mm512_permutex2var_ps(_mm512_loadu_ps(level), j, _mm512_loadu_ps(level + 16));
    __m512 r[4];
    const int parts = k == 6 ? 2 : 4;
    for (int h = 0; h < parts; h++)
        r[h] = _mm512_permutex2var_ps(_mm512_loadu_ps(level + 32 * h), j, _mm512_loadu_ps(level + 32 * h + 16));
    const __mmask16 b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    if (k == 6) return _mm512_mask_blend_ps(b5, r[0], r[1]);
    const __mmask16 b6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
    return _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, r[0], r[1]), _mm512_mask_blend_ps(b5, r[2], r[3]));
}

/* Decode up to 16 codes: table[code] * m. */
Q8_AVX512 static inline __m512 q8_decode16(const uint8_t *codes, __mmask16 lanes, const __m512 *t, __m512 m) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, codes));
    return _mm512_mul_ps(q8_lookup256(idx, t), m);
}

Q8_AVX512 static inline void q8_load_table(const float *table, __m512 *t) {
    for (int k = 0; k < 16; k++) t[k] = _mm512_loadu_ps(table + 16 * k);
}

Q8_AVX512 static inline void q8_decode_block_avx512(const uint8_t *codes, int64_t len, float m, const float *table,
                                                    float *out) {
    __m512 t[16];
    q8_load_table(table, t);
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = q8_lanes(len - i);
        _mm512_mask_storeu_ps(out + i, lanes, q8_decode16(codes + i, lanes, t, mv));
    }
}

/* x / m for 16 lanes, the same binary32 quotients as _mm512_div_ps(x, m) without the divider
 * (the step's bottleneck): x * RN64(1 / m) in binary64, rounded to binary32. Why that is the
 * correctly rounded quotient: with x = X 2^a, m = M 2^b (X, M < 2^24 integers), a binary32
 * rounding midpoint T 2^c (T < 2^25 odd) is never x / m (T M would need 24 bits), and
 * |x / m - T 2^c| / (T 2^c) >= 1 / (T M) > 2^-49, while the binary64 quotient is within
 * 2^-52 relative of x / m: both lie on the same side of every midpoint. That bound needs a
 * normal binary32 result; lanes whose quotient is subnormal (rare: |x| < 2^-126 m) take the
 * division. `inv` is RN64(1 / m) in every lane. */
Q8_AVX512 static inline __m512 q8_quotient16(__m512 x, __m512 m, __m512d inv) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), inv));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)), inv));
    const __m512 q = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
    const __m512i mag = _mm512_and_si512(_mm512_castps_si512(q), _mm512_set1_epi32(0x7fffffff));
    const __mmask16 subnormal = _mm512_test_epi32_mask(mag, mag) &
                                _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(0x00800000));
    return subnormal ? _mm512_mask_div_ps(q, subnormal, x, m) : q;
}

/* q8_quotient16 over an array (the encoders' quotients, for tests). */
Q8_AVX512 static inline void q8_quotients_avx512(const float *x, int64_t len, float m, float *out) {
    const __m512 mv = _mm512_set1_ps(m);
    const __m512d inv = _mm512_set1_pd(1.0 / (double)m);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = q8_lanes(len - i);
        _mm512_mask_storeu_ps(out + i, lanes, q8_quotient16(_mm512_maskz_loadu_ps(lanes, x + i), mv, inv));
    }
}

Q8_AVX512 static inline void q8_encode_block_avx512(const float *x, int64_t len, float m, const float *tree,
                                                    uint8_t zero_code, uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    const __m512 mv = _mm512_set1_ps(m);
    const __m512d inv = _mm512_set1_pd(1.0 / (double)m);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = q8_lanes(len - i);
        const __m512 q = q8_quotient16(_mm512_maskz_loadu_ps(lanes, x + i), mv, inv);
        __m512i j = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) {
            const __mmask16 le = _mm512_cmp_ps_mask(q8_tree_level(tree, k, j), q, _CMP_LE_OQ);
            j = _mm512_mask_add_epi32(_mm512_add_epi32(j, j), le, _mm512_add_epi32(j, j), _mm512_set1_epi32(1));
        }
        _mm_mask_storeu_epi8(codes + i, lanes, _mm512_cvtepi32_epi8(j));
    }
}

/* The stochastic rule's draws (q8_draw) of elements index0 + i + lane, as 16 floats. */
Q8_AVX512 static inline __m512 q8_draw16(uint32_t key, uint64_t base) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i low = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(low, _mm512_set1_epi32((int)(uint32_t)base));
    const __m512i high = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(base >> 32)), carry,
                                               _mm512_set1_epi32((int)(uint32_t)(base >> 32)), one);
    __m512i u = _mm512_xor_si512(low, _mm512_set1_epi32((int)key));
    for (int r = 0; r < 2; r++) {
        u = _mm512_xor_si512(u, _mm512_srli_epi32(u, 16));
        u = _mm512_mullo_epi32(u, _mm512_set1_epi32(0x7feb352d));
        u = _mm512_xor_si512(u, _mm512_srli_epi32(u, 15));
        u = _mm512_mullo_epi32(u, _mm512_set1_epi32((int)0x846ca68bu));
        u = _mm512_xor_si512(u, _mm512_srli_epi32(u, 16));
        if (r == 0) u = _mm512_xor_si512(u, high);
    }
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 8)), _mm512_set1_ps(0x1p-24f));
}

/* The stochastic rule's last steps for 16 elements: f = floor index, lo = values[f], hi =
 * values[f + 1]; f + 1 when the draw is below (q - lo) / (hi - lo) (f < 255), and a
 * positive x never takes zero_code. */
Q8_AVX512 static inline __m512i q8_round_up16(__m512i f, __m512 q, __m512 lo, __m512 hi, __m512 xv, __m512 draw,
                                              uint8_t zero_code) {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512 frac = _mm512_div_ps(_mm512_sub_ps(q, lo), _mm512_sub_ps(hi, lo));
    const __mmask16 below_top = _mm512_cmplt_epi32_mask(f, _mm512_set1_epi32(255));
    const __mmask16 up = _mm512_mask_cmp_ps_mask(below_top, draw, frac, _CMP_LT_OQ);
    f = _mm512_mask_add_epi32(f, up, f, one);
    if (zero_code < 255) {
        const __mmask16 positive = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __mmask16 at_zero = _mm512_mask_cmpeq_epi32_mask(positive, f, _mm512_set1_epi32(zero_code));
        f = _mm512_mask_add_epi32(f, at_zero, f, one);
    }
    return f;
}

Q8_AVX512 static inline void q8_encode_block_stochastic_avx512(const float *x, int64_t len, float m,
                                                               const float *tree, float value0,
                                                               uint8_t zero_code, uint32_t key, int64_t index0,
                                                               uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    const __m512 mv = _mm512_set1_ps(m);
    const __m512d inv = _mm512_set1_pd(1.0 / (double)m);
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = q8_lanes(len - i);
        const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + i);
        const __m512 q = q8_quotient16(xv, mv, inv);
        __m512i j = _mm512_setzero_si512();
        __m512 lo = _mm512_set1_ps(value0), hi = lo;
        for (int k = 0; k < 8; k++) {
            const __m512 keyv = q8_tree_level(tree, k, j);
            const __mmask16 le = _mm512_cmp_ps_mask(keyv, q, _CMP_LE_OQ);
            lo = _mm512_mask_mov_ps(lo, le, keyv);
            hi = _mm512_mask_mov_ps(hi, (__mmask16)~le, keyv);
            j = _mm512_mask_add_epi32(_mm512_add_epi32(j, j), le, _mm512_add_epi32(j, j), one);
        }
        j = q8_round_up16(j, q, lo, hi, xv, q8_draw16(key, (uint64_t)(index0 + i)), zero_code);
        _mm_mask_storeu_epi8(codes + i, lanes, _mm512_cvtepi32_epi8(j));
    }
}

/* ---- Bucket tables: the count of keys <= q with one look-up and one comparison --------------
 *
 * codec/codes.py::bucket_table builds, for a tree's 255 keys, a table over buckets of |q|'s
 * bit pattern u (u >> shift, clamped to the table's range) holding per bucket the count of
 * keys below it and the bit remainder of the one key inside it (if any); layout [shift,
 * base, n, halves, entries...], entry = count << 24 | remainder. The count is then
 * count + (r' >= remainder), r' = u & mask, or mask - (u & mask) for a negative q (whose
 * entries follow the positive ones when halves == 2; with halves == 1 no key is negative
 * and a negative q counts as +0). The table is checked when it is built; the same counts as
 * the trees (same codes, bit for bit), with no float operation at all. */
typedef struct {
    const int32_t *entries;
    __m512i lo, hi, shift, base, n, mask;
    int halves;
} q8_buckets;

Q8_AVX512 static inline q8_buckets q8_load_buckets(const int32_t *t) {
    const int32_t shift = t[0], base = t[1], n = t[2], mask = (int32_t)((1u << shift) - 1u);
    const q8_buckets b = {t + 4,
                          _mm512_set1_epi32((int32_t)((uint32_t)base << shift)),
                          _mm512_set1_epi32((int32_t)(((uint32_t)(base + n - 1) << shift) | (uint32_t)mask)),
                          _mm512_set1_epi32(shift),
                          _mm512_set1_epi32(base),
                          _mm512_set1_epi32(n),
                          _mm512_set1_epi32(mask),
                          t[3]};
    return b;
}

/* #{keys <= q} for 16 values of q in [-1, 1]. */
Q8_AVX512 static inline __m512i q8_bucket_count(const q8_buckets *b, __m512 q) {
    const __m512i bits = _mm512_castps_si512(q);
    const __mmask16 negative = _mm512_movepi32_mask(bits);
    __m512i u = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    if (b->halves == 1) u = _mm512_mask_mov_epi32(u, negative, _mm512_setzero_si512());
    u = _mm512_min_epu32(_mm512_max_epu32(u, b->lo), b->hi);
    __m512i index = _mm512_sub_epi32(_mm512_srlv_epi32(u, b->shift), b->base);
    __m512i r = _mm512_and_si512(u, b->mask);
    if (b->halves == 2) {
        index = _mm512_mask_add_epi32(index, negative, index, b->n);
        r = _mm512_mask_xor_epi32(r, negative, r, b->mask);
    }
    const __m512i entry = _mm512_i32gather_epi32(index, b->entries, 4);
    const __m512i count = _mm512_srli_epi32(entry, 24);
    const __mmask16 above = _mm512_cmpge_epi32_mask(r, _mm512_and_si512(entry, _mm512_set1_epi32(0xffffff)));
    return _mm512_mask_add_epi32(count, above, count, _mm512_set1_epi32(1));
}

/* One block's codes through a bucket table (same codes as the trees): values NULL, the
 * nearest codes (the thresholds' table); else stochastic rounding (the table of
 * values[1..255], and the values themselves). */
Q8_AVX512 static inline void q8_encode_block_buckets_avx512(const float *x, int64_t len, float m,
                                                            const int32_t *table, const float *values,
                                                            uint8_t zero_code, uint32_t key, int64_t index0,
                                                            uint8_t *codes) {
    if (m == 0.0f) {
        memset(codes, zero_code, (size_t)len);
        return;
    }
    const q8_buckets b = q8_load_buckets(table);
    const __m512 mv = _mm512_set1_ps(m);
    const __m512d inv = _mm512_set1_pd(1.0 / (double)m);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 lanes = q8_lanes(len - i);
        const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + i);
        const __m512 q = q8_quotient16(xv, mv, inv);
        __m512i j = q8_bucket_count(&b, q);
        if (values) {
            /* (values[j], values[j + 1]) as 64-bit pairs, j clamped to 254 (unused at j = 255) */
            const __m512i pair = _mm512_min_epi32(j, _mm512_set1_epi32(254));
            const __m512 p0 = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_castsi512_si256(pair), values, 4));
            const __m512 p1 = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_extracti64x4_epi64(pair, 1), values, 4));
            const __m512 lo = _mm512_permutex2var_ps(p0, even, p1);
            const __m512 hi = _mm512_permutex2var_ps(p0, _mm512_add_epi32(even, _mm512_set1_epi32(1)), p1);
            j = q8_round_up16(j, q, lo, hi, xv, q8_draw16(key, (uint64_t)(index0 + i)), zero_code);
        }
        _mm_mask_storeu_epi8(codes + i, lanes, _mm512_cvtepi32_epi8(j));
    }
}
#else
#define Q8_HAVE_AVX512 0
static inline int q8_has_avx512(void) { return 0; }
#endif

#endif /* Q8_CODEC_H */
