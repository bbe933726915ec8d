/* effattn native kernel: non-causal feature-map (kernel) attention, out_i = phi(q_i) A /
 * phi(q_i) z with A = sum_j psi(k_j)^T v_j [M][Dv] and z = sum_j psi(k_j) [M] over the valid
 * keys, forward and backward for float32 on the CPU (C99 + GCC vector extensions,
 * optionally OpenMP), loaded with ctypes by effattn/native/__init__.py;
 * effattn.mechanisms.kernel.streamed_feature_attention with the kinds' StreamMaps
 * (PerformerSoftmaxMap, LinearMap, TaylorMap) is the torch twin.  The feature kinds are
 * feature_maps.h's; FA_FAVOR's key features here are psi_j = exp(u(k_j) - c), c the largest
 * logit of a valid key (any feature).  (The twin's query features are exp(u(q_i) - max
 * u(q_i)); they differ from softmax(u(q_i)) by a factor per row, which cancels.)
 *
 * The twin makes the features in a chain of torch passes over N-sized chunks (product,
 * norm, shift, exp, sums, product, ...); here every block of RB rows is read once per pass
 * and its features and products stay in a thread's cache.
 *
 * Backward (the features recomputed, nothing N-sized kept but the output):
 *   queries: gn_i = g_i / den_i, gd_i = -<g_i, out_i> / den_i (den_i = phi_i z);
 *            dA = sum_i phi_i^T gn_i, dz = sum_i gd_i phi_i, dphi_i = gn_i A^T + gd_i z,
 *            then dq_i through the query features;
 *   keys:    dv_j = psi_j dA, dpsi_j = v_j dA^T + dz (0 for an invalid key), then dk_j through
 *            the key features.
 * Through the features: FA_FAVOR queries du_i = phi_i (dphi_i - <dphi_i, phi_i>) (the
 * softmax's backward; <dphi_i, phi_i> is 0 but for rounding, since out_i does not change
 * when phi_i is scaled, and so is the gradient of the left-out norm term), dq_i = du_i Wr;
 * keys du_j = psi_j dpsi_j, dk_j = du_j Wr - r^2 k_j sum du_j.  FA_ELU: dx = dfeat min(feat,
 * 1).  FA_TAYLOR: F.normalize's, dx = (g - x̂ <x̂, g>) / max(|x|, eps) (g the gradient of
 * the x̂ columns; <x̂, g> taken as 0 where |x| <= eps).
 *
 * Threads: as efficient.c, each (batch, head)'s rows split into parts; the key sums (with
 * their own maxima) and the query pass's dA, dz are taken per part and merged after. */
#include "feature_maps.h"

/* ------------------------------------------------------------------------------ forward */

/* Part `item` (bh * parts + part) of the key pass: key_sums_rows over its rows. */
static inline __attribute__((always_inline)) void key_sums_part(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *k,
    const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const float *WrT, float h,
    int64_t parts, int64_t item, float *U, float *xbuf, float *m, float *z, float *A) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    key_sums_rows(kind, D, Dv, M, k + bh * Nk * D, v + bh * Nk * Dv, kvalid ? kvalid + (bh / H) * Nk : NULL,
                  lo, hi, WrT, h, U, xbuf, m, z, A);
}

/* Query blocks lo .. hi - 1 (item = bh * nqb + block): out rows = phi A / (phi z). */
static inline __attribute__((always_inline)) void query_out_range(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *q,
    const float *A, const float *z, int64_t Nq, const float *WrT, float *out, int64_t lo,
    int64_t hi, float *p, float *xbuf, float *obuf) {
    const int64_t nqb = (Nq + RB - 1) / RB;
    float den[RB];
    for (int64_t it = lo; it < hi; it++) {
        const int64_t bh = it / nqb, a = (it % nqb) * RB;
        const int64_t r = Nq - a < RB ? Nq - a : RB;
        float *ob = out + bh * Nq * Dv;
        query_features(kind, q + bh * Nq * D, a, r, D, WrT, M, p, xbuf);
        float *o = out_rows(ob, a, r, Dv, obuf);
        rows_times(p, (r + 3) & ~(int64_t)3, M, M, (float *)(A + bh * M * Dv), Dv, o, Dv);
        row_dots(p, r, M, z + bh * M, den);
        divide_rows(o, r, Dv, den);
        put_rows(ob, a, r, Dv, obuf);
    }
}

