/* effattn native kernel: Performer's FAVOR+ attention with positive features, non-causal,
 * forward and backward for float32 on the CPU (C99 + GCC vector extensions, optionally
 * OpenMP), loaded with ctypes by effattn/native/__init__.py;
 * effattn.mechanisms.kernel.streamed_feature_attention with PerformerSoftmaxMap is the
 * torch twin.
 *
 * Per (batch, head), with Wr the projection [M][D] times r (r^2 the attention scale) and
 * the logits u(x) = Wr x - h |x|^2 (h = r^2 / 2):
 *   keys:    c = the maximum of u(k_j) over valid keys j and all features, psi_j =
 *            exp(u(k_j) - c) (0 for an invalid key), z = sum_j psi_j [M], A = sum_j psi_j^T
 *            v_j [M][Dv];
 *   queries: p_i = softmax(u(q_i)) over the features, out_i = p_i A / (p_i z) (0 where
 *            p_i z = 0).
 * The twin's query features are exp(u(q_i) - max u(q_i)); they differ from p_i by a factor
 * per row, which cancels in the ratio, so the rows here are normalized (and the query's
 * norm term, another factor per row, is left out).  The twin makes the features in a chain
 * of torch passes over N-sized chunks (product, norm, shift, exp, sums, product, ...);
 * here every block of RB rows is read once per pass and its logits, features and products
 * stay in a thread's cache.
 *
 * Backward (the features recomputed, nothing N-sized kept but the output):
 *   queries: gn_i = g_i / den_i, gd_i = -<g_i, out_i> / den_i (den_i = p_i z);
 *            dA = sum_i p_i^T gn_i, dz = sum_i gd_i p_i, dp_i = gn_i A^T + gd_i z,
 *            du_i = p_i (dp_i - <dp_i, p_i>) (the softmax's backward), dq_i = du_i Wr.
 *            out_i does not change when p_i is scaled, so <dp_i, p_i> is 0 but for rounding,
 *            and so is the gradient of the left-out norm term, -r^2 q_i sum du_i;
 *   keys:    dv_j = psi_j dA, du_j = psi_j (v_j dA^T + dz), dk_j = du_j Wr - r^2 k_j sum du_j.
 *
 * Threads: as efficient.c, each (batch, head)'s rows split into parts; the key sums (with
 * their own maxima) and the query pass's dA, dz are taken per part and merged after. */
#include "rowblocks.h"

/* U [r4][M] = u(x) of rows a .. a + r - 1 of x [n][D] (r4 = r rounded up to a multiple of
 * 4; the rows past r come from zero rows of xbuf), the norm term h |x|^2 subtracted where
 * h != 0.  Returns the r4 rows of x it read (x's own or xbuf). */
static inline __attribute__((always_inline)) const float *logits(
    const float *x, int64_t a, int64_t r, const int64_t D, const float *WrT, const int64_t M,
    float h, float *U, float *xbuf) {
    const float *X = rows4(x, a, r, D, xbuf);
    rows_times(X, (r + 3) & ~(int64_t)3, D, D, (float *)WrT, M, U, M);
    if (h != 0.0f)
        for (int64_t j = 0; j < r; j++) {
            vf s = vsplat(0.0f);
            for (int64_t d = 0; d < D; d += VW) s += vload(X + j * D + d) * vload(X + j * D + d);
            const vf n = vsplat(h * hsum(s));
            for (int64_t c = 0; c < M; c += VW) vstore(U + j * M + c, vload(U + j * M + c) - n);
        }
    return X;
}

/* psi [r4][M] = exp(U - c) in place, rows invalid (valid[j] == 0) or past r zero. */
static inline __attribute__((always_inline)) void key_features(float *U, int64_t r, const int64_t M,
                                                              float c, const uint8_t *valid) {
    const vf cv = vsplat(c), l2 = vsplat(LOG2E);
    const int64_t r4 = (r + 3) & ~(int64_t)3;
    for (int64_t j = 0; j < r4; j++) {
        if (j >= r || (valid != NULL && !valid[j])) {
            memset(U + j * M, 0, sizeof(float) * M);
            continue;
        }
        for (int64_t c0 = 0; c0 < M; c0 += VW)
            vstore(U + j * M + c0, vexp2((vload(U + j * M + c0) - cv) * l2));
    }
}

