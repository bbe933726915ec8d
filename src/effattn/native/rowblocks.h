/* effattn native kernels: products and row-block helpers shared by the kernels that
 * stream over blocks of rows of a short side (efficient.c: features; landmarks.c:
 * Nystromformer's landmarks).  Static inline, like vec.h. */
#ifndef EFFATTN_ROWBLOCKS_H
#define EFFATTN_ROWBLOCKS_H
#include "vec.h"

/* rows per block: a block's weights, values and products stay in L1/L2 */
#define RB 64

static const float LOG2E = 1.44269504088896341f;

/* Parts each (batch, head)'s rows are split into: enough items for every thread (twice
 * over, so that an odd count of heads still shares evenly), at most one per row block. */
static inline int64_t parts_of(int64_t BH, int64_t N, int nthreads) {
    int64_t p = (2 * (int64_t)nthreads + BH - 1) / BH;
    int64_t blocks = (N + RB - 1) / RB;
    if (p > blocks) p = blocks;
    return p < 1 ? 1 : p;
}

/* Rows lo .. hi - 1 of part `part` of `parts` over N rows, in whole row blocks. */
static inline void part_rows(int64_t N, int64_t part, int64_t parts, int64_t *lo, int64_t *hi) {
    int64_t blocks = (N + RB - 1) / RB;
    *lo = blocks * part / parts * RB;
    *hi = blocks * (part + 1) / parts * RB;
    if (*hi > N) *hi = N;
    if (*lo > N) *lo = N;
}

/* dst [n][cols][rows] = the transposes of the n matrices src [n][rows][cols]. */
static inline void transpose_each(const float *src, int64_t n, int64_t rows, int64_t cols, float *dst) {
    for (int64_t b = 0; b < n; b++)
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) dst[(b * cols + j) * rows + i] = src[(b * rows + i) * cols + j];
}

/* O [r][ncol] = X [r][K] Y [K][ncol] (rows of X at ldx, of O at ldo); r a multiple of 4. */
static inline __attribute__((always_inline)) void rows_times(
    const float *X, int64_t r, int64_t ldx, const int64_t K, float *Y, const int64_t ncol,
    float *O, int64_t ldo) {
    float *ys[1] = {Y};
    for (int64_t i = 0; i < r; i += 4)
        mm_rows4(1, (int)K, X + i * ldx, (int)ldx, 1, ys, (int)ncol, ncol / VW, O + i * ldo,
                 (int)ldo, 0);
}

/* S [K][ncol] += X^T Y over r rows: X [r][K], Y [r][ncol] (K a multiple of 4). */
static inline __attribute__((always_inline)) void add_transposed_times(
    const float *X, int64_t r, const int64_t K, float *Y, const int64_t ncol, float *S) {
    float *ys[1] = {Y};
    for (int64_t d = 0; d < K; d += 4)
        mm_rows4(1, (int)r, X + d, 1, (int)K, ys, (int)ncol, ncol / VW, S + d * ncol, (int)ncol, 1);
}

/* Rows of x [n][len] from row a, r of them: the rows themselves when r is a multiple of 4,
 * else copied into buf with zero rows up to the next multiple of 4. */
static inline const float *rows4(const float *x, int64_t a, int64_t r, int64_t len, float *buf) {
    if (r % 4 == 0) return x + a * len;
    memcpy(buf, x + a * len, sizeof(float) * r * len);
    memset(buf + r * len, 0, sizeof(float) * (((r + 3) & ~(int64_t)3) - r) * len);
    return buf;
}

/* The output rows a .. a + r - 1 of o [n][len]: o's own rows when r is a multiple of 4,
 * else buf (copied to o by put_rows). */
static inline float *out_rows(float *o, int64_t a, int64_t r, int64_t len, float *buf) {
    return r % 4 == 0 ? o + a * len : buf;
}

static inline void put_rows(float *o, int64_t a, int64_t r, int64_t len, const float *buf) {
    if (r % 4) memcpy(o + a * len, buf, sizeof(float) * r * len);
}

/* Rows a .. a + r - 1 of O [n][ncol] = X Y: X [r4][K] (rows of ldx, r4 = r rounded up to a
 * multiple of 4, rows past r zero or ignored), Y [K][ncol]; through buf [r4][ncol] where r is
 * not a multiple of 4. */
static inline __attribute__((always_inline)) void rows_times_at(
    const float *X, int64_t r, int64_t ldx, const int64_t K, const float *Y, const int64_t ncol,
    float *O, int64_t a, float *buf) {
    float *o = out_rows(O, a, r, ncol, buf);
    rows_times(X, (r + 3) & ~(int64_t)3, ldx, K, (float *)Y, ncol, o, ncol);
    put_rows(O, a, r, ncol, buf);
}

/* ------------------------------------------------- softmax down the columns of row blocks */

