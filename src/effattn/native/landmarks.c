/* effattn native kernel: exact softmax attention where one side is a few landmarks (L,
 * a multiple of the vector width), Nystromformer's two long products, forward and
 * backward for float32 on the CPU (C99 + GCC vector extensions, optionally OpenMP),
 * loaded with ctypes by effattn/native/__init__.py; the autograd Functions of
 * effattn.mechanisms._landmarks are the torch twins.
 *
 * - queries over landmarks: N queries, L keys.  A block of RB query rows gets its scores
 *   [RB][L] (one product against the scaled, transposed keys), their softmax along each
 *   row and the product with the values, in a thread's cache; the backward recomputes
 *   them and adds the key and value gradients of its rows into its part's sums.
 * - landmarks over keys: L queries, N keys.  A block of RB key rows gets its transposed
 *   scores [RB][L] (key rows against the scaled, transposed landmarks), and the softmax
 *   runs down the columns as an online softmax (rowblocks.h: column_block_sums), the
 *   parts' sums merged at the end: nothing [L][N] is kept; the backward recomputes each
 *   block's weights from the saved per-landmark maxima and sums.
 *
 * Scores are in base-2 units (the scale times log2 e folded into the short side), keys
 * marked invalid are left out, and a query with no valid key outputs zeros with zero
 * gradients. */
#include "rowblocks.h"

/* Validity of the L short-side keys of batch b as lane masks (-1 valid, 0 not). */
static void lane_valid(const uint8_t *kvalid, int64_t kv_sb, int64_t b, int64_t L, int32_t *out) {
    for (int64_t l = 0; l < L; l++) out[l] = kvalid == NULL || kvalid[b * kv_sb + l] ? -1 : 0;
}

/* xt [D][L] = f x^T for x [L][D]. */
static void transpose_scaled(const float *x, int64_t L, int64_t D, float f, float *xt) {
    for (int64_t l = 0; l < L; l++)
        for (int64_t d = 0; d < D; d++) xt[d * L + l] = f * x[l * D + d];
}

/* ------------------------------------------------------------ queries over landmarks */

/* Query blocks lo .. hi - 1 (item = bh * nqb + block) of the forward. */
static inline __attribute__((always_inline)) void qol_forward_range(
    const float *q, const float *kt2, const float *v, const int32_t *cval, int64_t H, int64_t N,
    const int64_t L, const int64_t D, const int64_t Dv, float *out, int64_t lo, int64_t hi,
    float *s, float *p, float *qbuf, float *obuf) {
    const int64_t nqb = (N + RB - 1) / RB;
    for (int64_t it = lo; it < hi; it++) {
        const int64_t bh = it / nqb, a = (it % nqb) * RB;
        const int64_t r = N - a < RB ? N - a : RB, r4 = (r + 3) & ~(int64_t)3;
        rows_times(rows4(q + bh * N * D, a, r, D, qbuf), r4, D, D, (float *)(kt2 + bh * D * L), L, s, L);
        row_softmax(s, r, L, 1.0f, cval ? cval + (bh / H) * L : NULL, p);
        memset(p + r * L, 0, sizeof(float) * (r4 - r) * L);
        rows_times_at(p, r, L, L, v + bh * L * Dv, Dv, out + bh * N * Dv, a, obuf);
    }
}

/* Per (batch, head): kt2 [D][L] = (scale log2 e) k^T and the keys' lane validity. */
static void qol_setup(const float *k, const uint8_t *kvalid, int64_t kv_sb, int64_t BH, int64_t H,
                      int64_t L, int64_t D, float scale, float *kt2, int32_t *cval) {
    for (int64_t bh = 0; bh < BH; bh++)
        transpose_scaled(k + bh * L * D, L, D, scale * LOG2E, kt2 + bh * D * L);
    if (cval != NULL)
        for (int64_t b = 0; b < BH / H; b++) lane_valid(kvalid, kv_sb, b, L, cval + b * L);
}

