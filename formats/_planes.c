/* q8 byte planes (see docs/FORMAT.md, encoding "planes"): the lossless float transform,
 * and the Huffman coder of the exponent planes (compression 2).
 *
 * split: each w-byte little-endian component u of src is rotated left by one bit,
 *        r = (u << 1) | (u >> (8w - 1)), and byte j of r goes to planes[j * n + i].
 * join:  the inverse, reading plane j from its own address (planes need not be adjacent).
 * The Python wrapper (formats/planes.py) validates every argument and passes raw
 * addresses and a component range [i0, i1); these functions only compute and release
 * the GIL so disjoint ranges can run on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DEFINE_PLANES(W, T)                                                              \
    static void split##W(const uint8_t *src, uint8_t *planes, int64_t n, int64_t i0,    \
                         int64_t i1) {                                                   \
        for (int64_t i = i0; i < i1; i++) {                                              \
            T u;                                                                         \
            memcpy(&u, src + (size_t)i * W, W);                                          \
            const T r = (T)((u << 1) | (u >> (8 * W - 1)));                              \
            for (int j = 0; j < W; j++) planes[j * n + i] = (uint8_t)(r >> (8 * j));     \
        }                                                                                \
    }                                                                                    \
    static void join##W(uint8_t *const *planes, uint8_t *dst, int64_t i0, int64_t i1) {  \
        for (int64_t i = i0; i < i1; i++) {                                              \
            T r = 0;                                                                     \
            for (int j = 0; j < W; j++) r |= (T)planes[j][i] << (8 * j);                 \
            const T u = (T)((r >> 1) | (r << (8 * W - 1)));                              \
            memcpy(dst + (size_t)i * W, &u, W);                                          \
        }                                                                                \
    }

DEFINE_PLANES(2, uint16_t)
DEFINE_PLANES(4, uint32_t)
DEFINE_PLANES(8, uint64_t)

static int check_width(int width) {
    if (width == 2 || width == 4 || width == 8) return 1;
    PyErr_SetString(PyExc_ValueError, "width must be 2, 4 or 8");
    return 0;
}

static PyObject *py_split(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long long n, i0, i1;
    int width;
    if (!PyArg_ParseTuple(args, "KKiLLL", &src, &dst, &width, &n, &i0, &i1) || !check_width(width)) return NULL;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *d = (uint8_t *)dst;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) split2(s, d, n, i0, i1);
    else if (width == 4) split4(s, d, n, i0, i1);
    else split8(s, d, n, i0, i1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_join(PyObject *self, PyObject *args) {
    PyObject *ptrs;
    unsigned long long dst;
    long long i0, i1;
    int width;
    if (!PyArg_ParseTuple(args, "O!KiLL", &PyTuple_Type, &ptrs, &dst, &width, &i0, &i1) || !check_width(width))
        return NULL;
    if (PyTuple_GET_SIZE(ptrs) != width) {
        PyErr_SetString(PyExc_ValueError, "join needs one plane address per byte of width");
        return NULL;
    }
    uint8_t *planes[8];
    for (int j = 0; j < width; j++) {
        planes[j] = (uint8_t *)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(ptrs, j));
        if (PyErr_Occurred()) return NULL;
    }
    uint8_t *d = (uint8_t *)dst;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) join2(planes, d, i0, i1);
    else if (width == 4) join4(planes, d, i0, i1);
    else join8(planes, d, i0, i1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Canonical Huffman coding of one chunk of bytes (see docs/FORMAT.md, compression 2).
 *
 * Encoded chunk: the code lengths of symbols first..last (bytes 0 and 1, first <= last),
 * two per byte from byte 2 on (symbol first + k in the low nibble of byte 2 + k/2 if k is
 * even, the high nibble if odd; 0 = symbol absent; 1..HUF_MAXLEN; symbols outside the
 * range are absent), then the bitstream: codes are canonical (sorted by length, then symbol; each length's first
 * code follows the last of the previous one, shifted left) and written least
 * significant bit first, each code bit-reversed so it can be read LSB first; the last
 * byte is zero-padded. The lengths must form a complete prefix code (Kraft sum exactly
 * 1) and the bitstream must end in the last byte.
 */