/* The largest logit of the valid rows among U's first r (-inf where none). */
static inline __attribute__((always_inline)) float block_max(const float *U, int64_t r, const int64_t M,
                                                            const uint8_t *valid) {
    vf m0 = vsplat(-INFINITY), m1 = m0;
    for (int64_t j = 0; j < r; j++) {
        if (valid != NULL && !valid[j]) continue;
        for (int64_t c = 0; c < M; c += 2 * VW) {
            m0 = vmax(vload(U + j * M + c), m0);
            if (c + VW < M) m1 = vmax(vload(U + j * M + c + VW), m1);
        }
    }
    return hmax(vmax(m0, m1));
}

/* ------------------------------------------------------------------------------ forward */

/* Part `item` (bh * parts + part) of the key pass: its maximum *m (-inf where it has no
 * valid key) and the sums z [M], A [M][Dv] against it, kept as an online softmax (the sums
 * so far rescaled when a block raises the maximum). */
static inline __attribute__((always_inline)) void key_sums_part(
    const float *k, const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const int64_t D,
    const int64_t Dv, const float *WrT, const int64_t M, float h, int64_t parts, int64_t item,
    float *U, float *xbuf, float *m, float *z, float *A) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * Nk * D, *vb = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    float mx = -INFINITY;
    memset(z, 0, sizeof(float) * M);
    memset(A, 0, sizeof(float) * M * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB;
        const uint8_t *valid = kv ? kv + a : NULL;
        logits(kb, a, r, D, WrT, M, h, U, xbuf);
        const float bm = block_max(U, r, M, valid);
        if (bm == -INFINITY) continue; /* no valid key in the block */
        if (bm > mx) {
            const float s = mx == -INFINITY ? 0.0f : expf(mx - bm);
            for (int64_t c = 0; c < M; c++) z[c] *= s;
            for (int64_t i = 0; i < M * Dv; i++) A[i] *= s;
            mx = bm;
        }
        key_features(U, r, M, mx, valid);
        for (int64_t c = 0; c < M; c += VW) {
            vf s = vload(z + c);
            for (int64_t j = 0; j < r; j++) s += vload(U + j * M + c);
            vstore(z + c, s);
        }
        add_transposed_times(U, r, M, (float *)(vb + a * Dv), Dv, A);
    }
    *m = mx;
}

/* p [r4][M] = softmax(u(q)) of query rows a .. a + r - 1 (rows past r zero). */
static inline __attribute__((always_inline)) void query_features(
    const float *qb, int64_t a, int64_t r, const int64_t D, const float *WrT, const int64_t M,
    float *p, float *xbuf) {
    logits(qb, a, r, D, WrT, M, 0.0f, p, xbuf);
    row_softmax(p, r, M, LOG2E, NULL, p); /* in place: each element read before it is written */
    memset(p + r * M, 0, sizeof(float) * ((((r + 3) & ~(int64_t)3) - r) * M));
}

/* den [r] = p_i z for the first r rows of p [.][M]. */
static inline __attribute__((always_inline)) void row_dots(const float *p, int64_t r, const int64_t M,
                                                          const float *z, float *den) {
    for (int64_t i = 0; i < r; i++) {
        vf s = vsplat(0.0f);
        for (int64_t c = 0; c < M; c += VW) s += vload(p + i * M + c) * vload(z + c);
        den[i] = hsum(s);
    }
}

