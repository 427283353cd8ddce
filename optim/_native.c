/* q8 fused 8-bit optimizer steps on CPU (driven by optim/fused.py).
 *
 * One C call updates a whole list of parameters: the block loop (load the parameter and
 * the gradient, decode the state, apply the rule, take the new absmax, encode, store) is
 * written once, in `step_blocks`; an optimizer contributes only its rule, an inline
 * function of one element (`<name>_rule` below, next to its spec), plugged into that loop
 * by Q8_RULE. The torch reference of each rule is `update` of its class in
 * optim/algorithms.py and the Triton form is `<name>_rule` in kernels/optim.py: the three
 * give identical bytes (tests/test_optim.py, tests/test_kernels_optim.py).
 *
 * All arithmetic is IEEE binary32, round-to-nearest-even, no FMA contraction, denormals
 * honoured. Per-step constants arrive as binary32 values h[] computed once per step in
 * Python (each class's `hyper`). A parameter holds up to three state slots (the rule's
 * order, `Optimizer8bit.slots`), each absent, fp32, or 8-bit in the codec's block layout
 * (docs/CODEC.md; the flat layout is row_length = n): decoded with the table it was stored
 * in, re-encoded in the optimizer's table, signed state to the exact nearest code,
 * non-negative state by deterministic stochastic rounding keyed by
 * mix32(seed ^ mix32(step)) and the element's global index offset + i
 * (docs/OPTIMIZER_STATE.md). Parameters and gradients are fp32, bf16 or fp16: widened
 * exactly, the parameter written back rounded to nearest even (as torch's casts).
 *
 * A call first checks every gradient: a parameter whose gradient holds NaN or inf is left
 * untouched (status Q8_SKIPPED). An 8-bit state that overflows fp32 reports its first bad
 * block (the state is then invalid). Work is split over threads by blocks of all the
 * parameters together, so a list of small parameters costs one call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "q8_codec.h"

#define Q8_MAX_BLOCKSIZE 4096
#define Q8_SLOTS 3
#define Q8_HYPER 12 /* per-step constants of a rule: h[0..11] (unused ones are 0) */
#define Q8_FP32_BLOCK 1024 /* elements per block of a parameter whose state is all fp32 */
#define Q8_PREFETCH 4096 /* elements ahead of the block in hand that step_blocks asks for */
#define Q8_OK (-1)
#define Q8_SKIPPED (-2)

enum { SLOT_ABSENT, SLOT_FP32, SLOT_NEAREST, SLOT_STOCHASTIC };
enum { DT_FP32, DT_BF16, DT_FP16 };

typedef struct {
    int kind;
    float *data;         /* fp32 state, or */
    uint8_t *codes;      /* 8-bit state: codes, */
    float *absmax;       /* one absmax per block, */
    const float *table;  /* the table it is stored in (decoding), */
    const float *tree;   /* and the search tree it is encoded with (thresholds or values[1..255]), */
    const int32_t *buckets; /* the bucket table of the same keys (NULL: none; the tree then), */
    const float *values; /* the values of the encoding table (stochastic rounding), */
    float value0;        /* and values[0] */
    uint8_t zero_code;
} q8_slot;

typedef struct {
    void *p;
    const void *g;
    int p_dtype, g_dtype, negate;
    int64_t n, offset, nblocks;
    q8_layout layout;
    uint32_t key;
    const float *h;
    float trust;
    q8_slot s[Q8_SLOTS];
} q8_param;

/* ---- the rules: one element each; p and the state slots a, b, c updated in place -------- */

/* Adam / AdamW. h: beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t),
 * sqrt(1 - beta2^t), 1 - lr * wd (AdamW; 1 for Adam), wd (Adam's L2 term; 0 for AdamW),
 * K = moment_bound(betas, t). Slots: m (exp_avg), v (exp_avg_sq).
 *   g = grad; if (l2 != 0) g = g + l2 * p
 *   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * (g * g)
 *   s = sqrt(v); b = K * s; mu = |m| > b ? (m < 0 ? -b : b) : m        (the update bound)
 *   if (decay != 1) p = p * decay
 *   p = p - step_size * (mu / ((s / bc2_sqrt) + eps)) */
static inline void adam_rule(const float *h, float trust, float *p, float g, float *m, float *v, float *unused) {
    (void)trust, (void)unused;
    if (h[8] != 0.0f) g = g + h[8] * *p;
    const float mi = h[0] * *m + h[1] * g, vi = h[2] * *v + h[3] * (g * g);
    const float s = sqrtf(vi), b = h[9] * s;
    const float mu = fabsf(mi) > b ? (mi < 0.0f ? -b : b) : mi;
    float pi = *p;
    if (h[7] != 1.0f) pi = pi * h[7];
    *p = pi - h[5] * (mu / (s / h[6] + h[4]));
    *m = mi;
    *v = vi;
}

