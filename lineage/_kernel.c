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
 * once and keeps every intermediate in registers (one fused step per LANES
 * elements, specialised per candidate count), so the fit runs at a good
 * fraction of the speed of reading the file instead of a tenth of it.
 *
 * Numerics: inputs are decoded to float32 exactly (BF16 and F16 are subsets
 * of float32), differences are taken in float64, products and sums are
 * accumulated in float64 (each product added by a fused multiply-add, on
 * every path) in blocks of at most BLOCK elements of one row with LANES
 * independent partial sums per entry, then added to the running totals. The
 * order of every addition is fixed by this code, so results do not depend
 * on the CPU, the thread count or the vector width.
 *
 * It also adds, for each candidate j >= 1, the energy of its difference
 * from the reference, (p_j - r)^2, over the elements where the suspect kept
 * the reference's value (within tol_0): `dropped`. Sparse merges drop deltas
 * there; TIES drops the smallest, DARE drops at random, so this energy per
 * element, against the average, tells the two apart (lineage/verdict.py).
 *
 * Entry points (all buffers C-contiguous, n elements each, n a multiple of
 * cols: a chunk is whole rows of a matrix with `cols` columns, n < 2^31):
 *   accumulate_bf16(gram, sums, counts, tols, s, (p_0, ...), cols, colsum, rowgram, dropped)   uint16 BF16 bits
 *   accumulate_f32 (gram, sums, counts, tols, s, (p_0, ...), cols, colsum, rowgram, dropped)   float32
 * gram, rowgram: writable float64[m*m], sums: writable float64[m], colsum:
 * writable float64[m*cols], counts: writable int64[2k] (k exact counts, then
 * k near counts), tols: float64[k], dropped: writable float64[k] (entry 0
 * unused); the outputs are added to, not overwritten.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXC 8      /* candidates per call */
#define BLOCK 256   /* elements per block (a block never crosses a row) */
#define LANES 8     /* independent partial sums per accumulator */

/*
 * GCC vector types of 8 and 4 lanes. A LANES-lane accumulator is one 8-lane
 * vector (one AVX-512 register) or two 4-lane ones (AVX2, SSE2, other
 * CPUs): the arithmetic per lane, and the order in which the lanes are
 * added, are the same on every path. Each path uses only vectors its CPU
 * has, which keeps GCC from the generic lowering it uses for wider ones
 * (which turns comparisons into scalar code).
 */
#define VTYPES(W)                                                        \
    typedef double vd##W __attribute__((vector_size(W * 8)));            \
    typedef float vf##W __attribute__((vector_size(W * 4)));             \
    typedef int64_t vl##W __attribute__((vector_size(W * 8)));           \
    typedef int32_t vi##W __attribute__((vector_size(W * 4)));           \
    typedef uint32_t vu##W __attribute__((vector_size(W * 4)));          \
    typedef uint16_t vh##W __attribute__((vector_size(W * 2)));
VTYPES(8)
VTYPES(4)

/*
 * What each path (I: GEN, AVX2, AVX512) does its own way, with the same
 * result bits:
 *   LOAD_BF16_I(W, P, OUT)  W BF16 elements at P into the float vector OUT
 *   CVT_I(W, X)             float to double, exactly
 *   FMA_I(W, A, B, C)       A * B + C rounded once, on every path (products
 *                           of BF16 differences are nearly always exact in
 *                           float64, where this only saves an instruction;
 *                           otherwise it rounds once where a multiply then
 *                           an add would round twice)
 *   MASK_I(W), LE_I(W, A, B)      the lanes where A <= B
 *   COUNT_I(W, ACC, M)            ACC += 1 in the lanes of M (int64 lanes)
 *   ADDSQ_I(W, ACC, Y, M)         ACC += Y * Y in the lanes of M
 * GCC's generic conversions cost several shuffles per vector on x86 (a
 * third of the step), hence the intrinsics there.
 */
#define LOAD_BF16_GEN(W, P, OUT)                                             \
    {                                                                    \
        vh##W h_;                                                        \
        memcpy(&h_, (P), sizeof h_);                                     \
        vu##W u_ = __builtin_convertvector(h_, vu##W) << 16;             \
        memcpy(&(OUT), &u_, sizeof(OUT));                                \
    }