/* e [r][F] = 2^(f x - cl) of rows x [r][F] (0 for a row that valid marks invalid). */
static inline __attribute__((always_inline)) void column_weights(
    const float *x, int64_t r, const int64_t F, float f, const float *cl, const uint8_t *valid,
    float *e) {
    const vf fv = vsplat(f);
    for (int64_t j = 0; j < r; j++) {
        if (valid != NULL && !valid[j]) {
            memset(e + j * F, 0, sizeof(float) * F);
            continue;
        }
        for (int64_t c = 0; c < F; c += VW)
            vstore(e + j * F + c, vexp2(vload(x + j * F + c) * fv - vload(cl + c)));
    }
}

/* mt [F] = the maxima down the columns of rows x [r][F] (rows valid marks invalid left
 * out; -inf where none is left): a column vector at a time, four rows at a time into
 * separate registers (through memory, each row's maxima waited on the last one's store). */
static inline __attribute__((always_inline)) void column_max(const float *x, int64_t r,
                                                             const int64_t F, const uint8_t *valid,
                                                             float *mt) {
    const vf ninf = vsplat(-INFINITY);
    for (int64_t c = 0; c < F; c += VW) {
        vf m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
        if (valid == NULL) {
            int64_t j = 0;
            for (; j + 4 <= r; j += 4) {
                m0 = vmax(vload(x + j * F + c), m0);
                m1 = vmax(vload(x + (j + 1) * F + c), m1);
                m2 = vmax(vload(x + (j + 2) * F + c), m2);
                m3 = vmax(vload(x + (j + 3) * F + c), m3);
            }
            for (; j < r; j++) m0 = vmax(vload(x + j * F + c), m0);
        } else {
            for (int64_t j = 0; j < r; j++)
                if (valid[j]) m0 = vmax(vload(x + j * F + c), m0);
        }
        vstore(mt + c, vmax(vmax(m0, m1), vmax(m2, m3)));
    }
}

/* One block of an online softmax down the columns: rows x [r][F] (scores 2^(f x), the
 * rows valid marks invalid left out) raise the running column maxima m [F] (x units; -inf
 * while a column has no row), the sums so far z [F] and A [F][Dv] are rescaled where
 * they rise, then the block's weights e = 2^(f (x - m)) [r][F] are added: z += colsum(e),
 * A += e^T V (V [r][Dv] the block's value rows).  mt: scratch [F]. */
static inline __attribute__((always_inline)) void column_block_sums(
    const float *x, int64_t r, const int64_t F, float f, const uint8_t *valid, float *m, float *z,
    float *A, const float *V, const int64_t Dv, float *e, float *mt) {
    column_max(x, r, F, valid, mt);
    for (int64_t c = 0; c < F; c++) {
        if (mt[c] > m[c]) { /* a new maximum: the sums so far scaled down to it */
            const float s = m[c] == -INFINITY ? 0.0f : exp2f(f * (m[c] - mt[c]));
            z[c] *= s;
            for (int64_t x2 = 0; x2 < Dv; x2++) A[c * Dv + x2] *= s;
            m[c] = mt[c];
        }
        mt[c] = m[c] == -INFINITY ? 0.0f : f * m[c];
    }
    column_weights(x, r, F, f, mt, valid, e);
    for (int64_t c = 0; c < F; c += VW) {
        vf s = vload(z + c);
        for (int64_t j = 0; j < r; j++) s += vload(e + j * F + c);
        vstore(z + c, s);
    }
    add_transposed_times(e, r, F, (float *)V, Dv, A);
}

/* The column sums of `parts` parts (m, z [parts][F], A [parts][F][Dv], each against its
 * own maxima) brought to their common maxima: m_out [F] (-inf where no part has a row), z_out
 * [F] and O [F][Dv] = A / z (0 where z = 0). */
static inline void merge_column_parts(const float *m, const float *z, const float *A,
                                      int64_t parts, int64_t F, int64_t Dv, float f, float *m_out,
                                      float *z_out, float *O) {
    for (int64_t c = 0; c < F; c++) {
        float mx = -INFINITY;
        for (int64_t p = 0; p < parts; p++) mx = fmaxf(mx, m[p * F + c]);
        float zs = 0.0f;
        for (int64_t x = 0; x < Dv; x++) O[c * Dv + x] = 0.0f;
        for (int64_t p = 0; p < parts; p++) {
            if (m[p * F + c] == -INFINITY) continue; /* no row in the part */
            const float s = exp2f(f * (m[p * F + c] - mx));
            zs += z[p * F + c] * s;
            for (int64_t x = 0; x < Dv; x++) O[c * Dv + x] += A[(p * F + c) * Dv + x] * s;
        }
        m_out[c] = mx;
        z_out[c] = zs;
        const float inv = zs == 0.0f ? 1.0f : 1.0f / zs;
        for (int64_t x = 0; x < Dv; x++) O[c * Dv + x] *= inv;
    }
}

