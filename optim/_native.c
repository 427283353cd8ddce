/* q8 fused 8-bit Adam/AdamW update on CPU (called by optim/fused.py).
 *
 * SPEC (the CUDA kernel must match it bit for bit; the torch reference is
 * q8.optim.algorithms.Adam8bit.update followed by q8.optim.fused.generic_update's encoding;
 * the rule and why: docs/OPTIMIZER_STATE.md):
 *
 * All arithmetic is IEEE binary32, round-to-nearest-even, no FMA contraction, denormals
 * honoured. Hyperparameters arrive as binary32 values h[0..9] computed once per step in
 * Python (binary64, then rounded to binary32; q8.optim.fused.adam_hyper):
 *   beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1**step),
 *   sqrt(1 - beta2**step), 1 - lr * weight_decay (AdamW; 1 for Adam),
 *   weight_decay (Adam's L2 term; 0 for AdamW), K = moment_bound(betas, step).
 * For each block of the codec's block layout (docs/CODEC.md: rows of `row_length` elements,
 * each cut into blocks of `blocksize`, the last of a row possibly shorter; the flat layout is
 * row_length = n), independently:
 *   1. m = table_m[m_code] * m_absmax;  v = table_v[v_code] * v_absmax        (decode,
 *      each entry with the table it was stored in)
 *   2. per element, in this order:
 *        g  = grad;  if (l2 != 0) g = g + (l2 * p)
 *        m  = (beta1 * m) + (c1 * g)
 *        v  = (beta2 * v) + (c2 * (g * g))
 *        s  = sqrt(v);  b = K * s;  mu = |m| > b ? (m < 0 ? -b : b) : m      (the bound)
 *        if (decay != 1) p = p * decay
 *        p  = p - (step_size * (mu / ((s / bc2_sqrt) + eps)))
 *   3. m_absmax = max |m|, v_absmax = max |v| over the block; m's codes = exact nearest
 *      entry of m / m_absmax in the signed "dynamic" table, ties to the lower entry (the
 *      codec rule of docs/CODEC.md); v's codes = deterministic stochastic rounding of
 *      v / v_absmax in the "udynamic_sq" table keyed by `key` (rounding_key(seed, step))
 *      and the element's global index offset + its flat index (docs/CODEC.md). Both
 *      through codec/q8_codec.h.
 * The parameter update uses the new m and v before requantization.
 * Returns -1, or the first block whose new m or v is not finite (an fp32 overflow, e.g.
 * |grad| > 1.8e19: the caller rejects non-finite gradients before calling).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "q8_codec.h"

#define Q8_MAX_BLOCKSIZE 4096

/* One 8-bit state entry: decoded with `table`, encoded in the code of `values`. */
typedef struct {
    uint8_t *codes;
    float *absmax;
    const float *table;
    const float *values;
    const float *thresholds;
    const uint8_t *lut;
    uint8_t zero_code;
} q8_state8;

/* x86-64: an AVX2 clone chosen at load time where the CPU has it (same IEEE operations,
 * no FMA: -ffp-contract=off), the baseline build elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define Q8_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define Q8_CLONES
#endif

typedef struct {
    float *p;
    const float *grad, *hyper;
    q8_layout layout;
    int64_t offset;
    uint32_t key;
    q8_state8 m8, v8;
} adam_job;

Q8_CLONES static int64_t adam_blocks(const void *job, int64_t b0, int64_t b1) {
    const adam_job *a = job;
    float *p = a->p;
    const float *grad = a->grad, *h = a->hyper;
    const q8_state8 m8 = a->m8, v8 = a->v8;
    const float beta1 = h[0], c1 = h[1], beta2 = h[2], c2 = h[3], eps = h[4];
    const float step_size = h[5], bc2_sqrt = h[6], decay = h[7], l2 = h[8], bound = h[9];
    float m[Q8_MAX_BLOCKSIZE], v[Q8_MAX_BLOCKSIZE];
    for (int64_t b = b0; b < b1; b++) {
        int64_t len;
        const int64_t start = q8_block_start(&a->layout, b, &len);
        float *pb = p + start;
        const float *gb = grad + start;
        q8_decode_block(m8.codes + start, len, m8.absmax[b], m8.table, m);
        q8_decode_block(v8.codes + start, len, v8.absmax[b], v8.table, v);
        for (int64_t i = 0; i < len; i++) {
            float g = gb[i];
            if (l2 != 0.0f) g = g + l2 * pb[i];
            const float mi = beta1 * m[i] + c1 * g;
            const float vi = beta2 * v[i] + c2 * (g * g);
            m[i] = mi;
            v[i] = vi;
            const float si = sqrtf(vi), bi = bound * si;
            const float mu = fabsf(mi) > bi ? (mi < 0.0f ? -bi : bi) : mi;
            float pi = pb[i];
            if (decay != 1.0f) pi = pi * decay;
            pb[i] = pi - step_size * (mu / (si / bc2_sqrt + eps));
        }
        int finite_m, finite_v;
        const float am = q8_block_absmax(m, len, &finite_m);
        const float av = q8_block_absmax(v, len, &finite_v);
        if (!(finite_m && finite_v)) return b;
        m8.absmax[b] = am;
        v8.absmax[b] = av;
        q8_encode_block(m, len, am, m8.thresholds, m8.lut, m8.zero_code, m8.codes + start);
        q8_encode_block_stochastic(v, len, av, v8.values, v8.thresholds, v8.lut, v8.zero_code, a->key,
                                   a->offset + start, v8.codes + start);
    }
    return -1;
}

static int parse_state(PyObject *t, q8_state8 *s) {
    unsigned long long codes, absmax, table, values, thr, lut;
    int zero;
    if (!PyArg_ParseTuple(t, "KKKKKKi", &codes, &absmax, &table, &values, &thr, &lut, &zero)) return 0;
    s->codes = (uint8_t *)codes;
    s->absmax = (float *)absmax;
    s->table = (const float *)table;
    s->values = (const float *)values;
    s->thresholds = (const float *)thr;
    s->lut = (const uint8_t *)lut;
    s->zero_code = (uint8_t)zero;
    return 1;
}

static PyObject *py_adam(PyObject *self, PyObject *args) {
    unsigned long long p, grad, hyper;
    unsigned long key;
    long long row_length, blocksize, b0, b1, offset;
    PyObject *m_args, *v_args;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLLLLO!O!KkLi", &p, &grad, &row_length, &blocksize, &b0, &b1,
                          &PyTuple_Type, &m_args, &PyTuple_Type, &v_args, &hyper, &key, &offset, &threads))
        return NULL;
    if (blocksize < 1 || blocksize > Q8_MAX_BLOCKSIZE || row_length < 1) {
        PyErr_Format(PyExc_ValueError, "blocksize %lld or row_length %lld out of range", blocksize,
                     row_length);
        return NULL;
    }
    adam_job job = {(float *)p, (const float *)grad, (const float *)hyper,
                    q8_make_layout(row_length, blocksize), offset, (uint32_t)key};
    if (!parse_state(m_args, &job.m8) || !parse_state(v_args, &job.v8)) return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = q8_parallel_blocks(adam_blocks, &job, b0, b1, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

static PyMethodDef methods[] = {
    {"adam", py_adam, METH_VARARGS,
     "adam(p, grad, row_length, blocksize, b0, b1, m_state, v_state, hyper, key, offset, threads) -> first bad "
     "block or -1; *_state = (codes, absmax, decode table, encode values, thresholds, lut, zero_code)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "q8 fused 8-bit optimizer updates on CPU (internal).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