/* SGD (and LARS, whose trust ratio scales the direction). h: wd, momentum, 1 - dampening,
 * lr, 1 on the first step (else 0), 1 for Nesterov (else 0). Slot: the momentum buffer
 * (absent without momentum).
 *   d = grad; if (wd != 0) d = d + p * wd;  d = d * trust      (trust: LARS; 1 for SGD)
 *   if (momentum != 0) { buf = first ? d : buf * momentum + d * (1 - dampening)
 *                        d = nesterov ? d + buf * momentum : buf }
 *   p = p - d * lr */
static inline void sgd_rule(const float *h, float trust, float *p, float g, float *buf, float *u1, float *u2) {
    (void)u1, (void)u2;
    float d = g;
    if (h[0] != 0.0f) d = d + *p * h[0];
    d = d * trust;
    const float b = h[4] != 0.0f ? d : *buf * h[1] + d * h[2];
    if (h[1] != 0.0f) d = h[5] != 0.0f ? d + b * h[1] : b;
    *buf = b; /* an absent slot (no momentum) is a scratch buffer */
    *p = *p - d * h[3];
}

/* Lion. h: beta1, 1 - beta1, beta2, 1 - beta2, lr, 1 - lr * wd (1 without weight decay).
 * Slot: m (exp_avg).
 *   c = m * beta1 + g * (1 - beta1); d = sign(c) (+-1, or +0 where c is +-0)
 *   if (decay != 1) p = p * decay;  p = p - d * lr;  m = m * beta2 + g * (1 - beta2) */
static inline void lion_rule(const float *h, float trust, float *p, float g, float *m, float *u1, float *u2) {
    (void)trust, (void)u1, (void)u2;
    const float c = *m * h[0] + g * h[1];
    const float d = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    float pi = *p;
    if (h[5] != 1.0f) pi = pi * h[5];
    *p = pi - d * h[4];
    *m = *m * h[2] + g * h[3];
}

/* RMSprop. h: alpha, 1 - alpha, eps, wd, lr, momentum, 1 if centered (else 0). Slots:
 * square_avg, momentum_buffer (absent without momentum), grad_avg (absent unless centered).
 *   g = grad; if (wd != 0) g = g + p * wd
 *   sq = sq * alpha + (g * g) * (1 - alpha)
 *   centered: ga = ga * alpha + g * (1 - alpha); avg = sqrt(max(sq - ga * ga, 0)) + eps
 *   else avg = sqrt(sq) + eps
 *   momentum > 0: buf = buf * momentum + g / avg; p = p - buf * lr
 *   else p = p - (g / avg) * lr */
static inline void rmsprop_rule(const float *h, float trust, float *p, float g, float *sq, float *buf, float *ga) {
    (void)trust;
    if (h[3] != 0.0f) g = g + *p * h[3];
    const float s = *sq * h[0] + (g * g) * h[1], a = *ga * h[0] + g * h[1];
    float var = s - a * a;
    var = h[6] != 0.0f ? (var < 0.0f ? 0.0f : var) : s;
    const float step = g / (sqrtf(var) + h[2]), b = *buf * h[5] + step;
    *p = *p - (h[5] > 0.0f ? b : step) * h[4];
    *sq = s;
    *buf = b; /* absent slots are scratch buffers */
    *ga = a;
}

/* Adagrad. h: wd, lr / (1 + (t - 1) * lr_decay), eps. Slot: sum.
 *   g = grad; if (wd != 0) g = g + p * wd
 *   sum = sum + g * g;  p = p - (g / (sqrt(sum) + eps)) * clr */
static inline void adagrad_rule(const float *h, float trust, float *p, float g, float *sum, float *u1, float *u2) {
    (void)trust, (void)u1, (void)u2;
    if (h[0] != 0.0f) g = g + *p * h[0];
    const float s = *sum + g * g;
    *sum = s;
    *p = *p - (g / (sqrtf(s) + h[2])) * h[1];
}

/* LAMB: the bias-corrected, bounded Adam direction r, scaled by the trust ratio
 * ||p|| / ||r|| (LAMB8bit.trust: 1 if either norm is 0). h: beta1, 1 - beta1, beta2,
 * 1 - beta2, eps, wd, 1 - beta1^t, 1 - beta2^t, K = moment_bound(betas, t), lr.
 * Slots: m, v.
 *   m = m * beta1 + g * (1 - beta1);  v = v * beta2 + (g * g) * (1 - beta2)
 *   b = sqrt(v) * K; mu = |m| > b ? (m < 0 ? -b : b) : m
 *   r = (mu / bc1) / (sqrt(v / bc2) + eps);  if (wd != 0) r = r + p * wd
 *   p = p - r * (trust * lr)
 * lamb_terms gives the norms' inputs (p, r) without storing anything. */
