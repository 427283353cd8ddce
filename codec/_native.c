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

/* Encode blocks [b0, b1). Returns -1, or the index of the first block holding a
 * non-finite value (its codes and absmax are then unspecified). */
static int64_t encode_blocks(const float *x, int64_t n, int64_t blocksize, int64_t b0,
                             int64_t b1, const float *thr, const uint8_t *lut,
                             uint8_t zero_code, uint8_t *codes, float *absmax) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (start + blocksize <= n) ? blocksize : n - start;
        const float *xb = x + start;
        uint8_t *cb = codes + start;
        float m = 0.0f;
        int finite = 1;
        for (int64_t i = 0; i < len; i++) {
            const float a = fabsf(xb[i]);
            finite &= (a <= FLT_MAX);
            m = a > m ? a : m;
        }
        if (!finite) return b;
        absmax[b] = m;
        if (m == 0.0f) {
            memset(cb, zero_code, (size_t)len);
            continue;
        }
        for (int64_t i = 0; i < len; i++) {
            const float q = xb[i] / m;
            unsigned c = lut[f2u(q) >> 16];
            while (c < 255 && q >= thr[c]) c++;
            cb[i] = (uint8_t)c;
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

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS,
     "encode(x, n, blocksize, b0, b1, thresholds, lut, zero_code, codes, absmax) -> bad block or -1"},
    {"decode", py_decode, METH_VARARGS,
     "decode(codes, absmax, table, n, blocksize, b0, b1, out)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "q8 compiled CPU codec (internal).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
