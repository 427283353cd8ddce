/* q8 byte planes (see docs/FORMAT.md, encoding "planes"): the lossless float transform,
 * and the Huffman coder of the exponent planes (compression 2).
 *
 * plane: each w-byte little-endian component u of src is rotated left by one bit,
 *        r = (u << 1) | (u >> (8w - 1)), and byte j of r goes to dst[i]: plane j alone,
 *        so a writer holds one plane at a time, not all w of them.
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
    static void plane##W(const uint8_t *src, uint8_t *dst, int j, int64_t i0, int64_t i1) { \
        for (int64_t i = i0; i < i1; i++) {                                              \
            T u;                                                                         \
            memcpy(&u, src + (size_t)i * W, W);                                          \
            dst[i] = (uint8_t)((T)((u << 1) | (u >> (8 * W - 1))) >> (8 * j));           \
        }                                                                                \
    }                                                                                    \
    static void join##W(uint8_t *const *planes, uint8_t *dst, int64_t i0, int64_t i1) {  \
        const uint8_t *restrict p[W]; /* restrict: no plane aliases dst, so it vectorizes */ \
        for (int j = 0; j < W; j++) p[j] = planes[j] + i0;                               \
        uint8_t *restrict out = dst + (size_t)i0 * W;                                    \
        for (int64_t i = 0; i < i1 - i0; i++) {                                          \
            T r = 0;                                                                     \
            for (int j = 0; j < W; j++) r |= (T)p[j][i] << (8 * j);                      \
            const T u = (T)((r >> 1) | (r << (8 * W - 1)));                              \
            memcpy(out + (size_t)i * W, &u, W);                                          \
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

static PyObject *py_plane(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long long i0, i1;
    int width, j;
    if (!PyArg_ParseTuple(args, "KKiiLL", &src, &dst, &width, &j, &i0, &i1) || !check_width(width)) return NULL;
    if (j < 0 || j >= width) {
        PyErr_SetString(PyExc_ValueError, "plane index out of range");
        return NULL;
    }
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *d = (uint8_t *)dst;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) plane2(s, d, j, i0, i1);
    else if (width == 4) plane4(s, d, j, i0, i1);
    else plane8(s, d, j, i0, i1);
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
 * range are absent), the byte sizes of bitstreams 0..2 (u32 each), then four bitstreams,
 * stream k coding symbols [k * q, (k + 1) * q) with q = ceil(n / 4) (decoded interleaved).
 * In each bitstream: codes are canonical (sorted by length, then symbol; each length's first
 * code follows the last of the previous one, shifted left) and written least
 * significant bit first, each code bit-reversed so it can be read LSB first; the last
 * byte is zero-padded. The lengths must form a complete prefix code (Kraft sum exactly
 * 1) and the bitstream must end in the last byte.
 */
#define HUF_MAXLEN 11
#define HUF_TABLE (1 << HUF_MAXLEN)
#define HUF_MAX_HEADER 142

typedef struct { uint64_t freq; int sym; int parent; } hnode;

/* The present symbols in order of non-decreasing frequency (then symbol); their count. */
static int huff_leaves(const uint64_t *hist, int *leaves) {
    int n = 0;
    for (int s = 0; s < 256; s++) if (hist[s]) leaves[n++] = s;
    for (int i = 1; i < n; i++) { /* insertion sort, 256 at most */
        const int s = leaves[i];
        int j = i;
        while (j > 0 && hist[leaves[j - 1]] > hist[s]) { leaves[j] = leaves[j - 1]; j--; }
        leaves[j] = s;
    }
    return n;
}