static inline float lamb_direction(const float *h, float p, float g, float *m, float *v) {
    const float mi = *m * h[0] + g * h[1], vi = *v * h[2] + (g * g) * h[3];
    const float b = sqrtf(vi) * h[8];
    const float mu = fabsf(mi) > b ? (mi < 0.0f ? -b : b) : mi;
    float r = (mu / h[6]) / (sqrtf(vi / h[7]) + h[4]);
    if (h[5] != 0.0f) r = r + p * h[5];
    *m = mi;
    *v = vi;
    return r;
}

static inline void lamb_rule(const float *h, float trust, float *p, float g, float *m, float *v, float *unused) {
    (void)unused;
    const float r = lamb_direction(h, *p, g, m, v);
    *p = *p - r * (trust * h[9]);
}

static inline void lamb_terms(const float *h, float p, float g, float m, float v, float unused, float *x, float *y) {
    (void)unused;
    *x = p;
    *y = lamb_direction(h, p, g, &m, &v);
}

/* LARS: the norms of p and of the gradient (LARS8bit.trust makes the trust ratio from them);
 * the update is sgd_rule's with that trust. */
static inline void lars_terms(const float *h, float p, float g, float a, float b, float c, float *x, float *y) {
    (void)h, (void)a, (void)b, (void)c;
    *x = p;
    *y = g;
}

/* ---- loading and storing parameters and gradients ------------------------------------------ */

static inline float q8_bf16_to_float(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, nearest even; NaN -> 0x7FC0 (torch's cast). */
static inline uint16_t q8_float_to_bf16(float f) {
    const uint32_t u = q8_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float q8_half_to_float(uint16_t x) {
    const uint32_t sign = (uint32_t)(x & 0x8000u) << 16, e = (x >> 10) & 0x1fu, mant = x & 0x3ffu;
    uint32_t u;
    if (e == 0) { /* zero or subnormal: mant * 2^-24, exact */
        float f = (float)mant * 0x1p-24f;
        u = q8_f2u(f) | sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> fp16, nearest even (subnormals, overflow to inf); NaN -> 0x7E00 with its sign. */
static inline uint16_t q8_float_to_half(float f) {
    const uint32_t u = q8_f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a < 0x38800000u) { /* below 2^-14: a subnormal; adding 0.5 rounds at 2^-24 */
        float x;
        memcpy(&x, &a, 4);
        return (uint16_t)(sign | (q8_f2u(x + 0.5f) - 0x3f000000u));
    }
    return (uint16_t)(sign | ((a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13));
}

static inline void load_f32(const void *src, int dtype, int64_t start, int64_t len, float *out) {
    if (dtype == DT_FP32) {
        memcpy(out, (const float *)src + start, (size_t)len * 4);
    } else if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < len; i++) out[i] = q8_bf16_to_float(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < len; i++) out[i] = q8_half_to_float(s[i]);
    }
}

static inline void store_f32(void *dst, int dtype, int64_t start, int64_t len, const float *in) {
    if (dtype == DT_FP32) {
        memcpy((float *)dst + start, in, (size_t)len * 4);
    } else if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t i = 0; i < len; i++) d[i] = q8_float_to_bf16(in[i]);
    } else {
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t i = 0; i < len; i++) d[i] = q8_float_to_half(in[i]);
    }
}

/* ---- one block: decode, (rule), encode ------------------------------------------------------ */

static inline __attribute__((always_inline)) void decode_slot(const q8_slot *s, int64_t b, int64_t start,
                                                              int64_t len, float *out, int avx512) {
    if (s->kind == SLOT_FP32) {
        memcpy(out, s->data + start, (size_t)len * 4);
    } else if (s->kind != SLOT_ABSENT) {
#if Q8_HAVE_AVX512
        if (avx512) {
            q8_decode_block_avx512(s->codes + start, len, s->absmax[b], s->table, out);
            return;
        }
#endif
        (void)avx512;
        q8_decode_block(s->codes + start, len, s->absmax[b], s->table, out);
    } else {
        memset(out, 0, (size_t)len * 4);
    }
}

