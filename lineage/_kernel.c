/*
 * The streaming fit's inner loop in one pass over the bytes.
 *
 * For a chunk of n elements of the suspect s and k candidates p_0..p_{k-1}
 * it adds to a Gram matrix G (m x m, m = k + 1, float64) and column sums of
 *
 *     y = [ r, p_1 - r, ..., p_{k-1} - r, s - r ]       (r = p_0)
 *
 * and, for the permutation null of lineage/fit.py, the sums of every row
 * (their Gram, m x m, is added per completed row) and of every column
 * (colsum, m x cols), and counts, per candidate, the elements equal to the suspect and those
 * within a relative tolerance tol_j of it (|s - p_j| <= tol_j |p_j|: equal
 * up to storage rounding, the mark sparse merges such as TIES and DARE
 * leave where a delta was dropped). This is
 * what lineage/stats.py computes with torch; doing it here reads each byte
 * once and keeps every intermediate in registers, so the fit runs at a good
 * fraction of the speed of reading the file instead of a tenth of it.
 *
 * Numerics: inputs are decoded to float32 exactly (BF16 and F16 are subsets
 * of float32), differences are taken in float64, products and sums are
 * accumulated in float64 in blocks of BLOCK elements with LANES independent
 * partial sums per entry, then added to the running totals. The order of
 * every addition is fixed by this code, so results do not depend on the
 * CPU, the thread count or the vector width.
 *
 * Entry points (all buffers C-contiguous, n elements each, n a multiple of
 * cols: a chunk is whole rows of a matrix with `cols` columns):
 *   accumulate_bf16(gram, sums, counts, tols, s, (p_0, ...), cols, colsum, rowgram)   uint16 BF16 bits
 *   accumulate_f32 (gram, sums, counts, tols, s, (p_0, ...), cols, colsum, rowgram)   float32
 * gram, rowgram: writable float64[m*m], sums: writable float64[m], colsum:
 * writable float64[m*cols], counts: writable int64[2k] (k exact counts, then
 * k near counts), tols: float64[k]; the outputs are added to, not
 * overwritten.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXC 8      /* candidates per call */
#define BLOCK 256   /* elements per block */
#define LANES 8     /* independent partial sums: vectorisable without reassociation */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline double lane_sum(const double *acc) {
    double w = 0.0;
    for (int l = 0; l < LANES; l++) w += acc[l];
    return w;
}

/* One block: decode, difference, accumulate. `load` picks the input type. */
#define KERNEL_BODY(LOAD)                                                        \
    double racc[MAXC + 1][LANES] = {{0}};                                        \
    for (Py_ssize_t b0 = 0; b0 < n; b0 += BLOCK) {                               \
        Py_ssize_t len = n - b0 < BLOCK ? n - b0 : BLOCK;                        \
        double y[MAXC + 1][BLOCK];                                               \
        float sfb[BLOCK];                                                        \
        for (Py_ssize_t i = 0; i < len; i++) sfb[i] = LOAD(s, b0 + i);           \
        {                                                                        \
            int64_t eq = 0;                                                      \
            for (Py_ssize_t i = 0; i < len; i++) {                               \
                float rf = LOAD(p[0], b0 + i);                                   \
                eq += (sfb[i] == rf);                                            \
                y[0][i] = (double)rf;                                            \
            }                                                                    \
            exact[0] += eq;                                                      \
        }                                                                        \
        for (int j = 1; j < k; j++) {                                            \
            const void *pj = p[j];                                               \
            int64_t eq = 0;                                                      \
            for (Py_ssize_t i = 0; i < len; i++) {                               \
                float pf = LOAD(pj, b0 + i);                                     \
                eq += (sfb[i] == pf);                                            \
                y[j][i] = (double)pf - y[0][i];                                  \
            }                                                                    \
            exact[j] += eq;                                                      \
        }                                                                        \
        for (Py_ssize_t i = 0; i < len; i++) y[k][i] = (double)sfb[i] - y[0][i]; \
        {                                                                        \
            int64_t nr = 0;                                                      \
            double tau = tols[0];                                                \
            for (Py_ssize_t i = 0; i < len; i++)                                 \
                nr += fabs(y[k][i]) <= tau * fabs(y[0][i]);                      \
            exact[k] += nr;                                                      \
        }                                                                        \
        for (int j = 1; j < k; j++) {                                            \
            int64_t nr = 0;                                                      \
            double tau = tols[j];                                                \
            for (Py_ssize_t i = 0; i < len; i++)                                 \
                nr += fabs(y[k][i] - y[j][i]) <= tau * fabs(y[0][i] + y[j][i]);  \
            exact[k + j] += nr;                                                  \
        }                                                                        \
        for (Py_ssize_t i = len; i < ((len + LANES - 1) / LANES) * LANES; i++)   \
            for (int j = 0; j <= k; j++) y[j][i] = 0.0;                          \
        Py_ssize_t lanes_len = ((len + LANES - 1) / LANES) * LANES;              \
        for (Py_ssize_t i = 0; i < len;) {                                       \
            Py_ssize_t c0 = (b0 + i) % cols;                                     \
            Py_ssize_t seg = cols - c0 < len - i ? cols - c0 : len - i;          \
            for (int a = 0; a <= k; a++) {                                       \
                double *restrict cs = colsum + (Py_ssize_t)a * cols + c0;        \
                const double *restrict ya = y[a] + i;                            \
                double *restrict ra = racc[a];                                   \
                Py_ssize_t t = 0;                                                \
                for (; t + LANES <= seg; t += LANES)                             \
                    for (int l = 0; l < LANES; l++) {                            \
                        cs[t + l] += ya[t + l];                                  \
                        ra[l] += ya[t + l];                                      \
                    }                                                            \
                for (; t < seg; t++) {                                           \
                    cs[t] += ya[t];                                              \
                    ra[0] += ya[t];                                              \
                }                                                                \
            }                                                                    \
            i += seg;                                                            \
            if (c0 + seg == cols) { /* a row is complete */                      \
                double rs[MAXC + 1];                                             \
                for (int a = 0; a <= k; a++) {                                   \
                    rs[a] = lane_sum(racc[a]);                                   \
                    for (int l = 0; l < LANES; l++) racc[a][l] = 0.0;            \
                }                                                                \
                for (int a = 0; a <= k; a++)                                     \
                    for (int c = a; c <= k; c++) rowgram[a * m + c] += rs[a] * rs[c]; \
            }                                                                    \
        }                                                                        \
        for (int a = 0; a <= k; a++) {                                           \
            double acc_s[LANES] = {0};                                           \
            for (Py_ssize_t i = 0; i < lanes_len; i += LANES)                    \
                for (int l = 0; l < LANES; l++) acc_s[l] += y[a][i + l];         \
            sums[a] += lane_sum(acc_s);                                          \
            for (int c = a; c <= k; c++) {                                       \
                double acc[LANES] = {0};                                         \
                for (Py_ssize_t i = 0; i < lanes_len; i += LANES)                \
                    for (int l = 0; l < LANES; l++)                              \
                        acc[l] += y[a][i + l] * y[c][i + l];                     \
                gram[a * m + c] += lane_sum(acc);                                \
            }                                                                    \
        }                                                                        \
    }                                                                            \
    for (int a = 0; a <= k; a++)                                                 \
        for (int c = 0; c < a; c++) {                                            \
            gram[a * m + c] = gram[c * m + a];                                   \
            rowgram[a * m + c] = rowgram[c * m + a];                             \
        }