/* Huffman code lengths of the histogram, given its sorted leaves (at least two). */
static int huff_lengths(const uint64_t *hist, const int *leaves, int nleaves, uint8_t *len) {
    hnode nodes[512];
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

/* Optimal code lengths of at most `maxlen` bits (package-merge, Larmore & Hirschberg 1990),
 * for when the Huffman code is longer: only the rare symbols' codes change, where scaling
 * the histogram down until the Huffman code fits would coarsen every symbol's. `leaves`:
 * the n >= 2 present symbols in order of non-decreasing frequency; 2^maxlen >= n.
 *
 * Level maxlen's list is the leaves; the list of each level above merges the leaves with
 * the packages (sums of consecutive pairs) of the list below, a leaf first on equal weight.
 * The 2n - 2 cheapest items of the top list are taken; a package taken at one level takes
 * the two items below it, so the items taken in each level's list are a prefix of it, and
 * a symbol's length is the number of levels at which its leaf is taken. */
static void huff_limited_lengths(const uint64_t *hist, const int *leaves, int n, int maxlen, uint8_t *len) {
    uint64_t weight[HUF_MAXLEN][512];
    int nleaf[HUF_MAXLEN][512], size[HUF_MAXLEN]; /* nleaf: leaves among an item and those before */
    for (int level = maxlen - 1; level >= 0; level--) {
        const int below = level + 1 < maxlen ? size[level + 1] / 2 : 0; /* packages from below */
        int i = 0, k = 0, m = 0;
        while (i < n || k < below) {
            const uint64_t pack = k < below ? weight[level + 1][2 * k] + weight[level + 1][2 * k + 1] : 0;
            const int leaf = i < n && (k >= below || hist[leaves[i]] <= pack);
            weight[level][m] = leaf ? hist[leaves[i]] : pack;
            nleaf[level][m] = i + leaf;
            if (leaf) i++;
            else k++;
            m++;
        }
        size[level] = m;
    }
    memset(len, 0, 256);
    for (int level = 0, take = 2 * n - 2; level < maxlen && take > 0; level++) {
        const int leaves_taken = nleaf[level][take - 1];
        for (int i = 0; i < leaves_taken; i++) len[leaves[i]]++;
        take = 2 * (take - leaves_taken); /* each package taken takes two items below */
    }
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

/* Append the codes of src[0..n) to out as one bitstream (LSB first, zero-padded to a
 * byte); returns the bytes written. out needs 8 bytes of slack past the stream's end. */
static int64_t huff_put_stream(const uint8_t *src, int64_t n, const uint32_t *entry, uint8_t *out) {
    uint8_t *const start = out;
    uint64_t buf = 0;
    int nbits = 0;
    int64_t i = 0;
#define HUF_PUT(sym)                                      \
    do {                                                  \
        const uint32_t e_ = entry[sym];                   \
        buf |= (uint64_t)(e_ & 0xFFFFFF) << nbits;        \
        nbits += (int)(e_ >> 24);                         \
    } while (0)
    /* 4 codes (<= 44 bits) on top of at most 7 pending bits, then flush whole bytes with
     * one 8-byte store */
    for (; i + 4 <= n; i += 4) {
        HUF_PUT(src[i]);
        HUF_PUT(src[i + 1]);
        HUF_PUT(src[i + 2]);
        HUF_PUT(src[i + 3]);
        memcpy(out, &buf, 8);
        out += nbits >> 3;
        buf >>= nbits & ~7; /* nbits <= 7 + 44 */
        nbits &= 7;
    }
    for (; i < n; i++) HUF_PUT(src[i]);
#undef HUF_PUT
    while (nbits > 0) { *out++ = (uint8_t)buf; buf >>= 8; nbits -= 8; }
    return out - start;
}

/* Symbols of stream k (0..3) of an n-symbol chunk: [k * q, min((k + 1) * q, n)), q = ceil(n / 4). */
static void huff_quarters(int64_t n, int64_t *start, int64_t *count) {
    const int64_t q = (n + 3) / 4;
    for (int k = 0; k < 4; k++) {
        start[k] = k * q < n ? k * q : n;
        count[k] = (start[k] + q < n ? start[k] + q : n) - start[k];
    }
}

/* Encode n > 0 bytes into dst (room for n + HUF_MAX_HEADER + 8 bytes); returns the encoded
 * size, or -1 if it would not be smaller than limit (<= n; known from the histogram
 * before any bit is written, where it clearly will not). */
static int64_t huff_encode(const uint8_t *src, int64_t n, uint8_t *dst, int64_t limit) {
    uint64_t hist[256] = {0}, h[256];
    uint32_t part[4][256] = {{0}}; /* four tables: no store-to-load stall on repeated bytes */
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        part[0][src[i]]++;
        part[1][src[i + 1]]++;
        part[2][src[i + 2]]++;
        part[3][src[i + 3]]++;
    }
    for (; i < n; i++) part[0][src[i]]++;
    for (int s = 0; s < 256; s++) hist[s] = (uint64_t)part[0][s] + part[1][s] + part[2][s] + part[3][s];
    int present = 0, only = 0;
    for (int s = 0; s < 256; s++) if (hist[s]) { present++; only = s; }
    memcpy(h, hist, sizeof h);
    if (present == 1) h[(only + 1) & 255] = 1; /* a complete code needs two symbols */
    uint8_t len[256];
    int leaves[256];
    const int nleaves = huff_leaves(h, leaves);
    if (huff_lengths(h, leaves, nleaves, len) > HUF_MAXLEN) huff_limited_lengths(h, leaves, nleaves, HUF_MAXLEN, len);
    uint64_t bits = 0;
    for (int s = 0; s < 256; s++) bits += hist[s] * len[s];
    int first = 0, last = 255;
    while (!len[first]) first++;
    while (!len[last]) last--;
    const int header = 2 + (last - first + 2) / 2 + 12;
    /* an upper bound of the size (each stream pads at most one byte) */
    if (header + (int64_t)(bits / 8) + 4 >= limit) return -1;
    uint32_t code[256];
    huff_codes(len, code);
    dst[0] = (uint8_t)first;
    dst[1] = (uint8_t)last;
    memset(dst + 2, 0, (size_t)(header - 2));
    for (int s = first; s <= last; s++) dst[2 + (s - first) / 2] |= (uint8_t)(len[s] << (4 * ((s - first) & 1)));
    uint32_t entry[256]; /* code in the low 24 bits, length in the top 8 */
    for (int s = 0; s < 256; s++) entry[s] = code[s] | ((uint32_t)len[s] << 24);
    int64_t start[4], count[4], size = header;
    huff_quarters(n, start, count);
    for (int k = 0; k < 4; k++) {
        const int64_t m = huff_put_stream(src + start[k], count[k], entry, dst + size);
        if (k < 3) { /* stream sizes 0..2, u32 each, just before the streams */
            const uint32_t m32 = (uint32_t)m;
            memcpy(dst + header - 12 + 4 * k, &m32, 4);
        }
        size += m;
    }
    return size < limit ? size : -1;
}

typedef struct {
    const uint8_t *in;
    int64_t m, pos;
    uint64_t buf;
    int nbits;
} huff_reader;

/* Make at least 56 bits available; bytes past the end read as zero (caught by huff_end). */
static inline void huff_refill(huff_reader *r) {
    if (r->pos + 8 <= r->m) {
        uint64_t w;
        memcpy(&w, r->in + r->pos, 8);
        r->buf |= w << r->nbits;
        const int take = (63 - r->nbits) >> 3;
        r->pos += take;
        r->nbits += take * 8;
    } else {
        while (r->nbits <= 56) {
            r->buf |= (uint64_t)(r->pos < r->m ? r->in[r->pos] : 0) << r->nbits;
            r->pos++;
            r->nbits += 8;
        }
    }
}

static inline uint8_t huff_sym(huff_reader *r, const uint16_t *table) {
    const uint16_t e = table[r->buf & (HUF_TABLE - 1)];
    r->buf >>= e >> 8;
    r->nbits -= e >> 8;
    return (uint8_t)e;
}

/* Multi-symbol lookup: the entry of HUF_MAXLEN bits holds the up to HUF_RUN symbols whose
 * codes fit in them whole, in bytes 0..3, their bit count in byte 4 and their number in
 * byte 5 (an exponent plane's codes average ~2.7 bits: about 4 symbols per lookup, 2.6x the
 * speed of one symbol per lookup). */
#define HUF_RUN 4

static void huff_run_table(const uint16_t *single, uint64_t *run) {
    for (uint32_t c = 0; c < HUF_TABLE; c++) {
        uint64_t e = 0, bits = 0, count = 0;
        while (count < HUF_RUN) {
            const uint16_t s = single[(c >> bits) & (HUF_TABLE - 1)];
            if (bits + (s >> 8) > HUF_MAXLEN) break; /* the code runs past the known bits */
            e |= (uint64_t)(s & 0xFF) << (8 * count);
            bits += s >> 8;
            count++;
        }
        run[c] = e | bits << 32 | count << 40; /* count >= 1: every code fits alone */
    }
}

/* One lookup: writes 8 bytes at out (the symbols, then bytes the next lookups overwrite)
 * and returns the number of symbols decoded. */
static inline int huff_run(huff_reader *r, const uint64_t *run, uint8_t *out) {
    const uint64_t e = run[r->buf & (HUF_TABLE - 1)];
    memcpy(out, &e, 8);
    const int bits = (e >> 32) & 15;
    r->buf >>= bits;
    r->nbits -= bits;
    return (int)(e >> 40);
}

/* Lookups per refill (each takes <= HUF_MAXLEN of the >= 56 bits), and the output room a
 * batch of them needs: their symbols, plus the 8-byte store's overhang. */
#define HUF_LOOKUPS 5
#define HUF_BATCH (HUF_LOOKUPS * HUF_RUN + 8 - 1)

/* 1 if the stream was consumed exactly: it ends within its last byte. */
static inline int huff_end(const huff_reader *r) {
    const int64_t used = r->pos * 8 - r->nbits;
    return used <= r->m * 8 && (used + 7) / 8 == r->m;
}

/* Decode exactly n bytes from src[0..size); 0 on success, -1 if the chunk is malformed. */
static int huff_decode(const uint8_t *src, int64_t size, uint8_t *dst, int64_t n) {
    if (size < 3) return -1;
    const int first = src[0], last = src[1];
    const int header = 2 + (last - first + 2) / 2 + 12;
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
    uint64_t run[HUF_TABLE];
    huff_run_table(table, run);
    int64_t start[4], count[4], offset = header;
    huff_quarters(n, start, count);
    huff_reader r[4];
    uint8_t *out[4], *end[4];
    for (int k = 0; k < 4; k++) {
        uint32_t m32;
        if (k < 3) memcpy(&m32, src + header - 12 + 4 * k, 4);
        const int64_t m = k < 3 ? (int64_t)m32 : size - offset;
        if (m < 0 || m > size - offset) return -1;
        r[k] = (huff_reader){src + offset, m, 0, 0, 0};
        offset += m;
        out[k] = dst + start[k];
        end[k] = out[k] + count[k];
    }
    /* the four streams interleaved (independent dependency chains) while each has room
     * for a batch of lookups (none decodes past its symbols or writes past its end); then
     * each stream alone, in batches, then symbol by symbol */
#define HUF_ROOM(k) (end[k] - out[k] >= HUF_BATCH)
    while (HUF_ROOM(0) && HUF_ROOM(1) && HUF_ROOM(2) && HUF_ROOM(3)) {
        for (int k = 0; k < 4; k++) huff_refill(&r[k]);
        for (int t = 0; t < HUF_LOOKUPS; t++) {
            out[0] += huff_run(&r[0], run, out[0]);
            out[1] += huff_run(&r[1], run, out[1]);
            out[2] += huff_run(&r[2], run, out[2]);
            out[3] += huff_run(&r[3], run, out[3]);
        }
    }
    for (int k = 0; k < 4; k++) {
        while (HUF_ROOM(k)) {
            huff_refill(&r[k]);
            for (int t = 0; t < HUF_LOOKUPS; t++) out[k] += huff_run(&r[k], run, out[k]);
        }
        while (out[k] < end[k]) {
            huff_refill(&r[k]);
            for (int t = 0; t < HUF_LOOKUPS && out[k] < end[k]; t++) *out[k]++ = huff_sym(&r[k], table);
        }
        if (!huff_end(&r[k])) return -1;
    }
#undef HUF_ROOM
    return 0;
}

static PyObject *py_huff_encode(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long long n, limit;
    if (!PyArg_ParseTuple(args, "KLKL", &src, &n, &dst, &limit)) return NULL;
    if (limit > n) limit = n;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = n > 0 ? huff_encode((const uint8_t *)src, n, (uint8_t *)dst, limit) : -1;
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


/* CRC-32 (zlib's polynomial, reflected) of two pieces joined, from the CRC of each and the
 * length of the second: crc(A B) = crc(A) * x^(8 |B|) + crc(B) in GF(2)[x] mod P, so pieces
 * checksummed on several threads combine into the segment's CRC. */
#define CRC_POLY 0xedb88320u

/* a * b mod P, both polynomials reflected (bit 31 is x^0). */
static uint32_t crc_multmodp(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) product ^= b;
        b = b & 1 ? (b >> 1) ^ CRC_POLY : b >> 1;
    }
    return product;
}