/* q [BH, N, D], k [BH, L, D], v [BH, L, Dv] float32 contiguous; kvalid bytes [.][L] at batch
 * stride kv_sb (0: one row for every batch) or NULL -> out [BH, N, Dv] = softmax(scale q
 * k^T) v. */
void effattn_queries_over_landmarks_f32(const float *q, const float *k, const float *v,
                                        const uint8_t *kvalid, int64_t kv_sb, int64_t BH, int64_t H,
                                        int64_t N, int64_t L, int64_t D, int64_t Dv, float scale,
                                        float *out, int nthreads) {
    float *kt2 = aligned_alloc(64, sizeof(float) * BH * D * L);
    int32_t *cval = kvalid ? aligned_alloc(64, sizeof(int32_t) * (BH / H) * L) : NULL;
    qol_setup(k, kvalid, kv_sb, BH, H, L, D, scale, kt2, cval);
    const int64_t items = BH * ((N + RB - 1) / RB);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *s = aligned_alloc(64, sizeof(float) * RB * L), *p = aligned_alloc(64, sizeof(float) * RB * L);
        float *qbuf = aligned_alloc(64, sizeof(float) * RB * D), *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        if (L == 64 && D == 64 && Dv == 64)
            qol_forward_range(q, kt2, v, cval, H, N, 64, 64, 64, out, lo, hi, s, p, qbuf, obuf);
        else
            qol_forward_range(q, kt2, v, cval, H, N, L, D, Dv, out, lo, hi, s, p, qbuf, obuf);
        free(s);
        free(p);
        free(qbuf);
        free(obuf);
    }
    free(kt2);
    free(cval);
}

/* Part `item` of the backward: its rows' dq (written) and their key and value gradient
 * sums dks [L][D] (scaled later) and dvp [L][Dv] (written). */
static inline __attribute__((always_inline)) void qol_backward_part(
    const float *q, const float *kt2, const float *ks, const float *vt, const int32_t *cval,
    const float *dout, int64_t N, const int64_t L, const int64_t D, const int64_t Dv,
    int64_t parts, int64_t item, float *dq, float *dks, float *dvp, float *s, float *p,
    float *qbuf, float *gbuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(N, item % parts, parts, &lo, &hi);
    const float *qb = q + bh * N * D, *gb = dout + bh * N * Dv;
    memset(dks, 0, sizeof(float) * L * D);
    memset(dvp, 0, sizeof(float) * L * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        rows_times(rows4(qb, a, r, D, qbuf), r4, D, D, (float *)kt2, L, s, L);
        row_softmax(s, r, L, 1.0f, cval, p);
        add_transposed_times(p, r, L, (float *)(gb + a * Dv), Dv, dvp);
        /* dP = dO V^T, then dS = P (dP - rowsum(dP P)) in place (rows past r: zero) */
        rows_times(rows4(gb, a, r, Dv, gbuf), r4, Dv, Dv, (float *)vt, L, s, L);
        row_softmax_grad(p, s, r, L, 1.0f, s, L);
        rows_times_at(s, r, L, L, ks, D, dq + bh * N * D, a, qbuf);
        add_transposed_times(s, r, L, (float *)(qb + a * D), D, dks);
    }
}

/* The gradients of effattn_queries_over_landmarks_f32 for dout [BH, N, Dv]: dq [BH, N, D],
 * dk [BH, L, D], dv [BH, L, Dv] written. */