/* The gradients through a block's column weights e [r4][F] (r4 a multiple of 4, rows past
 * the block's zero): dv [r4][Dv] = e dA (written where dv is not NULL; rows of ldv) and
 * dS [r4][F] = e (V dA^T + dz), V [r4][Dv] the value rows, dAt = dA^T [Dv][F]. */
static inline __attribute__((always_inline)) void column_grads(
    const float *e, int64_t r4, const int64_t F, const float *V, const int64_t Dv, const float *dA,
    const float *dAt, const float *dz, float *dv, int64_t ldv, float *dS) {
    if (dv != NULL) rows_times(e, r4, F, F, (float *)dA, Dv, dv, ldv);
    rows_times(V, r4, Dv, Dv, (float *)dAt, F, dS, F);
    for (int64_t j = 0; j < r4; j++)
        for (int64_t c = 0; c < F; c += VW)
            vstore(dS + j * F + c, vload(e + j * F + c) * (vload(dS + j * F + c) + vload(dz + c)));
}

/* ----------------------------------------------------------- softmax along rows of blocks */

/* p [r][F] = softmax along each row of 2^(f x) for rows x [r][F], columns that cvalid
 * marks invalid (0) left out (NULL: none); a row with no valid column gets zeros.  Rows
 * go in groups of VW, their maxima and sums reduced across lanes together (hmax_lanes,
 * hsum_lanes): rows of 64 are 4 vectors, and a reduction per row cost as much as the rest
 * of its softmax. */
static inline __attribute__((always_inline)) void row_softmax(
    const float *x, int64_t r, const int64_t F, float f, const int32_t *cvalid, float *p) {
    const vf fv = vsplat(f), ninf = vsplat(-INFINITY), zero = vsplat(0.0f);
    for (int64_t i0 = 0; i0 < r; i0 += VW) {
        const int64_t g = r - i0 < VW ? r - i0 : VW;
        vf acc[VW];
        float m[VW], inv[VW];
        for (int64_t i = 0; i < VW; i++) {
            vf mx = ninf;
            if (i < g)
                for (int64_t c = 0; c < F; c += VW) {
                    vf y = vload(x + (i0 + i) * F + c);
                    if (cvalid != NULL) y = vselect(viload(cvalid + c), y, ninf);
                    mx = vmax(y, mx);
                }
            acc[i] = mx;
        }
        vstore(m, hmax_lanes(acc));
        for (int64_t i = 0; i < VW; i++) {
            vf tot = zero;
            if (i < g && m[i] != -INFINITY) {
                const float *row = x + (i0 + i) * F;
                float *pr = p + (i0 + i) * F;
                const vf mv = vsplat(m[i]);
                for (int64_t c = 0; c < F; c += VW) {
                    vf w = vexp2((vload(row + c) - mv) * fv);
                    if (cvalid != NULL) w = vselect(viload(cvalid + c), w, zero);
                    vstore(pr + c, w);
                    tot += w;
                }
            }
            acc[i] = tot;
        }
        vstore(inv, 1.0f / hsum_lanes(acc));
        for (int64_t i = 0; i < g; i++) {
            float *pr = p + (i0 + i) * F;
            if (m[i] == -INFINITY) { /* no valid column */
                memset(pr, 0, sizeof(float) * F);
                continue;
            }
            const vf iv = vbcast(inv + i);
            for (int64_t c = 0; c < F; c += VW) vstore(pr + c, vload(pr + c) * iv);
        }
    }
}

/* out [r][F] (rows of ldo) = factor p (dp - <dp, p>) along each row: the gradient of the
 * scores under row_softmax (factor: the scores' scale), in place where out is dp.  The
 * dot products of VW rows are reduced across lanes together (as in row_softmax). */
static inline __attribute__((always_inline)) void row_softmax_grad(
    const float *p, const float *dp, int64_t r, const int64_t F, float factor, float *out,
    int64_t ldo) {
    const vf fv = vsplat(factor);
    for (int64_t i0 = 0; i0 < r; i0 += VW) {
        const int64_t g = r - i0 < VW ? r - i0 : VW;
        vf acc[VW];
        float dot[VW];
        for (int64_t i = 0; i < VW; i++) {
            vf s = vsplat(0.0f);
            if (i < g)
                for (int64_t c = 0; c < F; c += VW)
                    s += vload(p + (i0 + i) * F + c) * vload(dp + (i0 + i) * F + c);
            acc[i] = s;
        }
        vstore(dot, hsum_lanes(acc));
        for (int64_t i = 0; i < g; i++) {
            const float *pr = p + (i0 + i) * F, *dpr = dp + (i0 + i) * F;
            const vf sv = vbcast(dot + i);
            for (int64_t c = 0; c < F; c += VW)
                vstore(out + (i0 + i) * ldo + c, fv * vload(pr + c) * (vload(dpr + c) - sv));
        }
    }
}

#endif