/* x^(8 n) mod P by squaring: x^(2^k) for k = 3, 4, ... multiplied in for each bit of n. */
static uint32_t crc_shift(uint64_t n) {
    uint32_t power = 1u << 23, result = 1u << 31; /* x^8 and 1 */
    for (; n; n >>= 1) {
        if (n & 1) result = crc_multmodp(power, result);
        power = crc_multmodp(power, power);
    }
    return result;
}

/* CRC-32 of a buffer, zlib's value (crc32(data, crc) chains like zlib.crc32). Byte by byte
 * with a table; on x86-64 CPUs with PCLMULQDQ, the bulk is folded 64 bytes at a time with
 * carry-less multiplies (the method of Gopal et al., "Fast CRC computation for generic
 * polynomials using PCLMULQDQ", Intel 2009), several times zlib's table speed. In the
 * bit-reflected domain a 128-bit lane is moved forward by n bits with the constants
 * reflect(x^(n +- 32) mod P) << 1; then 128 bits are reduced to 64, and 64 to the 32-bit CRC
 * by Barrett reduction with P' = reflect(P) and mu = reflect(floor(x^64 / P)). */
static uint32_t crc_table[256];

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ CRC_POLY : c >> 1;
        crc_table[i] = c;
    }
}

/* The raw (not inverted) CRC state advanced over n bytes. */
static uint32_t crc_bytes(uint32_t c, const uint8_t *p, size_t n) {
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define Q8_CLMUL 1

static int crc_has_clmul(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_PCLMUL) && (c & bit_SSE4_1);
}