#define LOAD_BF16(ptr, i) bf16_to_f32(((const uint16_t *)(ptr))[i])
#define LOAD_F32(ptr, i) (((const float *)(ptr))[i])

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* Wider vectors where the CPU has them; the same additions in the same
 * order on every path (-ffp-contract=off keeps FMA from changing roundings). */
#define MULTIVERSION __attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void kernel_bf16(Py_ssize_t n, int k, const void *s, const void **p, double *gram, double *sums, int64_t *exact, const double *tols,
                        Py_ssize_t cols, double *colsum, double *rowgram) {
    int m = k + 1;
    KERNEL_BODY(LOAD_BF16)
}

MULTIVERSION
static void kernel_f32(Py_ssize_t n, int k, const void *s, const void **p, double *gram, double *sums, int64_t *exact, const double *tols,
                       Py_ssize_t cols, double *colsum, double *rowgram) {
    int m = k + 1;
    KERNEL_BODY(LOAD_F32)
}

typedef void (*kernel_fn)(Py_ssize_t, int, const void *, const void **, double *, double *, int64_t *, const double *, Py_ssize_t,
                          double *, double *);

static PyObject *run(PyObject *args, Py_ssize_t itemsize, kernel_fn fn) {
    Py_buffer g = {0}, sm = {0}, ex = {0}, tl = {0}, sb = {0}, cs = {0}, rg = {0}, pb[MAXC];
    PyObject *cands;
    Py_ssize_t cols = 0;
    int k = 0, ok = 0;
    if (!PyArg_ParseTuple(args, "w*w*w*y*y*O!nw*w*", &g, &sm, &ex, &tl, &sb, &PyTuple_Type, &cands, &cols, &cs, &rg))
        return NULL;
    k = (int)PyTuple_GET_SIZE(cands);
    int got = 0;
    if (k < 1 || k > MAXC) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d candidates, got %d", MAXC, k);
        goto done;
    }
    Py_ssize_t n = sb.len / itemsize;
    if (sb.len % itemsize || g.len != (Py_ssize_t)sizeof(double) * (k + 1) * (k + 1) ||
        sm.len != (Py_ssize_t)sizeof(double) * (k + 1) || ex.len != (Py_ssize_t)sizeof(int64_t) * 2 * k ||
        tl.len != (Py_ssize_t)sizeof(double) * k || rg.len != g.len || cols < 1 || n % cols ||
        cs.len != (Py_ssize_t)sizeof(double) * (k + 1) * cols) {
        PyErr_SetString(PyExc_ValueError, "output buffers do not match the number of candidates and columns, or the chunk is not whole rows");
        goto done;
    }
    const void *pp[MAXC];
    for (; got < k; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(cands, got), &pb[got], PyBUF_SIMPLE) < 0) goto done;
        if (pb[got].len != sb.len) {
            got++;
            PyErr_SetString(PyExc_ValueError, "every candidate chunk must have the suspect's length");
            goto done;
        }
        pp[got] = pb[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    fn(n, k, sb.buf, pp, (double *)g.buf, (double *)sm.buf, (int64_t *)ex.buf, (const double *)tl.buf, cols,
       (double *)cs.buf, (double *)rg.buf);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&pb[i]);
    PyBuffer_Release(&g);
    PyBuffer_Release(&sm);
    PyBuffer_Release(&ex);
    PyBuffer_Release(&tl);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&cs);
    PyBuffer_Release(&rg);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *accumulate_bf16(PyObject *self, PyObject *args) { return run(args, 2, kernel_bf16); }
static PyObject *accumulate_f32(PyObject *self, PyObject *args) { return run(args, 4, kernel_f32); }

static PyMethodDef methods[] = {
    {"accumulate_bf16", accumulate_bf16, METH_VARARGS, "Add one chunk of BF16 bits to gram, sums, exact."},
    {"accumulate_f32", accumulate_f32, METH_VARARGS, "Add one chunk of float32 values to gram, sums, exact."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "lineage's streaming fit kernel", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