/* Query blocks lo .. hi - 1 (item = bh * nqb + block): out rows = p A / (p z). */
static inline __attribute__((always_inline)) void query_out_range(
    const float *q, const float *A, const float *z, int64_t Nq, const int64_t D, const int64_t Dv,
    const float *WrT, const int64_t M, float *out, int64_t lo, int64_t hi, float *p, float *xbuf,
    float *obuf) {
    const int64_t nqb = (Nq + RB - 1) / RB;
    float den[RB];
    for (int64_t it = lo; it < hi; it++) {
        const int64_t bh = it / nqb, a = (it % nqb) * RB;
        const int64_t r = Nq - a < RB ? Nq - a : RB;
        float *ob = out + bh * Nq * Dv;
        query_features(q + bh * Nq * D, a, r, D, WrT, M, p, xbuf);
        float *o = out_rows(ob, a, r, Dv, obuf);
        rows_times(p, (r + 3) & ~(int64_t)3, M, M, (float *)(A + bh * M * Dv), Dv, o, Dv);
        row_dots(p, r, M, z + bh * M, den);
        for (int64_t i = 0; i < r; i++) {
            float *oi = o + i * Dv;
            const float inv = den[i] == 0.0f ? 0.0f : 1.0f / den[i];
            if (den[i] == 0.0f || isfinite(inv)) {
                const vf iv = vsplat(inv);
                for (int64_t x = 0; x < Dv; x += VW) vstore(oi + x, vload(oi + x) * iv);
            } else { /* a reciprocal that overflows: divided */
                const vf dv = vsplat(den[i]);
                for (int64_t x = 0; x < Dv; x += VW) vstore(oi + x, vload(oi + x) / dv);
            }
        }
        put_rows(ob, a, r, Dv, obuf);
    }
}

/* WrT [D][M] = Wr^T. */
static float *transposed(const float *Wr, int64_t M, int64_t D) {
    float *t = aligned_alloc(64, sizeof(float) * D * M);
    for (int64_t m = 0; m < M; m++)
        for (int64_t d = 0; d < D; d++) t[d * M + m] = Wr[m * D + d];
    return t;
}

/* The keys' sums of every (batch, head): c [BH] (0 where no key is valid), z [BH][M] and
 * A [BH][M][Dv] against it, from the parts' online sums brought to the common maximum. */
static void forward_keys(const float *k, const float *v, const uint8_t *kvalid, const float *WrT,
                         int64_t BH, int64_t H, int64_t Nk, int64_t D, int64_t Dv, int64_t M,
                         float h, int nthreads, float *c, float *z, float *A) {
    const int64_t parts = parts_of(BH, Nk, nthreads), items = BH * parts;
    float *mp = aligned_alloc(64, sizeof(float) * items);
    float *zp = aligned_alloc(64, sizeof(float) * items * M);
    float *Ap = aligned_alloc(64, sizeof(float) * items * M * Dv);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *U = aligned_alloc(64, sizeof(float) * RB * M);
        float *xbuf = aligned_alloc(64, sizeof(float) * RB * D);
        for (int64_t it = lo; it < hi; it++) {
            if (D == 64 && Dv == 64 && M == 256)
                key_sums_part(k, v, kvalid, H, Nk, 64, 64, WrT, 256, h, parts, it, U, xbuf, mp + it,
                              zp + it * M, Ap + it * M * Dv);
            else
                key_sums_part(k, v, kvalid, H, Nk, D, Dv, WrT, M, h, parts, it, U, xbuf, mp + it,
                              zp + it * M, Ap + it * M * Dv);
        }
        free(U);
        free(xbuf);
    }
    for (int64_t bh = 0; bh < BH; bh++) {
        float mx = -INFINITY;
        for (int64_t p = 0; p < parts; p++) mx = fmaxf(mx, mp[bh * parts + p]);
        float *zb = z + bh * M, *Ab = A + bh * M * Dv;
        memset(zb, 0, sizeof(float) * M);
        memset(Ab, 0, sizeof(float) * M * Dv);
        for (int64_t p = 0; p < parts; p++) {
            const int64_t it = bh * parts + p;
            if (mp[it] == -INFINITY) continue; /* no valid key in the part */
            const float s = expf(mp[it] - mx);
            for (int64_t i = 0; i < M; i++) zb[i] += s * zp[it * M + i];
            for (int64_t i = 0; i < M * Dv; i++) Ab[i] += s * Ap[it * M * Dv + i];
        }
        c[bh] = mx == -INFINITY ? 0.0f : mx;
    }
    free(mp);
    free(zp);
    free(Ap);
}