/* lane * x^(128 k) folded onto the next lane: the low half times one constant, the high
 * half times the other (k = 4 with fold4, k = 1 with fold1). */
__attribute__((target("pclmul,sse4.1"))) static inline __m128i crc_fold(__m128i lane, __m128i k, __m128i next) {
    const __m128i lo = _mm_clmulepi64_si128(lane, k, 0x00), hi = _mm_clmulepi64_si128(lane, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* The raw CRC state advanced over n >= 64 bytes, n a multiple of 16. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_clmul(uint32_t c, const uint8_t *p, size_t n) {
    const __m128i fold4 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4); /* x^480, x^544 */
    const __m128i fold1 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0); /* x^96, x^160 */
    const __m128i fold64 = _mm_set_epi64x(0, 0x163cd6124);          /* x^64 */
    const __m128i barrett = _mm_set_epi64x(0x1f7011641, 0x1db710641); /* mu, P' */
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)c));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    for (p += 64, n -= 64; n >= 64; p += 64, n -= 64) {
        x0 = crc_fold(x0, fold4, _mm_loadu_si128((const __m128i *)p));
        x1 = crc_fold(x1, fold4, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = crc_fold(x2, fold4, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = crc_fold(x3, fold4, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    x0 = crc_fold(crc_fold(crc_fold(x0, fold1, x1), fold1, x2), fold1, x3);
    for (; n >= 16; p += 16, n -= 16) x0 = crc_fold(x0, fold1, _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 64 bits: the low half times x^96 onto the high half */
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), _mm_clmulepi64_si128(x0, fold1, 0x10));
    /* 64 -> 32 bits: the low 32 bits times x^64 onto the rest */
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 4), _mm_clmulepi64_si128(_mm_and_si128(x0, low32), fold64, 0x00));
    /* Barrett: q = (low 32 bits * mu) mod x^32, crc = x0 + q * P' */
    __m128i q = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x0, low32), barrett, 0x10), low32);
    x0 = _mm_xor_si128(x0, _mm_clmulepi64_si128(q, barrett, 0x00));
    return (uint32_t)_mm_extract_epi32(x0, 1);
}
#else
#define Q8_CLMUL 0
#endif