void effattn_queries_over_landmarks_backward_f32(
    const float *q, const float *k, const float *v, const uint8_t *kvalid, int64_t kv_sb,
    int64_t BH, int64_t H, int64_t N, int64_t L, int64_t D, int64_t Dv, float scale,
    const float *dout, float *dq, float *dk, float *dv, int nthreads) {
    float *kt2 = aligned_alloc(64, sizeof(float) * BH * D * L);
    float *ks = aligned_alloc(64, sizeof(float) * BH * L * D);
    float *vt = aligned_alloc(64, sizeof(float) * BH * Dv * L);
    int32_t *cval = kvalid ? aligned_alloc(64, sizeof(int32_t) * (BH / H) * L) : NULL;
    qol_setup(k, kvalid, kv_sb, BH, H, L, D, scale, kt2, cval);
    for (int64_t x = 0; x < BH * L * D; x++) ks[x] = scale * k[x];
    for (int64_t bh = 0; bh < BH; bh++) transpose_scaled(v + bh * L * Dv, L, Dv, 1.0f, vt + bh * Dv * L);
    const int64_t parts = parts_of(BH, N, nthreads), items = BH * parts;
    float *dkp = aligned_alloc(64, sizeof(float) * items * L * D);
    float *dvp = aligned_alloc(64, sizeof(float) * items * L * Dv);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *s = aligned_alloc(64, sizeof(float) * RB * L), *p = aligned_alloc(64, sizeof(float) * RB * L);
        float *qbuf = aligned_alloc(64, sizeof(float) * RB * D), *gbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / parts;
            const float *a1 = kt2 + bh * D * L, *a2 = ks + bh * L * D, *a3 = vt + bh * Dv * L;
            const int32_t *cv = cval ? cval + (bh / H) * L : NULL;
            if (L == 64 && D == 64 && Dv == 64)
                qol_backward_part(q, a1, a2, a3, cv, dout, N, 64, 64, 64, parts, it, dq, dkp + it * L * D,
                                  dvp + it * L * Dv, s, p, qbuf, gbuf);
            else
                qol_backward_part(q, a1, a2, a3, cv, dout, N, L, D, Dv, parts, it, dq, dkp + it * L * D,
                                  dvp + it * L * Dv, s, p, qbuf, gbuf);
        }
        free(s);
        free(p);
        free(qbuf);
        free(gbuf);
    }
    for (int64_t bh = 0; bh < BH; bh++) {
        float *dkb = dk + bh * L * D, *dvb = dv + bh * L * Dv;
        memset(dkb, 0, sizeof(float) * L * D);
        memset(dvb, 0, sizeof(float) * L * Dv);
        for (int64_t p = 0; p < parts; p++) {
            const float *x = dkp + (bh * parts + p) * L * D, *y = dvp + (bh * parts + p) * L * Dv;
            for (int64_t i = 0; i < L * D; i++) dkb[i] += x[i];
            for (int64_t i = 0; i < L * Dv; i++) dvb[i] += y[i];
        }
        for (int64_t i = 0; i < L * D; i++) dkb[i] *= scale;
    }
    free(kt2);
    free(ks);
    free(vt);
    free(cval);
    free(dkp);
    free(dvp);
}

/* ------------------------------------------------------------- landmarks over keys */

/* Part `item` of the forward: the landmarks' online column sums over its key rows, m, z
 * [L] and A [L][Dv] (written). */