/* q [BH, Nq, D], k [BH, Nk, D], v [BH, Nk, Dv] float32 contiguous; kvalid [BH / H, Nk]
 * bytes (1 = a real key) or NULL; Wr [M][D] the projection times r; h = r^2 / 2.  Writes
 * out [BH, Nq, Dv] and what the backward takes: A [BH, M, Dv], z [BH, M], c [BH].  D, Dv
 * and M multiples of VW; Nq, Nk >= 1. */
void effattn_performer_f32(const float *q, const float *k, const float *v, const uint8_t *kvalid,
                           const float *Wr, int64_t BH, int64_t H, int64_t Nq, int64_t Nk,
                           int64_t D, int64_t Dv, int64_t M, float h, float *out, float *A,
                           float *z, float *c, int nthreads) {
    float *WrT = transposed(Wr, M, D);
    forward_keys(k, v, kvalid, WrT, BH, H, Nk, D, Dv, M, h, nthreads, c, z, A);
    const int64_t items = BH * ((Nq + RB - 1) / RB);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *p = aligned_alloc(64, sizeof(float) * RB * M);
        float *xbuf = aligned_alloc(64, sizeof(float) * RB * D);
        float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        if (D == 64 && Dv == 64 && M == 256)
            query_out_range(q, A, z, Nq, 64, 64, WrT, 256, out, lo, hi, p, xbuf, obuf);
        else
            query_out_range(q, A, z, Nq, D, Dv, WrT, M, out, lo, hi, p, xbuf, obuf);
        free(p);
        free(xbuf);
        free(obuf);
    }
    free(WrT);
}

/* ----------------------------------------------------------------------------- backward */

/* Part `item` of the query pass: dA [M][Dv] and dz [M] of its rows (written) and their dq
 * rows (where dq is not NULL).  At = A^T [Dv][M]. */
static inline __attribute__((always_inline)) void query_grads_part(
    const float *q, const float *dout, const float *out, const float *A, const float *At,
    const float *z, int64_t Nq, const int64_t D, const int64_t Dv, const float *WrT,
    const float *Wr, const int64_t M, int64_t parts, int64_t item, float *dq, float *dA, float *dz,
    float *p, float *dp, float *xbuf, float *gbuf, float *obuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nq, item % parts, parts, &lo, &hi);
    const float *qb = q + bh * Nq * D, *gb = dout + bh * Nq * Dv, *ob = out + bh * Nq * Dv;
    float den[RB], gd[RB];
    memset(dA, 0, sizeof(float) * M * Dv);
    memset(dz, 0, sizeof(float) * M);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        query_features(qb, a, r, D, WrT, M, p, xbuf);
        row_dots(p, r, M, z, den);
        for (int64_t i = 0; i < r4; i++) { /* gn = g / den (rows past r zero), gd */
            float *gn = gbuf + i * Dv;
            if (i >= r) {
                memset(gn, 0, sizeof(float) * Dv);
                gd[i] = 0.0f;
                continue;
            }
            const float *g = gb + (a + i) * Dv, *o = ob + (a + i) * Dv;
            const float inv = den[i] == 0.0f ? 0.0f : 1.0f / den[i];
            const vf iv = vsplat(inv);
            vf s = vsplat(0.0f);
            for (int64_t x = 0; x < Dv; x += VW) {
                const vf gx = vload(g + x);
                s += gx * vload(o + x);
                vstore(gn + x, gx * iv);
            }
            gd[i] = -hsum(s) * inv;
        }
        add_transposed_times(p, r, M, gbuf, Dv, dA);
        for (int64_t c = 0; c < M; c += VW) {
            vf s = vload(dz + c);
            for (int64_t i = 0; i < r; i++) s += vbcast(gd + i) * vload(p + i * M + c);
            vstore(dz + c, s);
        }
        if (dq == NULL) continue;
        rows_times(gbuf, r4, Dv, Dv, (float *)At, M, dp, M); /* rows past r: zero */
        for (int64_t i = 0; i < r; i++) {
            const vf gi = vbcast(gd + i);
            for (int64_t c = 0; c < M; c += VW)
                vstore(dp + i * M + c, vload(dp + i * M + c) + gi * vload(z + c));
        }
        row_softmax_grad(p, dp, r, M, 1.0f, dp, M);
        float *dqb = dq + bh * Nq * D, *o = out_rows(dqb, a, r, D, obuf);
        rows_times(dp, r4, M, M, (float *)Wr, D, o, D);
        put_rows(dqb, a, r, D, obuf);
    }
}

