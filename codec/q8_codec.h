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

#endif /* Q8_CODEC_H */
