/* q8 byte planes (see docs/FORMAT.md, encoding "planes"): the lossless float transform.
 *
 * split: each w-byte little-endian component u of src is rotated left by one bit,
 *        r = (u << 1) | (u >> (8w - 1)), and byte j of r goes to planes[j * n + i].
 * join:  the inverse.
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
    static void join##W(const uint8_t *planes, uint8_t *dst, int64_t n, int64_t i0,     \
                        int64_t i1) {                                                    \
        for (int64_t i = i0; i < i1; i++) {                                              \
            T r = 0;                                                                     \
            for (int j = 0; j < W; j++) r |= (T)planes[j * n + i] << (8 * j);            \
            const T u = (T)((r >> 1) | (r << (8 * W - 1)));                              \
            memcpy(dst + (size_t)i * W, &u, W);                                          \
        }                                                                                \
    }

DEFINE_PLANES(2, uint16_t)
DEFINE_PLANES(4, uint32_t)
DEFINE_PLANES(8, uint64_t)

static PyObject *run(PyObject *args, int do_split) {
    unsigned long long src, dst;
    long long n, i0, i1;
    int width;
    if (!PyArg_ParseTuple(args, "KKiLLL", &src, &dst, &width, &n, &i0, &i1)) return NULL;
    if (width != 2 && width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 2, 4 or 8");
        return NULL;
    }
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *d = (uint8_t *)dst;
    Py_BEGIN_ALLOW_THREADS
    if (do_split) {
        if (width == 2) split2(s, d, n, i0, i1);
        else if (width == 4) split4(s, d, n, i0, i1);
        else split8(s, d, n, i0, i1);
    } else {
        if (width == 2) join2(s, d, n, i0, i1);
        else if (width == 4) join4(s, d, n, i0, i1);
        else join8(s, d, n, i0, i1);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_split(PyObject *self, PyObject *args) { return run(args, 1); }
static PyObject *py_join(PyObject *self, PyObject *args) { return run(args, 0); }

static PyMethodDef methods[] = {
    {"split", py_split, METH_VARARGS, "split(src, planes, width, n, i0, i1)"},
    {"join", py_join, METH_VARARGS, "join(planes, dst, width, n, i0, i1)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes",
                                    "q8 byte planes (internal).", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