/* Store one slot's new values; 0 if an 8-bit slot's block is not finite. */
static inline __attribute__((always_inline)) int encode_slot(const q8_slot *s, const q8_param *q, int64_t b,
                                                             int64_t start, int64_t len, const float *x,
                                                             int avx512) {
    if (s->kind == SLOT_FP32) {
        memcpy(s->data + start, x, (size_t)len * 4);
        return 1;
    }
    if (s->kind == SLOT_ABSENT) return 1;
    int finite;
    const float m = q8_block_absmax(x, len, &finite);
    if (!finite) return 0;
    s->absmax[b] = m;
#if Q8_HAVE_AVX512
    if (avx512 && s->buckets) {
        q8_encode_block_buckets_avx512(x, len, m, s->buckets, s->kind == SLOT_NEAREST ? NULL : s->values,
                                       s->zero_code, q->key, q->offset + start, s->codes + start);
        return 1;
    }
    if (avx512) {
        if (s->kind == SLOT_NEAREST)
            q8_encode_block_avx512(x, len, m, s->tree, s->zero_code, s->codes + start);
        else
            q8_encode_block_stochastic_avx512(x, len, m, s->tree, s->value0, s->zero_code, q->key,
                                              q->offset + start, s->codes + start);
        return 1;
    }
#endif
    (void)avx512;
    if (s->kind == SLOT_NEAREST)
        q8_encode_block_tree(x, len, m, s->tree, s->zero_code, s->codes + start);
    else
        q8_encode_block_tree_stochastic(x, len, m, s->tree, s->value0, s->zero_code, q->key, q->offset + start,
                                        s->codes + start);
    return 1;
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define Q8_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define Q8_CLONES
#endif

typedef void (*q8_rule_fn)(const float *, float, float *, float, float *, float *, float *);
typedef void (*q8_terms_fn)(const float *, float, float, float, float, float, float *, float *);

/* A call's parameters and where each one's blocks start in the call's block numbering. */
typedef struct {
    q8_param *params;
    int64_t nparams, *first_block, *status;
    const double *scales; /* norm passes: 2 per parameter */
    float *maxes;         /* norm passes: 2 per parameter */
    int64_t *sums;        /* norm passes: 4 per parameter (hi, lo of each norm) */
} q8_call;

static inline int64_t param_of(const q8_call *c, int64_t block) {
    int64_t lo = 0, hi = c->nparams - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (c->first_block[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Blocks [b0, b1) of the call, parameter by parameter: parameter i, its blocks b (local numbers). */
#define FOR_BLOCKS(c, b0, b1, q, i, b)                                                                  \
    for (int64_t i = param_of(c, b0); i < (c)->nparams && (c)->first_block[i] < (b1); i++)            \
        for (q8_param *q = &(c)->params[i]; q; q = NULL)                                                \
            for (int64_t b = (b0) > (c)->first_block[i] ? (b0) - (c)->first_block[i] : 0;               \
                 b < q->nblocks && b < (b1) - (c)->first_block[i]; b++)

static inline void set_status(int64_t *status, int64_t value) {
    int64_t old = __atomic_load_n(status, __ATOMIC_RELAXED);
    while ((old == Q8_OK || (value >= 0 && old > value)) &&
           !__atomic_compare_exchange_n(status, &old, value, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* A block's fp32 values of a parameter or gradient: in place for fp32 (no copy unless
 * `negate`), else widened into `buf`. */
static inline __attribute__((always_inline)) float *load_block(void *src, int dtype, int negate, int64_t start,
                                                               int64_t len, float *buf) {
    if (dtype == DT_FP32 && !negate) return (float *)src + start;
    load_f32(src, dtype, start, len, buf);
    if (negate)
        for (int64_t e = 0; e < len; e++) buf[e] = -buf[e];
    return buf;
}

/* Pass 1: a parameter whose gradient holds NaN or inf gets status Q8_SKIPPED. */
static inline __attribute__((always_inline)) int64_t check_blocks(const q8_call *c, int64_t b0, int64_t b1) {
    float buf[Q8_MAX_BLOCKSIZE];
    FOR_BLOCKS(c, b0, b1, q, i, b) {
        int64_t len;
        const int64_t start = q8_block_start(&q->layout, b, &len);
        int finite;
        q8_block_absmax(load_block((void *)q->g, q->g_dtype, 0, start, len, buf), len, &finite);
        if (!finite) set_status(&c->status[i], Q8_SKIPPED);
    }
    return -1;
}

/* Ask for every stream's elements [start, end) of a parameter (its values, gradient and
 * state) ahead of their use, into L2: with the hardware prefetcher alone the block loop
 * waited on memory at each block's first loads (perf: a third of the step's samples on the
 * loads of p and g), its phases (decode, rule, encode) touching the streams at different
 * times; with these requests a large AdamW step took 16-39% less CPU time (BENCHMARKS.md). */
static inline void prefetch_elements(const q8_param *q, int64_t start, int64_t end) {
    if (end > q->n) end = q->n;
    const int psize = q->p_dtype == DT_FP32 ? 4 : 2, gsize = q->g_dtype == DT_FP32 ? 4 : 2;
    for (int64_t e = start; e < end; e += 16) { /* one 64-byte line of fp32 per 16 elements */
        __builtin_prefetch((const char *)q->p + e * psize, 1, 2);
        __builtin_prefetch((const char *)q->g + e * gsize, 0, 2);
        for (int k = 0; k < Q8_SLOTS; k++) {
            const q8_slot *s = &q->s[k];
            if (s->kind == SLOT_FP32) __builtin_prefetch(s->data + e, 1, 2);
            else if (s->kind != SLOT_ABSENT && (e - start) % 64 == 0) __builtin_prefetch(s->codes + e, 1, 2);
        }
    }
}

/* The step of blocks [b0, b1) of the call with `rule`: the skeleton every optimizer shares. */
static inline __attribute__((always_inline)) int64_t step_blocks(const q8_call *c, int64_t b0, int64_t b1,
                                                                 q8_rule_fn rule, int avx512) {
    float pbuf[Q8_MAX_BLOCKSIZE], gbuf[Q8_MAX_BLOCKSIZE], s[Q8_SLOTS][Q8_MAX_BLOCKSIZE];
    FOR_BLOCKS(c, b0, b1, q, i, b) {
        if (c->status[i] == Q8_SKIPPED) continue;
        int64_t len;
        const int64_t start = q8_block_start(&q->layout, b, &len);
        prefetch_elements(q, start + Q8_PREFETCH, start + Q8_PREFETCH + len);
        float *restrict p = load_block(q->p, q->p_dtype, 0, start, len, pbuf);
        const float *restrict g = load_block((void *)q->g, q->g_dtype, q->negate, start, len, gbuf);
        for (int k = 0; k < Q8_SLOTS; k++) decode_slot(&q->s[k], b, start, len, s[k], avx512);
        float h[Q8_HYPER];
        memcpy(h, q->h, sizeof h);
        const float trust = q->trust;
        float *s0 = s[0], *s1 = s[1], *s2 = s[2];
        for (int64_t e = 0; e < len; e++) rule(h, trust, &p[e], g[e], &s0[e], &s1[e], &s2[e]);
        if (q->p_dtype != DT_FP32) store_f32(q->p, q->p_dtype, start, len, p);
        for (int k = 0; k < Q8_SLOTS; k++)
            if (!encode_slot(&q->s[k], q, b, start, len, s[k], avx512)) set_status(&c->status[i], b);
    }
    return -1;
}

/* Norm passes of LAMB / LARS (docs/OPTIMIZER_STATE.md, "Exact norms"): pass 0 takes the
 * max |x| of each of the rule's two norm inputs; pass 1 sums floor(x * x * scale) split in
 * hi * 2^31 + lo, with the scale optim/norms.py derives from the (all-reduced) max. */
static inline __attribute__((always_inline)) int64_t norm_blocks(const q8_call *c, int64_t b0, int64_t b1,
                                                                 q8_terms_fn terms, int pass, int avx512) {
    float pbuf[Q8_MAX_BLOCKSIZE], gbuf[Q8_MAX_BLOCKSIZE], s[Q8_SLOTS][Q8_MAX_BLOCKSIZE];
    float x[2][Q8_MAX_BLOCKSIZE];
    FOR_BLOCKS(c, b0, b1, q, i, b) {
        int64_t len;
        const int64_t start = q8_block_start(&q->layout, b, &len);
        const float *p = load_block(q->p, q->p_dtype, 0, start, len, pbuf);
        const float *g = load_block((void *)q->g, q->g_dtype, q->negate, start, len, gbuf);
        for (int k = 0; k < Q8_SLOTS; k++) decode_slot(&q->s[k], b, start, len, s[k], avx512);
        float h[Q8_HYPER];
        memcpy(h, q->h, sizeof h);
        for (int64_t e = 0; e < len; e++) terms(h, p[e], g[e], s[0][e], s[1][e], s[2][e], &x[0][e], &x[1][e]);
        for (int t = 0; t < 2; t++) {
            if (pass == 0) {
                int finite;
                const float m = q8_block_absmax(x[t], len, &finite);
                float *slot = &c->maxes[2 * i + t];
                uint32_t bits = finite ? q8_f2u(m) : 0x7fc00000u, old = __atomic_load_n((uint32_t *)slot, __ATOMIC_RELAXED);
                while (bits > old && !__atomic_compare_exchange_n((uint32_t *)slot, &old, bits, 0, __ATOMIC_RELAXED,
                                                                  __ATOMIC_RELAXED)) {
                }
            } else {
                const double scale = c->scales[2 * i + t];
                if (scale == 0.0) continue;
                int64_t hi = 0, lo = 0;
                for (int64_t e = 0; e < len; e++) {
                    const double v = (double)x[t][e];
                    const int64_t term = (int64_t)(v * v * scale);
                    hi += term >> 31;
                    lo += term & 0x7fffffff;
                }
                __atomic_fetch_add(&c->sums[4 * i + 2 * t], hi, __ATOMIC_RELAXED);
                __atomic_fetch_add(&c->sums[4 * i + 2 * t + 1], lo, __ATOMIC_RELAXED);
            }
        }
    }
    return -1;
}

/* x86-64: an AVX-512 build of each loop chosen at run time where the CPU has it, and a
 * portable one (an AVX2 clone where available); the same IEEE operations in each. The
 * AVX-512 build encodes through the tables' bucket tables where they have one (one look-up
 * and one integer comparison per element), the portable one through the search trees:
 * the same codes (codec/q8_codec.h). */
#if Q8_HAVE_AVX512
#define Q8_FAST Q8_AVX512
#else
#define Q8_FAST
#endif

Q8_FAST static int64_t check_fast(const void *c, int64_t b0, int64_t b1) { return check_blocks(c, b0, b1); }
Q8_CLONES static int64_t check_portable(const void *c, int64_t b0, int64_t b1) { return check_blocks(c, b0, b1); }

/* Plug a rule into the shared loops: name##_fast (AVX-512) and name##_portable. */
#define Q8_RULE(name, rule)                                                                        \
    Q8_FAST static int64_t name##_fast(const void *c, int64_t b0, int64_t b1) {                 \
        return step_blocks(c, b0, b1, rule, Q8_HAVE_AVX512);                                    \
    }                                                                                           \
    Q8_CLONES static int64_t name##_portable(const void *c, int64_t b0, int64_t b1) {           \
        return step_blocks(c, b0, b1, rule, 0);                                                 \
    }
#define Q8_TERMS(name, terms)                                                                      \
    Q8_FAST static int64_t name##_max_fast(const void *c, int64_t b0, int64_t b1) {             \
        return norm_blocks(c, b0, b1, terms, 0, Q8_HAVE_AVX512);                                \
    }                                                                                           \
    Q8_FAST static int64_t name##_sums_fast(const void *c, int64_t b0, int64_t b1) {            \
        return norm_blocks(c, b0, b1, terms, 1, Q8_HAVE_AVX512);                                \
    }                                                                                           \
    static int64_t name##_max_portable(const void *c, int64_t b0, int64_t b1) {                 \
        return norm_blocks(c, b0, b1, terms, 0, 0);                                             \
    }                                                                                           \
    static int64_t name##_sums_portable(const void *c, int64_t b0, int64_t b1) {                \
        return norm_blocks(c, b0, b1, terms, 1, 0);                                             \
    }