static inline __attribute__((always_inline)) void lok_forward_part(
    const float *qt2, const float *k, const float *v, const uint8_t *kv, int64_t N, const int64_t L,
    const int64_t D, const int64_t Dv, int64_t parts, int64_t item, float *m, float *z, float *A,
    float *st, float *e, float *kbuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(N, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * N * D, *vb = v + bh * N * Dv;
    for (int64_t l = 0; l < L; l++) m[l] = -INFINITY;
    memset(z, 0, sizeof(float) * L);
    memset(A, 0, sizeof(float) * L * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        rows_times(rows4(kb, a, r, D, kbuf), r4, D, D, (float *)qt2, L, st, L);
        column_block_sums(st, r, L, 1.0f, kv ? kv + a : NULL, m, z, A, vb + a * Dv, Dv, e, e + RB * L);
    }
}

/* q [BH, L, D], k [BH, N, D], v [BH, N, Dv] float32 contiguous; kvalid bytes [.][N] at batch
 * stride kv_sb or NULL -> out [BH, L, Dv] = softmax(scale q k^T) v, and the per-landmark
 * base-2 maxima m [BH, L] (-inf: no valid key) and weight sums z [BH, L] the backward
 * takes. */
void effattn_landmarks_over_keys_f32(const float *q, const float *k, const float *v,
                                     const uint8_t *kvalid, int64_t kv_sb, int64_t BH, int64_t H,
                                     int64_t N, int64_t L, int64_t D, int64_t Dv, float scale,
                                     float *out, float *m, float *z, int nthreads) {
    float *qt2 = aligned_alloc(64, sizeof(float) * BH * D * L);
    for (int64_t bh = 0; bh < BH; bh++) transpose_scaled(q + bh * L * D, L, D, scale * LOG2E, qt2 + bh * D * L);
    const int64_t parts = parts_of(BH, N, nthreads), items = BH * parts;
    float *mp = aligned_alloc(64, sizeof(float) * items * L), *zp = aligned_alloc(64, sizeof(float) * items * L);
    float *Ap = aligned_alloc(64, sizeof(float) * items * L * Dv);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *st = aligned_alloc(64, sizeof(float) * RB * L), *e = aligned_alloc(64, sizeof(float) * (RB + 1) * L);
        float *kbuf = aligned_alloc(64, sizeof(float) * RB * D);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / parts;
            const uint8_t *kv = kvalid ? kvalid + (bh / H) * kv_sb : NULL;
            if (L == 64 && D == 64 && Dv == 64)
                lok_forward_part(qt2 + bh * D * L, k, v, kv, N, 64, 64, 64, parts, it, mp + it * L,
                                 zp + it * L, Ap + it * L * Dv, st, e, kbuf);
            else
                lok_forward_part(qt2 + bh * D * L, k, v, kv, N, L, D, Dv, parts, it, mp + it * L,
                                 zp + it * L, Ap + it * L * Dv, st, e, kbuf);
        }
        free(st);
        free(e);
        free(kbuf);
    }
    for (int64_t bh = 0; bh < BH; bh++)
        merge_column_parts(mp + bh * parts * L, zp + bh * parts * L, Ap + bh * parts * L * Dv, parts,
                           L, Dv, 1.0f, m + bh * L, z + bh * L, out + bh * L * Dv);
    free(qt2);
    free(mp);
    free(zp);
    free(Ap);
}

/* Part `item` of the backward: its key rows' dk and dv (written) and their sum dqp [L][D]
 * for the landmarks (written; scaled later). */
static inline __attribute__((always_inline)) void lok_backward_part(
    const float *qt2, const float *qs, const float *k, const float *v, const uint8_t *kv,
    const float *cl, const float *dA, const float *dAt, const float *dz, int64_t N, const int64_t L,
    const int64_t D, const int64_t Dv, int64_t parts, int64_t item, float *dk, float *dv,
    float *dqp, float *st, float *e, float *ds, float *kbuf, float *vbuf, float *obuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(N, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * N * D, *vb = v + bh * N * Dv;
    memset(dqp, 0, sizeof(float) * L * D);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        rows_times(rows4(kb, a, r, D, kbuf), r4, D, D, (float *)qt2, L, st, L);
        column_weights(st, r, L, 1.0f, cl, kv ? kv + a : NULL, e);
        memset(e + r * L, 0, sizeof(float) * (r4 - r) * L);
        float *dvb = dv + bh * N * Dv, *o = out_rows(dvb, a, r, Dv, obuf);
        column_grads(e, r4, L, rows4(vb, a, r, Dv, vbuf), Dv, dA, dAt, dz, o, Dv, ds);
        put_rows(dvb, a, r, Dv, obuf);
        rows_times_at(ds, r, L, L, qs, D, dk + bh * N * D, a, kbuf);
        add_transposed_times(ds, r, L, (float *)(kb + a * D), D, dqp);
    }
}

/* The gradients of effattn_landmarks_over_keys_f32 for dout [BH, L, Dv], from its out, m
 * and z: dq [BH, L, D], dk [BH, N, D], dv [BH, N, Dv] written. */