/* Part `item` of the key pass: dv = psi dA and dk = du Wr - 2 h k rowsum(du), du = psi (v dA^T
 * + dz), of its rows (each where not NULL). */
static inline __attribute__((always_inline)) void key_grads_part(
    const float *k, const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const int64_t D,
    const int64_t Dv, const float *WrT, const float *Wr, const int64_t M, float h, float c,
    const float *dA, const float *dAt, const float *dz, int64_t parts, int64_t item, float *dk,
    float *dv, float *psi, float *du, float *xbuf, float *vbuf, float *obuf, float *kobuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * Nk * D, *vb = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        const float *X = logits(kb, a, r, D, WrT, M, h, psi, xbuf);
        key_features(psi, r, M, c, kv ? kv + a : NULL);
        float *dvb = dv ? dv + bh * Nk * Dv : NULL, *o = dv ? out_rows(dvb, a, r, Dv, obuf) : NULL;
        if (dk == NULL) {
            rows_times(psi, r4, M, M, (float *)dA, Dv, o, Dv);
        } else {
            column_grads(psi, r4, M, rows4(vb, a, r, Dv, vbuf), Dv, dA, dAt, dz, o, Dv, du);
            float *dkb = dk + bh * Nk * D, *ko = out_rows(dkb, a, r, D, kobuf);
            rows_times(du, r4, M, M, (float *)Wr, D, ko, D);
            for (int64_t j = 0; j < r; j++) {
                vf s = vsplat(0.0f);
                for (int64_t c0 = 0; c0 < M; c0 += VW) s += vload(du + j * M + c0);
                const vf f = vsplat(-2.0f * h * hsum(s));
                for (int64_t d = 0; d < D; d += VW)
                    vstore(ko + j * D + d, vload(ko + j * D + d) + f * vload(X + j * D + d));
            }
            put_rows(dkb, a, r, D, kobuf);
        }
        if (dv != NULL) put_rows(dvb, a, r, Dv, obuf);
    }
}

/* The gradients of effattn_performer_f32: its out, A, z, c and dout [BH, Nq, Dv] in; dq
 * [BH, Nq, D], dk [BH, Nk, D], dv [BH, Nk, Dv] written (each may be NULL: not wanted). */