Q8_RULE(adam, adam_rule)
Q8_RULE(sgd, sgd_rule)
Q8_RULE(lion, lion_rule)
Q8_RULE(rmsprop, rmsprop_rule)
Q8_RULE(adagrad, adagrad_rule)
Q8_RULE(lamb, lamb_rule)
Q8_TERMS(lamb, lamb_terms)
Q8_TERMS(lars, lars_terms)

/* Each rule's loops: its step (fast, portable), and for LAMB / LARS the norm passes. */
typedef struct {
    const char *name;
    q8_blocks_fn step[2], max[2], sums[2];
} q8_rule_entry;

#define NO_NORMS {NULL, NULL}, {NULL, NULL}
static const q8_rule_entry RULES[] = {
    {"adam", {adam_portable, adam_fast}, NO_NORMS},
    {"sgd", {sgd_portable, sgd_fast}, NO_NORMS},
    {"lion", {lion_portable, lion_fast}, NO_NORMS},
    {"rmsprop", {rmsprop_portable, rmsprop_fast}, NO_NORMS},
    {"adagrad", {adagrad_portable, adagrad_fast}, NO_NORMS},
    {"lamb", {lamb_portable, lamb_fast}, {lamb_max_portable, lamb_max_fast}, {lamb_sums_portable, lamb_sums_fast}},
    {"lars", {sgd_portable, sgd_fast}, {lars_max_portable, lars_max_fast}, {lars_sums_portable, lars_sums_fast}},
};
#define NRULES ((int)(sizeof(RULES) / sizeof(RULES[0])))

