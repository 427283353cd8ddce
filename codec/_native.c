/* q8 CPU codec: blockwise encode / decode of fp32 buffers (see docs/CODEC.md).
 *
 * The Python wrapper (codec/native.py) validates every argument and passes raw
 * addresses; these functions only compute. They release the GIL so the wrapper can run
 * disjoint block ranges on several threads.
 *
 * Exactness: q = x / absmax is one IEEE fp32 division; the code is the number of fp32
 * thresholds t with t <= q. The 65536-entry LUT, indexed by the top 16 bits of q, gives
 * a lower bound of that count; a short scan over the thresholds finishes it. Built with
 * -ffp-contract=off and without fast-math; denormals are honoured even if the caller set
 * flush-to-zero (e.g. torch.set_flush_denormal).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#define SAVE_FP_MODE unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ & ~0x8040u);
#define RESTORE_FP_MODE _mm_setcsr(saved_csr_);
#else
#define SAVE_FP_MODE
#define RESTORE_FP_MODE
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

#define CHUNK 256

/* max |x[i]| over one block; *finite is cleared if any element is NaN or +-inf.
 * Works on bit patterns: with the sign bit cleared, the unsigned integer order of floats is
 * their numeric order and every NaN/inf pattern is >= that of +inf. Unlike a float max
 * (whose NaN semantics block it without fast-math), this integer max vectorises. */
static inline float block_absmax(const float *x, int64_t len, int *finite) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        const uint32_t a = f2u(x[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    *finite = m < 0x7f800000u;
    float f;
    memcpy(&f, &m, 4);
    return f;
}

/* Encode blocks [b0, b1). Returns -1, or the index of the first block holding a
 * non-finite value (its codes and absmax are then unspecified). */
static int64_t encode_blocks(const float *x, int64_t n, int64_t blocksize, int64_t b0,
                             int64_t b1, const float *thr, const uint8_t *lut,
                             uint8_t zero_code, uint8_t *codes, float *absmax) {
    float q[CHUNK];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (start + blocksize <= n) ? blocksize : n - start;
        const float *xb = x + start;
        uint8_t *cb = codes + start;
        int finite;
        const float m = block_absmax(xb, len, &finite);
        if (!finite) return b;
        absmax[b] = m;
        if (m == 0.0f) {
            memset(cb, zero_code, (size_t)len);
            continue;
        }
        /* Two passes per chunk of CHUNK elements (1 KiB, stays in L1): the divisions
         * first, as a loop of independent operations the compiler vectorises (a vector
         * division is correctly rounded like a scalar one), then the table look-ups. */
        for (int64_t s = 0; s < len; s += CHUNK) {
            const int64_t k = len - s < CHUNK ? len - s : CHUNK;
            for (int64_t i = 0; i < k; i++) q[i] = xb[s + i] / m;
            for (int64_t i = 0; i < k; i++) {
                unsigned c = lut[f2u(q[i]) >> 16];
                /* For the built-in tables at most one threshold lies inside a LUT bucket,
                 * so one branchless step (no mispredictions on random data) finishes the
                 * count; the loop only goes on for denser tables. */
                c += (c < 255) & (q[i] >= thr[c < 255 ? c : 254]);
                while (c < 255 && q[i] >= thr[c]) c++;
                cb[s + i] = (uint8_t)c;
            }
        }
    }
    return -1;
}

static void decode_blocks(const uint8_t *codes, const float *absmax, const float *table,
                          int64_t n, int64_t blocksize, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (start + blocksize <= n) ? blocksize : n - start;
        const float m = absmax[b];
        const uint8_t *cb = codes + start;
        float *ob = out + start;
        for (int64_t i = 0; i < len; i++) ob[i] = table[cb[i]] * m;
    }
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    unsigned long long x, thr, lut, codes, absmax;
    long long n, blocksize, b0, b1;
    int zero_code;
    if (!PyArg_ParseTuple(args, "KLLLLKKiKK", &x, &n, &blocksize, &b0, &b1, &thr, &lut,
                          &zero_code, &codes, &absmax))
        return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    SAVE_FP_MODE
    bad = encode_blocks((const float *)x, n, blocksize, b0, b1, (const float *)thr,
                        (const uint8_t *)lut, (uint8_t)zero_code, (uint8_t *)codes,
                        (float *)absmax);
    RESTORE_FP_MODE
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long codes, absmax, table, out;
    long long n, blocksize, b0, b1;
    if (!PyArg_ParseTuple(args, "KKKLLLLK", &codes, &absmax, &table, &n, &blocksize, &b0,
                          &b1, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    SAVE_FP_MODE
    decode_blocks((const uint8_t *)codes, (const float *)absmax, (const float *)table, n,
                  blocksize, b0, b1, (float *)out);
    RESTORE_FP_MODE
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Ask Linux to back a fresh output buffer with transparent huge pages (2 MiB). Writing a
 * new 64 MiB tensor otherwise takes 16384 first-touch page faults, which cost more than
 * decoding into it. Only whole huge pages inside the buffer are advised; the advice is a
 * hint (errors are ignored, and it is a no-op where THP is off or on other systems). */
static PyObject *py_advise_hugepages(PyObject *self, PyObject *args) {
    unsigned long long ptr, nbytes;
    if (!PyArg_ParseTuple(args, "KK", &ptr, &nbytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const unsigned long long huge = 2ull << 20;
    const unsigned long long lo = (ptr + huge - 1) & ~(huge - 1), hi = (ptr + nbytes) & ~(huge - 1);
    if (hi > lo) (void)madvise((void *)(uintptr_t)lo, (size_t)(hi - lo), MADV_HUGEPAGE);
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS,
     "encode(x, n, blocksize, b0, b1, thresholds, lut, zero_code, codes, absmax) -> bad block or -1"},
    {"decode", py_decode, METH_VARARGS,
     "decode(codes, absmax, table, n, blocksize, b0, b1, out)"},
    {"advise_hugepages", py_advise_hugepages, METH_VARARGS,
     "advise_hugepages(address, nbytes): hint that a fresh buffer be backed by huge pages"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "q8 compiled CPU codec (internal).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