void effattn_performer_backward_f32(const float *q, const float *k, const float *v,
                                    const uint8_t *kvalid, const float *Wr, int64_t BH, int64_t H,
                                    int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, int64_t M,
                                    float h, const float *out, const float *A, const float *z,
                                    const float *c, const float *dout, float *dq, float *dk,
                                    float *dv, int nthreads) {
    float *WrT = transposed(Wr, M, D);
    const int64_t qparts = parts_of(BH, Nq, nthreads), qitems = BH * qparts;
    float *dAp = aligned_alloc(64, sizeof(float) * qitems * M * Dv);
    float *dzp = aligned_alloc(64, sizeof(float) * qitems * M);
    float *At = aligned_alloc(64, sizeof(float) * BH * Dv * M);
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t x = 0; x < Dv; x++) At[(bh * Dv + x) * M + m] = A[(bh * M + m) * Dv + x];
#pragma omp parallel num_threads(nthreads) if (qitems > 1)
    {
        int64_t lo, hi;
        thread_share(qitems, &lo, &hi);
        float *p = aligned_alloc(64, sizeof(float) * RB * M), *dp = aligned_alloc(64, sizeof(float) * RB * M);
        float *xbuf = aligned_alloc(64, sizeof(float) * RB * D);
        float *gbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        float *obuf = aligned_alloc(64, sizeof(float) * RB * D);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / qparts;
            const float *Ab = A + bh * M * Dv, *Atb = At + bh * Dv * M, *zb = z + bh * M;
            if (D == 64 && Dv == 64 && M == 256)
                query_grads_part(q, dout, out, Ab, Atb, zb, Nq, 64, 64, WrT, Wr, 256, qparts, it, dq,
                                 dAp + it * M * Dv, dzp + it * M, p, dp, xbuf, gbuf, obuf);
            else
                query_grads_part(q, dout, out, Ab, Atb, zb, Nq, D, Dv, WrT, Wr, M, qparts, it, dq,
                                 dAp + it * M * Dv, dzp + it * M, p, dp, xbuf, gbuf, obuf);
        }
        free(p);
        free(dp);
        free(xbuf);
        free(gbuf);
        free(obuf);
    }
    free(At);
    if (dk != NULL || dv != NULL) {
        /* the parts' dA, dz summed into their first part's; dAt = dA^T */
        float *dAt = aligned_alloc(64, sizeof(float) * BH * Dv * M);
        for (int64_t bh = 0; bh < BH; bh++) {
            float *dAb = dAp + bh * qparts * M * Dv, *dzb = dzp + bh * qparts * M;
            for (int64_t p = 1; p < qparts; p++) {
                const float *x = dAp + (bh * qparts + p) * M * Dv, *y = dzp + (bh * qparts + p) * M;
                for (int64_t i = 0; i < M * Dv; i++) dAb[i] += x[i];
                for (int64_t i = 0; i < M; i++) dzb[i] += y[i];
            }
            for (int64_t m = 0; m < M; m++)
                for (int64_t x = 0; x < Dv; x++) dAt[(bh * Dv + x) * M + m] = dAb[m * Dv + x];
        }
        const int64_t kparts = parts_of(BH, Nk, nthreads), kitems = BH * kparts;
#pragma omp parallel num_threads(nthreads) if (kitems > 1)
        {
            int64_t lo, hi;
            thread_share(kitems, &lo, &hi);
            float *psi = aligned_alloc(64, sizeof(float) * RB * M), *du = aligned_alloc(64, sizeof(float) * RB * M);
            float *xbuf = aligned_alloc(64, sizeof(float) * RB * D);
            float *vbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
            float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
            float *kobuf = aligned_alloc(64, sizeof(float) * RB * D);
            for (int64_t it = lo; it < hi; it++) {
                const int64_t bh = it / kparts;
                const float *dAb = dAp + bh * qparts * M * Dv, *dAtb = dAt + bh * Dv * M;
                const float *dzb = dzp + bh * qparts * M;
                if (D == 64 && Dv == 64 && M == 256)
                    key_grads_part(k, v, kvalid, H, Nk, 64, 64, WrT, Wr, 256, h, c[bh], dAb, dAtb, dzb,
                                   kparts, it, dk, dv, psi, du, xbuf, vbuf, obuf, kobuf);
                else
                    key_grads_part(k, v, kvalid, H, Nk, D, Dv, WrT, Wr, M, h, c[bh], dAb, dAtb, dzb,
                                   kparts, it, dk, dv, psi, du, xbuf, vbuf, obuf, kobuf);
            }
            free(psi);
            free(du);
            free(xbuf);
            free(vbuf);
            free(obuf);
            free(kobuf);
        }
        free(dAt);
    }
    free(dAp);
    free(dzp);
    free(WrT);
}