/* ---- the Python interface ------------------------------------------------------------------- */

/* Fields of one parameter's record (int64 each), as optim/fused.py packs them. */
enum {
    F_G, F_G_DTYPE, F_STEP, F_H, F_TRUST, /* per step */
    F_P, F_P_DTYPE, F_NEGATE, F_N, F_ROW_LENGTH, F_BLOCKSIZE, F_OFFSET, F_SEED, F_SLOTS
};
enum { S_KIND, S_DATA, S_ABSMAX, S_TABLE, S_TREE, S_BUCKETS, S_VALUES, S_VALUE0, S_ZERO, S_FIELDS };
#define RECORD (F_SLOTS + Q8_SLOTS * S_FIELDS)

static int parse_params(const int64_t *rec, int64_t nparams, q8_param *params, int64_t *first_block) {
    int64_t total = 0;
    for (int64_t i = 0; i < nparams; i++, rec += RECORD) {
        q8_param *q = &params[i];
        float trust, value0;
        const uint32_t trust_bits = (uint32_t)rec[F_TRUST];
        memcpy(&trust, &trust_bits, 4);
        const int64_t blocksize = rec[F_BLOCKSIZE], row_length = rec[F_ROW_LENGTH];
        if (blocksize < 1 || blocksize > Q8_MAX_BLOCKSIZE || row_length < 1 || rec[F_N] % row_length) {
            PyErr_Format(PyExc_ValueError, "parameter %lld: blocksize %lld or row_length %lld out of range",
                         (long long)i, (long long)blocksize, (long long)row_length);
            return 0;
        }
        *q = (q8_param){(void *)rec[F_P], (const void *)rec[F_G], (int)rec[F_P_DTYPE], (int)rec[F_G_DTYPE],
                        (int)rec[F_NEGATE], rec[F_N], rec[F_OFFSET], 0, q8_make_layout(row_length, blocksize),
                        q8_mix32((uint32_t)rec[F_SEED] ^ q8_mix32((uint32_t)rec[F_STEP])),
                        (const float *)rec[F_H], trust, {{0}}};
        q->nblocks = q->n / row_length * q->layout.per_row;
        for (int k = 0; k < Q8_SLOTS; k++) {
            const int64_t *f = rec + F_SLOTS + k * S_FIELDS;
            const uint32_t v0 = (uint32_t)f[S_VALUE0];
            memcpy(&value0, &v0, 4);
            q->s[k] = (q8_slot){(int)f[S_KIND], (float *)f[S_DATA], (uint8_t *)f[S_DATA], (float *)f[S_ABSMAX],
                                (const float *)f[S_TABLE], (const float *)f[S_TREE], (const int32_t *)f[S_BUCKETS],
                                (const float *)f[S_VALUES], value0, (uint8_t)f[S_ZERO]};
        }
        first_block[i] = total;
        total += q->nblocks;
    }
    return 1;
}