static int crc_fast; /* PCLMULQDQ usable */

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
#if Q8_CLMUL
    if (crc_fast && n >= 64) {
        const size_t bulk = n & ~(size_t)15;
        c = crc_clmul(c, p, bulk);
        p += bulk;
        n -= bulk;
    }
#endif
    return ~crc_bytes(c, p, n);
}

static PyObject *py_crc32(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long crc = 0;
    if (!PyArg_ParseTuple(args, "y*|k", &data, &crc)) return NULL;
    uint32_t r;
    Py_BEGIN_ALLOW_THREADS
    r = crc32_update((uint32_t)crc, (const uint8_t *)data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *py_crc32_combine(PyObject *self, PyObject *args) {
    unsigned long crc1, crc2;
    unsigned long long len2;
    if (!PyArg_ParseTuple(args, "kkK", &crc1, &crc2, &len2)) return NULL;
    return PyLong_FromUnsignedLong(crc_multmodp(crc_shift(len2), (uint32_t)crc1) ^ (uint32_t)crc2);
}

static PyMethodDef methods[] = {
    {"plane", py_plane, METH_VARARGS, "plane(src, dst, width, j, i0, i1): byte plane j of components [i0, i1)"},
    {"join", py_join, METH_VARARGS, "join((plane addresses...), dst, width, i0, i1)"},
    {"huff_encode", py_huff_encode, METH_VARARGS, "huff_encode(src, n, dst, limit) -> size, or < 0 if not below limit"},
    {"huff_decode", py_huff_decode, METH_VARARGS, "huff_decode(src, size, dst, n) -> 0, or -1 if malformed"},
    {"crc32", py_crc32, METH_VARARGS, "crc32(data, crc=0) -> zlib.crc32's value (PCLMULQDQ where available)"},
    {"crc32_combine", py_crc32_combine, METH_VARARGS, "crc32_combine(crc1, crc2, len2) -> CRC-32 of both pieces"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes",
                                    "q8 byte planes (internal).", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) {
    crc_table_init();
#if Q8_CLMUL
    crc_fast = crc_has_clmul();
#endif
    PyObject *m = PyModule_Create(&module);
    /* 1 where crc32 folds with PCLMULQDQ; elsewhere its byte loop is slower than zlib's */
    if (m && PyModule_AddIntConstant(m, "CRC_CLMUL", crc_fast) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