void effattn_landmarks_over_keys_backward_f32(
    const float *q, const float *k, const float *v, const uint8_t *kvalid, int64_t kv_sb,
    int64_t BH, int64_t H, int64_t N, int64_t L, int64_t D, int64_t Dv, float scale,
    const float *out, const float *m, const float *z, const float *dout, float *dq, float *dk,
    float *dv, int nthreads) {
    float *qt2 = aligned_alloc(64, sizeof(float) * BH * D * L), *qs = aligned_alloc(64, sizeof(float) * BH * L * D);
    float *dA = aligned_alloc(64, sizeof(float) * BH * L * Dv), *dAt = aligned_alloc(64, sizeof(float) * BH * Dv * L);
    float *dz = aligned_alloc(64, sizeof(float) * BH * L), *cl = aligned_alloc(64, sizeof(float) * BH * L);
    for (int64_t bh = 0; bh < BH; bh++) transpose_scaled(q + bh * L * D, L, D, scale * LOG2E, qt2 + bh * D * L);
    for (int64_t x = 0; x < BH * L * D; x++) qs[x] = scale * q[x];
    /* out = A / z: dA = dout / z, dz = -<dout, out> / z per landmark (z = 0: no key) */
    for (int64_t bl = 0; bl < BH * L; bl++) {
        const float zs = z[bl] == 0.0f ? 1.0f : z[bl];
        const int64_t bh = bl / L, l = bl % L;
        float delta = 0.0f;
        for (int64_t x = 0; x < Dv; x++) {
            delta += dout[bl * Dv + x] * out[bl * Dv + x];
            dA[bl * Dv + x] = dout[bl * Dv + x] / zs;
            dAt[(bh * Dv + x) * L + l] = dA[bl * Dv + x];
        }
        dz[bl] = -delta / zs;
        cl[bl] = m[bl] == -INFINITY ? 0.0f : m[bl];
    }
    const int64_t parts = parts_of(BH, N, nthreads), items = BH * parts;
    float *dqp = aligned_alloc(64, sizeof(float) * items * L * D);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *st = aligned_alloc(64, sizeof(float) * RB * L), *e = aligned_alloc(64, sizeof(float) * RB * L);
        float *ds = aligned_alloc(64, sizeof(float) * RB * L);
        float *kbuf = aligned_alloc(64, sizeof(float) * RB * D), *vbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / parts;
            const uint8_t *kv = kvalid ? kvalid + (bh / H) * kv_sb : NULL;
            const float *a1 = qt2 + bh * D * L, *a2 = qs + bh * L * D, *a3 = cl + bh * L;
            const float *a4 = dA + bh * L * Dv, *a5 = dAt + bh * Dv * L, *a6 = dz + bh * L;
            if (L == 64 && D == 64 && Dv == 64)
                lok_backward_part(a1, a2, k, v, kv, a3, a4, a5, a6, N, 64, 64, 64, parts, it, dk, dv,
                                  dqp + it * L * D, st, e, ds, kbuf, vbuf, obuf);
            else
                lok_backward_part(a1, a2, k, v, kv, a3, a4, a5, a6, N, L, D, Dv, parts, it, dk, dv,
                                  dqp + it * L * D, st, e, ds, kbuf, vbuf, obuf);
        }
        free(st);
        free(e);
        free(ds);
        free(kbuf);
        free(vbuf);
        free(obuf);
    }
    for (int64_t bh = 0; bh < BH; bh++) {
        float *dqb = dq + bh * L * D;
        memset(dqb, 0, sizeof(float) * L * D);
        for (int64_t p = 0; p < parts; p++) {
            const float *x = dqp + (bh * parts + p) * L * D;
            for (int64_t i = 0; i < L * D; i++) dqb[i] += x[i];
        }
        for (int64_t i = 0; i < L * D; i++) dqb[i] *= scale;
    }
    free(qt2);
    free(qs);
    free(dA);
    free(dAt);
    free(dz);
    free(cl);
    free(dqp);
}