typedef struct {
    Py_buffer records, status, maxes, scales, sums;
    q8_call call;
    int64_t total;
} q8_request;

static void release(q8_request *r) {
    PyBuffer_Release(&r->records);
    PyBuffer_Release(&r->status);
    PyBuffer_Release(&r->maxes);
    PyBuffer_Release(&r->scales);
    PyBuffer_Release(&r->sums);
    PyMem_Free(r->call.params);
    PyMem_Free(r->call.first_block);
}

static int prepare(q8_request *r, int rule) {
    if (rule < 0 || rule >= NRULES) {
        PyErr_Format(PyExc_ValueError, "unknown rule %d", rule);
        return 0;
    }
    const int64_t n = (int64_t)(r->records.len / (Py_ssize_t)(RECORD * sizeof(int64_t)));
    if (r->records.len != (Py_ssize_t)(n * RECORD * (int64_t)sizeof(int64_t)) ||
        r->status.len != (Py_ssize_t)(n * (int64_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "records and status do not describe the same parameters");
        return 0;
    }
    r->call.nparams = n;
    r->call.status = r->status.buf;
    r->call.params = PyMem_Calloc((size_t)(n ? n : 1), sizeof(q8_param));
    r->call.first_block = PyMem_Calloc((size_t)(n ? n : 1), sizeof(int64_t));
    if (!r->call.params || !r->call.first_block) {
        PyErr_NoMemory();
        return 0;
    }
    if (!parse_params(r->records.buf, n, r->call.params, r->call.first_block)) return 0;
    r->total = n ? r->call.first_block[n - 1] + r->call.params[n - 1].nblocks : 0;
    return 1;
}

static int use_simd = 1; /* set_simd */

static PyObject *py_step(PyObject *self, PyObject *args) {
    q8_request r = {0};
    int rule, threads;
    if (!PyArg_ParseTuple(args, "iy*w*i", &rule, &r.records, &r.status, &threads)) return NULL;
    if (!prepare(&r, rule)) {
        release(&r);
        return NULL;
    }
    const int fast = use_simd && q8_has_avx512();
    const q8_blocks_fn fn = RULES[rule].step[fast];
    Py_BEGIN_ALLOW_THREADS
    q8_parallel_blocks(fast ? check_fast : check_portable, &r.call, 0, r.total, threads);
    q8_parallel_blocks(fn, &r.call, 0, r.total, threads);
    Py_END_ALLOW_THREADS
    release(&r);
    Py_RETURN_NONE;
}

static PyObject *py_norm_pass(PyObject *self, PyObject *args) {
    q8_request r = {0};
    int rule, pass, threads;
    if (!PyArg_ParseTuple(args, "iiy*w*w*y*w*i", &rule, &pass, &r.records, &r.status, &r.maxes, &r.scales, &r.sums,
                          &threads))
        return NULL;
    if (!prepare(&r, rule)) {
        release(&r);
        return NULL;
    }
    const int64_t n = r.call.nparams;
    if (!RULES[rule].max[0] || r.maxes.len != (Py_ssize_t)(2 * n * 4) || r.scales.len != (Py_ssize_t)(2 * n * 8) ||
        r.sums.len != (Py_ssize_t)(4 * n * 8)) {
        PyErr_SetString(PyExc_ValueError, "norm pass: no norms for this rule, or buffers of the wrong size");
        release(&r);
        return NULL;
    }
    r.call.maxes = r.maxes.buf;
    r.call.scales = r.scales.buf;
    r.call.sums = r.sums.buf;
    const q8_blocks_fn fn = (pass == 0 ? RULES[rule].max : RULES[rule].sums)[use_simd && q8_has_avx512()];
    Py_BEGIN_ALLOW_THREADS
    q8_parallel_blocks(fn, &r.call, 0, r.total, threads);
    Py_END_ALLOW_THREADS
    release(&r);
    Py_RETURN_NONE;
}

/* One block through encode_slot, the encoder the step uses (tests compare its bucket-table
 * and tree forms on chosen values). */
static PyObject *py_encode_block(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, codes = {0};
    long long kind, tree, buckets, values, value0_bits, zero_code, key, index0;
    if (!PyArg_ParseTuple(args, "y*w*LLLLLLLL", &x, &codes, &kind, &tree, &buckets, &values, &value0_bits,
                          &zero_code, &key, &index0))
        return NULL;
    const int64_t len = (int64_t)(x.len / 4);
    PyObject *result = NULL;
    if (len < 1 || len > Q8_MAX_BLOCKSIZE || codes.len != (Py_ssize_t)len ||
        (kind != SLOT_NEAREST && kind != SLOT_STOCHASTIC)) {
        PyErr_SetString(PyExc_ValueError, "encode_block: 1..4096 fp32 values, as many codes, an 8-bit slot kind");
    } else {
        float absmax = 0.0f, value0;
        const uint32_t v0 = (uint32_t)value0_bits;
        memcpy(&value0, &v0, 4);
        const q8_slot slot = {(int)kind, NULL, codes.buf, &absmax, NULL, (const float *)tree,
                              (const int32_t *)buckets, (const float *)values, value0, (uint8_t)zero_code};
        q8_param q = {0};
        q.key = (uint32_t)key;
        q.offset = index0;
        int finite;
        Py_BEGIN_ALLOW_THREADS
        Q8_SAVE_FP_MODE
        finite = encode_slot(&slot, &q, 0, 0, len, x.buf, use_simd && q8_has_avx512());
        Q8_RESTORE_FP_MODE
        Py_END_ALLOW_THREADS
        result = finite ? PyFloat_FromDouble(absmax) : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&codes);
    return result;
}

/* Test entry: the encoders' quotients x / m (q8_quotient16 where the CPU has AVX-512, else
 * the division), to compare with the division bit for bit. */
static PyObject *py_quotients(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0};
    float m;
    if (!PyArg_ParseTuple(args, "y*w*f", &x, &out, &m)) return NULL;
    PyObject *result = NULL;
    if (out.len != x.len || x.len % 4 || !(m > 0.0f) || isinf(m)) {
        PyErr_SetString(PyExc_ValueError, "quotients: fp32 x, an fp32 out of its size, a finite m > 0");
    } else {
        const float *xs = x.buf;
        float *qs = out.buf;
        const int64_t len = (int64_t)(x.len / 4);
        Q8_SAVE_FP_MODE
#if Q8_HAVE_AVX512
        if (use_simd && q8_has_avx512()) {
            q8_quotients_avx512(xs, len, m, qs);
        } else
#endif
        {
            for (int64_t i = 0; i < len; i++) qs[i] = xs[i] / m;
        }
        Q8_RESTORE_FP_MODE
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int enabled, before = use_simd;
    if (!PyArg_ParseTuple(args, "p", &enabled)) return NULL;
    use_simd = enabled;
    return PyBool_FromLong(before);
}

static PyObject *py_rule_index(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int i = 0; i < NRULES; i++)
        if (!strcmp(RULES[i].name, name)) return PyLong_FromLong(i);
    return PyLong_FromLong(-1);
}

