/* q8 CPU codec: blockwise encode / decode of fp32 buffers (see docs/CODEC.md).
 *
 * The Python wrapper (codec/native.py) validates every argument and passes raw
 * addresses; these functions only compute, on `threads` threads (q8_parallel_blocks),
 * without the GIL.
 *
 * Exactness: the per-block rule lives in q8_codec.h, shared with the fused optimizer
 * update (optim/_native.c). Built with -ffp-contract=off and without fast-math.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "q8_codec.h"

typedef struct {
    const float *x, *thresholds;
    const uint8_t *lut;
    q8_layout layout;
    uint8_t zero_code, *codes;
    float *absmax;
    const float *values; /* NULL: nearest; else the table, for stochastic rounding */
    uint32_t key;
    int64_t offset;
} encode_job;

/* Encode blocks [b0, b1). Returns -1, or the index of the first block holding a
 * non-finite value (its codes and absmax are then unspecified). */
static int64_t encode_blocks(const void *job, int64_t b0, int64_t b1) {
    const encode_job *e = job;
    for (int64_t b = b0; b < b1; b++) {
        int64_t len;
        const int64_t start = q8_block_start(&e->layout, b, &len);
        int finite;
        const float m = q8_block_absmax(e->x + start, len, &finite);
        if (!finite) return b;
        e->absmax[b] = m;
        if (e->values)
            q8_encode_block_stochastic(e->x + start, len, m, e->values, e->thresholds, e->lut, e->zero_code,
                                       e->key, e->offset + start, e->codes + start);
        else
            q8_encode_block(e->x + start, len, m, e->thresholds, e->lut, e->zero_code, e->codes + start);
    }
    return -1;
}

typedef struct {
    const uint8_t *codes;
    const float *absmax, *table;
    q8_layout layout;
    float *out;
} decode_job;

static int64_t decode_blocks(const void *job, int64_t b0, int64_t b1) {
    const decode_job *d = job;
    for (int64_t b = b0; b < b1; b++) {
        int64_t len;
        const int64_t start = q8_block_start(&d->layout, b, &len);
        q8_decode_block(d->codes + start, len, d->absmax[b], d->table, d->out + start);
    }
    return -1;
}

typedef struct {
    const float *x, *absmax, *table;
    const uint8_t *codes;
    q8_layout layout;
    double *err2, *ref2;
    float *max_abs;
} error_job;

/* Per block: sum of (x - decoded)^2 and of x^2 in binary64, and max |x - decoded|, where
 * decoded = table[code] * absmax is the fp32 value q8_decode_block produces. One pass,
 * no decoded copy: how q8 measures the error of a candidate encoding. */
static int64_t error_blocks(const void *job, int64_t b0, int64_t b1) {
    const error_job *e = job;
    for (int64_t b = b0; b < b1; b++) {
        int64_t len;
        const int64_t start = q8_block_start(&e->layout, b, &len);
        const float m = e->absmax[b];
        double err2 = 0.0, ref2 = 0.0;
        float worst = 0.0f;
        for (int64_t i = start; i < start + len; i++) {
            const float y = e->table[e->codes[i]] * m;
            const double d = (double)e->x[i] - (double)y;
            const float ad = (float)fabs(d);
            err2 += d * d;
            ref2 += (double)e->x[i] * (double)e->x[i];
            worst = ad > worst ? ad : worst;
        }
        e->err2[b] = err2;
        e->ref2[b] = ref2;
        e->max_abs[b] = worst;
    }
    return -1;
}

/* The layout arguments the block loops divide by: a block range is only ever non-empty when
 * row_length >= 1 (the caller passes an empty range for an empty tensor). */
static int check_layout(long long row_length, long long blocksize) {
    if (row_length < 1 || blocksize < 1) {
        PyErr_Format(PyExc_ValueError, "row_length %lld and blocksize %lld must be positive", row_length,
                     blocksize);
        return 0;
    }
    return 1;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    unsigned long long x, thr, lut, codes, absmax, values = 0;
    unsigned long key = 0;
    long long row_length, blocksize, b0, b1, offset = 0;
    int zero_code, threads;
    if (!PyArg_ParseTuple(args, "KLLLLKKiKKi|KkL", &x, &row_length, &blocksize, &b0, &b1, &thr, &lut,
                          &zero_code, &codes, &absmax, &threads, &values, &key, &offset))
        return NULL;
    if (!check_layout(row_length, blocksize)) return NULL;
    const encode_job job = {(const float *)x, (const float *)thr, (const uint8_t *)lut,
                            q8_make_layout(row_length, blocksize), (uint8_t)zero_code,
                            (uint8_t *)codes, (float *)absmax, (const float *)values, (uint32_t)key, offset};
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = q8_parallel_blocks(encode_blocks, &job, b0, b1, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long codes, absmax, table, out;
    long long row_length, blocksize, b0, b1;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLLKi", &codes, &absmax, &table, &row_length, &blocksize, &b0,
                          &b1, &out, &threads))
        return NULL;
    if (!check_layout(row_length, blocksize)) return NULL;
    const decode_job job = {(const uint8_t *)codes, (const float *)absmax, (const float *)table,
                            q8_make_layout(row_length, blocksize), (float *)out};
    Py_BEGIN_ALLOW_THREADS
    q8_parallel_blocks(decode_blocks, &job, b0, b1, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_block_errors(PyObject *self, PyObject *args) {
    unsigned long long x, codes, absmax, table, err2, ref2, max_abs;
    long long row_length, blocksize, b0, b1;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLKKKi", &x, &codes, &absmax, &table, &row_length, &blocksize, &b0,
                          &b1, &err2, &ref2, &max_abs, &threads))
        return NULL;
    if (!check_layout(row_length, blocksize)) return NULL;
    const error_job job = {(const float *)x, (const float *)absmax, (const float *)table,
                           (const uint8_t *)codes, q8_make_layout(row_length, blocksize), (double *)err2,
                           (double *)ref2, (float *)max_abs};
    Py_BEGIN_ALLOW_THREADS
    q8_parallel_blocks(error_blocks, &job, b0, b1, threads);
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
     "encode(x, row_length, blocksize, b0, b1, thresholds, lut, zero_code, codes, absmax, threads[, values, key, "
     "offset]) -> first bad block or -1; with values (the table): stochastic rounding keyed by key and offset + "
     "the element's index"},
    {"decode", py_decode, METH_VARARGS, "decode(codes, absmax, table, row_length, blocksize, b0, b1, out, threads)"},
    {"block_errors", py_block_errors, METH_VARARGS,
     "block_errors(x, codes, absmax, table, row_length, blocksize, b0, b1, err2, ref2, max_abs, threads)"},
    {"advise_hugepages", py_advise_hugepages, METH_VARARGS,
     "advise_hugepages(address, nbytes): hint that a fresh buffer be backed by huge pages"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "q8 compiled CPU codec (internal).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    /* 1 where the block ranges run on OpenMP threads (q8_parallel_blocks), else 0. */
    if (m && PyModule_AddIntConstant(m, "OPENMP", Q8_OPENMP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