#define HUF_MAXLEN 11
#define HUF_TABLE (1 << HUF_MAXLEN)
#define HUF_MAX_HEADER 130

typedef struct { uint64_t freq; int sym; int parent; } hnode;

/* Huffman code lengths of the histogram (at least two symbols present). */
static int huff_lengths(const uint64_t *hist, uint8_t *len) {
    hnode nodes[512];
    int leaves[256], nleaves = 0;
    for (int s = 0; s < 256; s++) if (hist[s]) leaves[nleaves++] = s;
    /* sort leaves by frequency (insertion sort, 256 at most) */
    for (int i = 1; i < nleaves; i++) {
        int s = leaves[i], j = i;
        while (j > 0 && hist[leaves[j - 1]] > hist[s]) { leaves[j] = leaves[j - 1]; j--; }
        leaves[j] = s;
    }
    for (int i = 0; i < nleaves; i++) {
        nodes[i].freq = hist[leaves[i]]; nodes[i].sym = leaves[i]; nodes[i].parent = -1;
    }
    /* two-queue construction: internal nodes are created in non-decreasing frequency */
    int nl = 0, ni = nleaves, nn = nleaves;
    for (int merge = 0; merge < nleaves - 1; merge++) {
        int pick[2];
        for (int k = 0; k < 2; k++) {
            if (nl < nleaves && (ni >= nn || nodes[nl].freq <= nodes[ni].freq)) pick[k] = nl++;
            else pick[k] = ni++;
        }
        nodes[nn].freq = nodes[pick[0]].freq + nodes[pick[1]].freq;
        nodes[nn].sym = -1;
        nodes[nn].parent = -1;
        nodes[pick[0]].parent = nn;
        nodes[pick[1]].parent = nn;
        nn++;
    }
    memset(len, 0, 256);
    int maxlen = 0;
    for (int i = 0; i < nleaves; i++) {
        int d = 0;
        for (int p = nodes[i].parent; p >= 0; p = nodes[p].parent) d++;
        len[nodes[i].sym] = (uint8_t)(d > 255 ? 255 : d);
        if (d > maxlen) maxlen = d;
    }
    return maxlen;
}

static void huff_codes(const uint8_t *len, uint32_t *code) {
    int count[HUF_MAXLEN + 1] = {0};
    uint32_t next[HUF_MAXLEN + 2];
    for (int s = 0; s < 256; s++) count[len[s]]++;
    count[0] = 0;
    uint32_t c = 0;
    for (int l = 1; l <= HUF_MAXLEN; l++) { c = (c + count[l - 1]) << 1; next[l] = c; }
    for (int s = 0; s < 256; s++) {
        if (!len[s]) continue;
        uint32_t v = next[len[s]]++, r = 0;
        for (int b = 0; b < len[s]; b++) r |= ((v >> b) & 1u) << (len[s] - 1 - b);
        code[s] = r;
    }
}

/* Encode n > 0 bytes; returns the encoded size, or -1 if it would not be smaller than n. */
static int64_t huff_encode(const uint8_t *src, int64_t n, uint8_t *dst) {
    uint64_t hist[256] = {0}, h[256];
    for (int64_t i = 0; i < n; i++) hist[src[i]]++;
    int present = 0, only = 0;
    for (int s = 0; s < 256; s++) if (hist[s]) { present++; only = s; }
    memcpy(h, hist, sizeof h);
    if (present == 1) h[(only + 1) & 255] = 1; /* a complete code needs two symbols */
    uint8_t len[256];
    while (huff_lengths(h, len) > HUF_MAXLEN)
        for (int s = 0; s < 256; s++) if (h[s]) h[s] = (h[s] >> 1) | 1;
    uint64_t bits = 0;
    for (int s = 0; s < 256; s++) bits += hist[s] * len[s];
    int first = 0, last = 255;
    while (!len[first]) first++;
    while (!len[last]) last--;
    const int header = 2 + (last - first + 2) / 2;
    const int64_t size = header + (int64_t)((bits + 7) / 8);
    if (size >= n) return -1;
    uint32_t code[256];
    huff_codes(len, code);
    dst[0] = (uint8_t)first;
    dst[1] = (uint8_t)last;
    memset(dst + 2, 0, (size_t)(header - 2));
    for (int s = first; s <= last; s++) dst[2 + (s - first) / 2] |= (uint8_t)(len[s] << (4 * ((s - first) & 1)));
    uint8_t *out = dst + header, *end = dst + size;
    uint64_t buf = 0;
    int nbits = 0;
    for (int64_t i = 0; i < n; i++) {
        buf |= (uint64_t)code[src[i]] << nbits;
        nbits += len[src[i]];
        if (nbits >= 32) {
            for (int k = 0; k < 4; k++) { *out++ = (uint8_t)buf; buf >>= 8; }
            nbits -= 32;
        }
    }
    while (nbits > 0) { *out++ = (uint8_t)buf; buf >>= 8; nbits -= 8; }
    return out == end ? size : -2;
}