static PyMethodDef methods[] = {
    {"step", py_step, METH_VARARGS,
     "step(rule, records, status, threads): one step of every parameter in records (int64, RECORD fields each); "
     "status (int64 per parameter, preset to -1) receives -2 for a skipped parameter or the first overflowing block"},
    {"norm_pass", py_norm_pass, METH_VARARGS,
     "norm_pass(rule, pass, records, status, maxes, scales, sums, threads): pass 0 fills maxes (fp32, 2 per "
     "parameter, preset to 0), pass 1 adds the exact squares' sums (int64 hi, lo per norm) for the given scales"},
    {"encode_block", py_encode_block, METH_VARARGS,
     "encode_block(x, codes, kind, tree, buckets, values, value0_bits, zero_code, key, index0) -> absmax or None: "
     "one block of fp32 x encoded as the step encodes a slot (addresses as in a record; buckets 0: the tree)"},
    {"quotients", py_quotients, METH_VARARGS,
     "quotients(x, out, m): out = x / m as the encoders compute it (tests compare it with the division)"},
    {"rule_index", py_rule_index, METH_VARARGS, "rule_index(name) -> the rule's number, or -1"},
    {"set_simd", py_set_simd, METH_VARARGS,
     "set_simd(enabled) -> the previous setting: whether the AVX-512 loops run where the CPU has them (tests "
     "compare both builds)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "q8 fused 8-bit optimizer steps on CPU (internal).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "RECORD", RECORD) < 0 || PyModule_AddIntConstant(m, "SLOTS", Q8_SLOTS) < 0 ||
              PyModule_AddIntConstant(m, "AVX512", q8_has_avx512()) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