#define LOAD_F32(W, P, OUT) memcpy(&(OUT), (P), sizeof(OUT))
#define CVT_GEN(W, X) __builtin_convertvector((X), vd##W)
#define FMA_GEN(W, A, B, C)                                              \
    ({                                                                   \
        vd##W a_ = (A), b_ = (B), c_ = (C);                              \
        for (int l_ = 0; l_ < W; l_++) c_[l_] = __builtin_fma(a_[l_], b_[l_], c_[l_]); \
        c_;                                                              \
    })
#define MASK_GEN(W) vl##W
#define LE_GEN(W, A, B) ((vl##W)((A) <= (B)))
#define COUNT_GEN(W, ACC, M) ((ACC) -= (M))
#define ADDSQ_GEN(W, ACC, Y, M)                                          \
    {                                                                    \
        vl##W b_;                                                        \
        vd##W y_ = (Y);                                                  \
        memcpy(&b_, &y_, sizeof b_);                                     \
        b_ &= (M);                                                       \
        memcpy(&y_, &b_, sizeof y_);                                     \
        (ACC) = FMA_GEN(W, y_, y_, (ACC));                               \
    }
#define VABS(W, X)                                                       \
    ({                                                                   \
        vl##W b_;                                                        \
        vd##W x_ = (X);                                                  \
        memcpy(&b_, &x_, sizeof b_);                                     \
        b_ &= (vl##W){0} + INT64_MAX;                                    \
        memcpy(&x_, &b_, sizeof x_);                                     \
        x_;                                                              \
    })

/*
 * One step of LANES elements as NH = LANES / W vectors of W: decode,
 * difference, count, accumulate, in registers where the CPU has enough (K
 * is a compile-time constant, so every loop over candidates and Gram
 * entries unrolls). Inputs are T elements at SP and PP[j]. `WR` lanes are
 * real; the others were zero-padded by the caller and only colsum needs to
 * skip them (zeros add nothing to sums and products; the counts they add
 * are taken back at the end of the call).
 */
#define STEP(K, T, LOAD, I, W, SP, PP, WR)                                                       \
    for (int h = 0; h < LANES / W; h++) {                                                        \
        vd##W y[K + 1], sd;                                                                      \
        MASK_##I(W) kept;                                                                        \
        vf##W sf, pf;                                                                            \
        LOAD(W, (const T *)(SP) + h * W, sf);                                                    \
        sd = CVT_##I(W, sf);                                                                     \
        for (int j = 0; j < K; j++) {                                                            \
            LOAD(W, (const T *)(PP)[j] + h * W, pf);                                             \
            eqv[j][h] -= (vi##W)(sf == pf);                                                      \
            vd##W pd = CVT_##I(W, pf);                                                           \
            y[j] = j == 0 ? pd : pd - y[0];                                                      \
            /* near: |s - p_j| <= tol_j |p_j| (as lineage/engines/torch_engine.py) */           \
            MASK_##I(W) near = LE_##I(W, VABS(W, sd - pd), tau[j] * VABS(W, pd));               \
            COUNT_##I(W, nrv[j][h], near);                                                       \
            if (j == 0)                                                                          \
                kept = near;                                                                     \
            else /* delta energy where s kept the reference's value */                          \
                ADDSQ_##I(W, da[j][h], y[j], kept);                                              \
        }                                                                                        \
        y[K] = sd - y[0];                                                                        \
        for (int a = 0; a <= K; a++) sa[a][h] += y[a];                                           \
        {                                                                                        \
            int e = 0;                                                                           \
            for (int a = 0; a <= K; a++)                                                         \
                for (int c = a; c <= K; c++, e++) ga[e][h] = FMA_##I(W, y[a], y[c], ga[e][h]);   \
        }                                                                                        \
        if ((WR) == LANES) {                                                                     \
            for (int a = 0; a <= K; a++) {                                                       \
                vd##W t;                                                                         \
                memcpy(&t, cs + a * cols + h * W, sizeof t);                                     \
                t += y[a];                                                                       \
                memcpy(cs + a * cols + h * W, &t, sizeof t);                                     \
            }                                                                                    \
        } else {                                                                                 \
            for (int a = 0; a <= K; a++)                                                         \
                for (int l = 0; l < W && h * W + l < (WR); l++) cs[a * cols + h * W + l] += y[a][l]; \
        }                                                                                        \
    }

/* The LANES partial sums of accumulator X, added in lane order. */
#define VSUM(W, X)                                                       \
    ({                                                                   \
        double w_ = 0.0;                                                 \
        for (int h_ = 0; h_ < LANES / W; h_++)                           \
            for (int l_ = 0; l_ < W; l_++) w_ += (X)[h_][l_];            \
        w_;                                                              \
    })

/*
 * The kernel for K candidates over element type T with W-lane vectors.
 * Rows are walked in blocks of at most BLOCK elements; each block's lane
 * partial sums are added to the running totals at its end, and its sum of
 * y (the block's part of the row sum) also to the row's sums, whose outer
 * product goes to rowgram when the row ends.
 */
#define DEFINE_KERNEL(NAME, K, T, LOAD, I, W, ATTR)                                                 \
    ATTR static void NAME(Py_ssize_t n, const void *s, const void **p, double *gram, double *sums, \
                          int64_t *counts, const double *tols, Py_ssize_t cols, double *restrict colsum, \
                          double *rowgram, double *dropped) {                                    \
        enum { M = K + 1, NG = (K + 1) * (K + 2) / 2, NH = LANES / W };                          \
        vd##W tau[K];                                                                            \
        vi##W eqv[K][NH]; /* int32 lanes: n < 2^31 per call (checked) */                   \
        vl##W nrv[K][NH];             \
        int64_t pad = 0;                                                                         \
        for (int j = 0; j < K; j++) {                                                            \
            tau[j] = (vd##W){0} + tols[j];                                                       \
            for (int h = 0; h < NH; h++) {                                                       \
                eqv[j][h] = (vi##W){0};                                                          \
                nrv[j][h] = (vl##W){0};                                                          \
            }                     \
        }                                                                                        \
        for (Py_ssize_t row0 = 0; row0 < n; row0 += cols) {                                      \
            double rs[M];                                                                        \
            for (int a = 0; a < M; a++) rs[a] = 0.0;                                             \
            for (Py_ssize_t c0 = 0; c0 < cols; c0 += BLOCK) {                                    \
                Py_ssize_t len = cols - c0 < BLOCK ? cols - c0 : BLOCK;                          \
                Py_ssize_t full = len / LANES * LANES;                                           \
                vd##W ga[NG][NH], sa[M][NH], da[K][NH];                                          \
                for (int h = 0; h < NH; h++) {                                                   \
                    for (int e = 0; e < NG; e++) ga[e][h] = (vd##W){0};                          \
                    for (int a = 0; a < M; a++) sa[a][h] = (vd##W){0};                           \
                    for (int j = 0; j < K; j++) da[j][h] = (vd##W){0};                           \
                }                                                                                \
                for (Py_ssize_t i = 0; i < full; i += LANES) {                                   \
                    Py_ssize_t at = row0 + c0 + i;                                               \
                    const void *pp[K];                                                           \
                    for (int j = 0; j < K; j++) pp[j] = (const T *)p[j] + at;                    \
                    double *cs = colsum + c0 + i;                                                \
                    STEP(K, T, LOAD, I, W, (const T *)s + at, pp, LANES)                            \
                }                                                                                \
                if (full < len) { /* the row's last few elements, zero-padded */                 \
                    Py_ssize_t at = row0 + c0 + full, wr = len - full;                           \
                    T sb[LANES], pb[K][LANES];                                                   \
                    const void *pp[K];                                                           \
                    memset(sb, 0, sizeof sb);                                                    \
                    memset(pb, 0, sizeof pb);                                                    \
                    memcpy(sb, (const T *)s + at, wr * sizeof(T));                               \
                    for (int j = 0; j < K; j++) {                                                \
                        memcpy(pb[j], (const T *)p[j] + at, wr * sizeof(T));                     \
                        pp[j] = pb[j];                                                           \
                    }                                                                            \
                    double *cs = colsum + c0 + full;                                             \
                    STEP(K, T, LOAD, I, W, sb, pp, wr)                                              \
                    pad += LANES - wr;                                                           \
                }                                                                                \
                {                                                                                \
                    int e = 0;                                                                   \
                    for (int a = 0; a < M; a++) {                                                \
                        double t = VSUM(W, sa[a]);                                               \
                        sums[a] += t;                                                            \
                        rs[a] += t;                                                              \
                        for (int c = a; c < M; c++, e++) gram[a * M + c] += VSUM(W, ga[e]);      \
                    }                                                                            \
                    for (int j = 1; j < K; j++) dropped[j] += VSUM(W, da[j]);                    \
                }                                                                                \
            }                                                                                    \
            for (int a = 0; a < M; a++)                                                          \
                for (int c = a; c < M; c++) rowgram[a * M + c] += rs[a] * rs[c];                 \
        }                                                                                        \
        for (int a = 0; a < M; a++)                                                              \
            for (int c = 0; c < a; c++) {                                                        \
                gram[a * M + c] = gram[c * M + a];                                               \
                rowgram[a * M + c] = rowgram[c * M + a];                                         \
            }                                                                                    \
        for (int j = 0; j < K; j++) {                                                            \
            int64_t eq = -pad, nr = -pad;                                                        \
            for (int h = 0; h < NH; h++)                                                         \
                for (int l = 0; l < W; l++) {                                                    \
                    eq += eqv[j][h][l];                                                          \
                    nr += nrv[j][h][l];                                                          \
                }                                                                                \
            counts[j] += eq;                                                                     \
            counts[K + j] += nr;                                                                 \
        }                                                                                        \
    }

typedef void (*kernel_fn)(Py_ssize_t, const void *, const void **, double *, double *, int64_t *, const double *,
                          Py_ssize_t, double *, double *, double *);

/* One family: kernels for 1..MAXC candidates, BF16 and float32, and their tables. */
#define FAMILY(PFX, I, W, ATTR)                                                                     \
    DEFINE_KERNEL(PFX##_bf16_1, 1, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_2, 2, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_3, 3, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_4, 4, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_5, 5, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_6, 6, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_7, 7, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_bf16_8, 8, uint16_t, LOAD_BF16_##I, I, W, ATTR)                                 \
    DEFINE_KERNEL(PFX##_f32_1, 1, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_2, 2, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_3, 3, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_4, 4, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_5, 5, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_6, 6, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_7, 7, float, LOAD_F32, I, W, ATTR)                                      \
    DEFINE_KERNEL(PFX##_f32_8, 8, float, LOAD_F32, I, W, ATTR)                                      \
    static const kernel_fn PFX##_BF16[MAXC + 1] = {NULL,          PFX##_bf16_1, PFX##_bf16_2,    \
                                                   PFX##_bf16_3,  PFX##_bf16_4, PFX##_bf16_5,    \
                                                   PFX##_bf16_6,  PFX##_bf16_7, PFX##_bf16_8};   \
    static const kernel_fn PFX##_F32[MAXC + 1] = {NULL,         PFX##_f32_1, PFX##_f32_2,        \
                                                  PFX##_f32_3,  PFX##_f32_4, PFX##_f32_5,        \
                                                  PFX##_f32_6,  PFX##_f32_7, PFX##_f32_8};

FAMILY(generic, GEN, 4, )
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* -ffp-contract=off (setup): the only fused multiply-adds are FMA_I's, the
 * same on every path. */
#define X86_WIDE 1
#include <immintrin.h>
#define LOAD_BF16_AVX2(W, P, OUT)                                                                \
    {                                                                                            \
        __m128i u_ = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(P))), 16); \
        (OUT) = (vf4)u_;                                                                         \
    }
#define CVT_AVX2(W, X) ((vd4)_mm256_cvtps_pd((__m128)(X)))
#define FMA_AVX2(W, A, B, C) ((vd4)_mm256_fmadd_pd((__m256d)(A), (__m256d)(B), (__m256d)(C)))
#define MASK_AVX2 MASK_GEN
#define LE_AVX2 LE_GEN
#define COUNT_AVX2 COUNT_GEN
#define ADDSQ_AVX2(W, ACC, Y, M)                                                                 \
    {                                                                                            \
        vd4 y_ = (vd4)_mm256_and_pd((__m256d)(Y), (__m256d)(M));                                 \
        (ACC) = FMA_AVX2(W, y_, y_, (ACC));                                                      \
    }
#define LOAD_BF16_AVX512(W, P, OUT)                                                              \
    {                                                                                            \
        __m256i u_ = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(P))), 16); \
        (OUT) = (vf8)u_;                                                                         \
    }
#define CVT_AVX512(W, X) ((vd8)_mm512_cvtps_pd((__m256)(X)))
#define FMA_AVX512(W, A, B, C) ((vd8)_mm512_fmadd_pd((__m512d)(A), (__m512d)(B), (__m512d)(C)))
#define MASK_AVX512(W) __mmask8
#define LE_AVX512(W, A, B) _mm512_cmp_pd_mask((__m512d)(A), (__m512d)(B), _CMP_LE_OQ)
#define COUNT_AVX512(W, ACC, M) ((ACC) = (vl8)_mm512_mask_add_epi64((__m512i)(ACC), (M), (__m512i)(ACC), _mm512_set1_epi64(1)))
#define ADDSQ_AVX512(W, ACC, Y, M) ((ACC) = (vd8)_mm512_mask3_fmadd_pd((__m512d)(Y), (__m512d)(Y), (__m512d)(ACC), (M)))
FAMILY(avx2, AVX2, 4, __attribute__((target("avx2,fma"))))
FAMILY(avx512, AVX512, 8, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))))
#endif

/* Set at import from what this CPU supports. */
static const kernel_fn *BF16 = generic_BF16, *F32 = generic_F32;
static const char *PATH = "generic (4-lane vectors)";

/* The widest path this CPU runs; LINEAGE_KERNEL_PATH=avx2|generic asks for a
 * narrower one (the tests check that every path gives the same bits). */
static void choose_path(void) {
    const char *want = getenv("LINEAGE_KERNEL_PATH");
    if (want && strcmp(want, "generic") == 0) return;
#ifdef X86_WIDE
    __builtin_cpu_init();
    int avx2_only = want && strcmp(want, "avx2") == 0;
    if (!avx2_only && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        BF16 = avx512_BF16, F32 = avx512_F32, PATH = "avx512 (8-lane vectors)";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        BF16 = avx2_BF16, F32 = avx2_F32, PATH = "avx2 (4-lane vectors)";
    }
#endif
}

static PyObject *run(PyObject *args, Py_ssize_t itemsize, const kernel_fn *table) {
    Py_buffer g = {0}, sm = {0}, ex = {0}, tl = {0}, sb = {0}, cs = {0}, rg = {0}, dr = {0}, pb[MAXC];
    PyObject *cands;
    Py_ssize_t cols = 0;
    int k = 0, ok = 0;
    if (!PyArg_ParseTuple(args, "w*w*w*y*y*O!nw*w*w*", &g, &sm, &ex, &tl, &sb, &PyTuple_Type, &cands, &cols, &cs, &rg, &dr))
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
        tl.len != (Py_ssize_t)sizeof(double) * k || rg.len != g.len || cols < 1 || n % cols || n >= ((Py_ssize_t)1 << 31) ||
        cs.len != (Py_ssize_t)sizeof(double) * (k + 1) * cols || dr.len != (Py_ssize_t)sizeof(double) * k) {
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
    table[k](n, sb.buf, pp, (double *)g.buf, (double *)sm.buf, (int64_t *)ex.buf, (const double *)tl.buf, cols,
             (double *)cs.buf, (double *)rg.buf, (double *)dr.buf);
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
    PyBuffer_Release(&dr);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *accumulate_bf16(PyObject *self, PyObject *args) { return run(args, 2, BF16); }
static PyObject *path(PyObject *self, PyObject *args) { return PyUnicode_FromString(PATH); }
static PyObject *accumulate_f32(PyObject *self, PyObject *args) { return run(args, 4, F32); }

static PyMethodDef methods[] = {
    {"accumulate_bf16", accumulate_bf16, METH_VARARGS, "Add one chunk of BF16 bits to gram, sums, exact."},
    {"accumulate_f32", accumulate_f32, METH_VARARGS, "Add one chunk of float32 values to gram, sums, exact."},
    {"path", path, METH_NOARGS, "Which vector path this CPU runs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "lineage's streaming fit kernel", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) {
    choose_path();
    PyObject *m = PyModule_Create(&module);
    /* the one definition of the candidate limit: Python reads it from here */
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_CANDIDATES", MAXC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