/* Decode exactly n bytes from src[0..size); 0 on success, -1 if the chunk is malformed. */
static int huff_decode(const uint8_t *src, int64_t size, uint8_t *dst, int64_t n) {
    if (size < 3) return -1;
    const int first = src[0], last = src[1];
    const int header = 2 + (last - first + 2) / 2;
    if (first > last || size < header) return -1;
    uint8_t len[256] = {0};
    uint32_t kraft = 0;
    for (int s = first; s <= last; s++) {
        len[s] = (src[2 + (s - first) / 2] >> (4 * ((s - first) & 1))) & 15;
        if (len[s] > HUF_MAXLEN) return -1;
        if (len[s]) kraft += 1u << (HUF_MAXLEN - len[s]);
    }
    if (kraft != HUF_TABLE) return -1;
    uint32_t code[256];
    huff_codes(len, code);
    uint16_t table[HUF_TABLE];
    for (int s = 0; s < 256; s++)
        for (uint32_t c = code[s]; len[s] && c < HUF_TABLE; c += 1u << len[s])
            table[c] = (uint16_t)(s | (len[s] << 8));
    const uint8_t *in = src + header;
    const int64_t m = size - header;
    int64_t pos = 0, i = 0;
    uint64_t buf = 0;
    int nbits = 0;
    while (i < n) {
        if (pos + 8 <= m) { /* fast refill */
            uint64_t w;
            memcpy(&w, in + pos, 8);
            buf |= w << nbits;
            const int take = (63 - nbits) >> 3;
            pos += take;
            nbits += take * 8;
        } else {
            while (nbits <= 56) { buf |= (uint64_t)(pos < m ? in[pos] : 0) << nbits; pos++; nbits += 8; }
        }
        for (int k = 0; k < 4 && i < n; k++) { /* 4 * 11 bits <= 44 < 56 available */
            const uint16_t e = table[buf & (HUF_TABLE - 1)];
            dst[i++] = (uint8_t)e;
            buf >>= e >> 8;
            nbits -= e >> 8;
        }
    }
    const int64_t used = pos * 8 - nbits; /* bits consumed */
    return (used <= m * 8 && (used + 7) / 8 == m) ? 0 : -1;
}

static PyObject *py_huff_encode(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long long n;
    if (!PyArg_ParseTuple(args, "KLK", &src, &n, &dst)) return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = n > 0 ? huff_encode((const uint8_t *)src, n, (uint8_t *)dst) : -1;
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(r);
}

static PyObject *py_huff_decode(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long long size, n;
    if (!PyArg_ParseTuple(args, "KLKL", &src, &size, &dst, &n)) return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = huff_decode((const uint8_t *)src, size, (uint8_t *)dst, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}


static PyMethodDef methods[] = {
    {"split", py_split, METH_VARARGS, "split(src, planes, width, n, i0, i1)"},
    {"join", py_join, METH_VARARGS, "join((plane addresses...), dst, width, i0, i1)"},
    {"huff_encode", py_huff_encode, METH_VARARGS, "huff_encode(src, n, dst) -> size, or < 0 if it does not pay"},
    {"huff_decode", py_huff_decode, METH_VARARGS, "huff_decode(src, size, dst, n) -> 0, or -1 if malformed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes",
                                    "q8 byte planes (internal).", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