/* The keys' sums of every (batch, head): c [BH] (0 where no key is valid, and for the
 * kinds without a shift), z [BH][M] and A [BH][M][Dv] against it, from the parts' sums
 * brought to the common shift. */
static void forward_keys(int kind, const float *k, const float *v, const uint8_t *kvalid,
                         const float *WrT, int64_t BH, int64_t H, int64_t Nk, int64_t D, int64_t Dv,
                         int64_t M, float h, int nthreads, float *c, float *z, float *A) {
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
        for (int64_t it = lo; it < hi; it++)
            BY_KIND(key_sums_part, k, v, kvalid, H, Nk, WrT, h, parts, it, U, xbuf, mp + it,
                    zp + it * M, Ap + it * M * Dv);
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
 * bytes (1 = a real key) or NULL; kind FA_*; Wr [M][D] the projection times r and h = r^2 / 2
 * (FA_FAVOR; else Wr NULL, M = D for FA_ELU, D + VW for FA_TAYLOR).  Writes out [BH, Nq,
 * Dv] and what the backward takes: A [BH, M, Dv], z [BH, M], c [BH].  D, Dv and M multiples
 * of VW; Nq, Nk >= 1. */
void effattn_feature_attention_f32(const float *q, const float *k, const float *v,
                                   const uint8_t *kvalid, const float *Wr, int kind, int64_t BH,
                                   int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv,
                                   int64_t M, float h, float *out, float *A, float *z, float *c,
                                   int nthreads) {
    float *WrT = transposed(Wr, M, D);
    forward_keys(kind, k, v, kvalid, WrT, BH, H, Nk, D, Dv, M, h, nthreads, c, z, A);
    const int64_t items = BH * ((Nq + RB - 1) / RB);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *p = aligned_alloc(64, sizeof(float) * RB * M);
        float *xbuf = aligned_alloc(64, sizeof(float) * RB * D);
        float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        BY_KIND(query_out_range, q, A, z, Nq, WrT, out, lo, hi, p, xbuf, obuf);
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
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *q,
    const float *dout, const float *out, const float *A, const float *At, const float *z,
    int64_t Nq, const float *WrT, const float *Wr, int64_t parts, int64_t item, float *dq,
    float *dA, float *dz, float *p, float *dp, float *xbuf, float *gbuf, float *obuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nq, item % parts, parts, &lo, &hi);
    const float *qb = q + bh * Nq * D, *gb = dout + bh * Nq * Dv, *ob = out + bh * Nq * Dv;
    float den[RB], gd[RB];
    memset(dA, 0, sizeof(float) * M * Dv);
    memset(dz, 0, sizeof(float) * M);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        const float *X = query_features(kind, qb, a, r, D, WrT, M, p, xbuf);
        row_dots(p, r, M, z, den);
        normalizer_grads(gb + a * Dv, ob + a * Dv, den, r, r4, Dv, gbuf, gd);
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
        float *dqb = dq + bh * Nq * D;
        if (kind == FA_FAVOR) {
            row_softmax_grad(p, dp, r, M, 1.0f, dp, M);
            float *o = out_rows(dqb, a, r, D, obuf);
            rows_times(dp, r4, M, M, (float *)Wr, D, o, D);
            put_rows(dqb, a, r, D, obuf);
        } else {
            map_backward(kind, X, p, dp, r, D, M, dqb + a * D, D);
        }
    }
}

/* Part `item` of the key pass: dv = psi dA and dk through the key features of dpsi = v dA^T
 * + dz (0 for invalid keys), of its rows (each where not NULL). */
static inline __attribute__((always_inline)) void key_grads_part(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *k,
    const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const float *WrT,
    const float *Wr, float h, float c, const float *dA, const float *dAt, const float *dz,
    int64_t parts, int64_t item, float *dk, float *dv, float *psi, float *du, float *xbuf,
    float *vbuf, float *obuf, float *kobuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * Nk * D, *vb = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        const uint8_t *valid = kv ? kv + a : NULL;
        const float *X = key_features(kind, kb, a, r, D, WrT, M, h, c, valid, psi, xbuf);
        if (dv != NULL) {
            float *dvb = dv + bh * Nk * Dv, *o = out_rows(dvb, a, r, Dv, obuf);
            rows_times(psi, r4, M, M, (float *)dA, Dv, o, Dv);
            put_rows(dvb, a, r, Dv, obuf);
        }
        if (dk == NULL) continue;
        rows_times(rows4(vb, a, r, Dv, vbuf), r4, Dv, Dv, (float *)dAt, M, du, M);
        for (int64_t j = 0; j < r4; j++)
            for (int64_t c0 = 0; c0 < M; c0 += VW) vstore(du + j * M + c0, vload(du + j * M + c0) + vload(dz + c0));
        zero_invalid(du, r, M, valid);
        float *dkb = dk + bh * Nk * D;
        if (kind != FA_FAVOR) {
            map_backward(kind, X, psi, du, r, D, M, dkb + a * D, D);
            continue;
        }
        /* du = psi dpsi; dk = du Wr - 2 h k rowsum(du) */
        for (int64_t j = 0; j < r4; j++)
            for (int64_t c0 = 0; c0 < M; c0 += VW) vstore(du + j * M + c0, vload(du + j * M + c0) * vload(psi + j * M + c0));
        float *ko = out_rows(dkb, a, r, D, kobuf);
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
}

/* The gradients of effattn_feature_attention_f32: its out, A, z, c and dout [BH, Nq, Dv]
 * in; dq [BH, Nq, D], dk [BH, Nk, D], dv [BH, Nk, Dv] written (each may be NULL: not
 * wanted). */
void effattn_feature_attention_backward_f32(
    const float *q, const float *k, const float *v, const uint8_t *kvalid, const float *Wr,
    int kind, int64_t BH, int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, int64_t M,
    float h, const float *out, const float *A, const float *z, const float *c, const float *dout,
    float *dq, float *dk, float *dv, int nthreads) {
    float *WrT = transposed(Wr, M, D);
    const int64_t qparts = parts_of(BH, Nq, nthreads), qitems = BH * qparts;
    float *dAp = aligned_alloc(64, sizeof(float) * qitems * M * Dv);
    float *dzp = aligned_alloc(64, sizeof(float) * qitems * M);
    float *At = aligned_alloc(64, sizeof(float) * BH * Dv * M);
    transpose_each(A, BH, M, Dv, At);
#pragma omp parallel num_threads(nthreads) if (qitems > 1)
    {
        int64_t lo, hi;
        thread_share(qitems, &lo, &hi);
        float *b[5]; /* features, their gradient, query rows, dout rows over den, dq rows */
        alloc_blocks(5, (const int64_t[]){M, M, D, Dv, D}, b);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / qparts;
            BY_KIND(query_grads_part, q, dout, out, A + bh * M * Dv, At + bh * Dv * M, z + bh * M, Nq,
                    WrT, Wr, qparts, it, dq, dAp + it * M * Dv, dzp + it * M, b[0], b[1], b[2], b[3], b[4]);
        }
        free_blocks(5, b);
    }
    free(At);
    if (dk != NULL || dv != NULL) {
        /* the parts' dA, dz summed into their first part's; dAt = dA^T */
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t p = 1; p < qparts; p++) {
                float *dAb = dAp + bh * qparts * M * Dv, *dzb = dzp + bh * qparts * M;
                const float *x = dAp + (bh * qparts + p) * M * Dv, *y = dzp + (bh * qparts + p) * M;
                for (int64_t i = 0; i < M * Dv; i++) dAb[i] += x[i];
                for (int64_t i = 0; i < M; i++) dzb[i] += y[i];
            }
        float *dAt = aligned_alloc(64, sizeof(float) * BH * Dv * M);
        for (int64_t bh = 0; bh < BH; bh++) transpose_each(dAp + bh * qparts * M * Dv, 1, M, Dv, dAt + bh * Dv * M);
        const int64_t kparts = parts_of(BH, Nk, nthreads), kitems = BH * kparts;
#pragma omp parallel num_threads(nthreads) if (kitems > 1)
        {
            int64_t lo, hi;
            thread_share(kitems, &lo, &hi);
            float *b[6]; /* features, their gradient, key rows, value rows, dv rows, dk rows */
            alloc_blocks(6, (const int64_t[]){M, M, D, Dv, Dv, D}, b);
            for (int64_t it = lo; it < hi; it++) {
                const int64_t bh = it / kparts;
                BY_KIND(key_grads_part, k, v, kvalid, H, Nk, WrT, Wr, h, c[bh], dAp + bh * qparts * M * Dv,
                        dAt + bh * Dv * M, dzp + bh * qparts * M, kparts, it, dk, dv, b[0], b[1], b[2], b[3],
                        b[4], b[5]);
            }
            free_blocks(6, b);
        }
        free(dAt);
    }
    free(dAp);
    free(dzp);
    free(WrT);
}
