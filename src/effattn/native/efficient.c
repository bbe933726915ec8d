/* effattn native kernel: Shen et al.'s efficient attention, rho_q(Q) (rho_k(K)^T V), forward
 * and backward for float32 on the CPU (C99 + GCC vector extensions, optionally OpenMP),
 * loaded with ctypes by effattn/native/__init__.py;
 * effattn.mechanisms.kernel._efficient_stream and _EfficientAttention.backward are the
 * torch twins.
 *
 * Per (batch, head), with t the temperature and log2 e folded into tl = t log2 e:
 *   keys:    c = t max_j k_j (per feature, over valid keys), e_j = 2^(tl k_j - c log2 e)
 *            (0 for an invalid key), z = sum_j e_j, A = sum_j e_j^T v_j, C = A / z
 *            (a feature row with z = 0 stays 0);
 *   queries: p_i = softmax(t q_i) over the features, out_i = p_i C.
 * The torch twin runs each of these as a chain of passes over N-sized chunks (scale, mask,
 * shift, exp, sum, matmul, ...); here every block of RB rows is read once per pass of the
 * algorithm (keys: their maximum, then their weights and products; queries: their
 * softmax and product) and stays in a thread's cache in between.
 *
 * Backward (the weights recomputed, nothing N-sized kept):
 *   queries: dC = sum_i p_i^T g_i, dp_i = g_i C^T, dq_i = t p_i (dp_i - <dp_i, p_i>);
 *   dA = dC / z, dz = -rowsum(dC C) / z (per feature row; 0 where z = 0);
 *   keys:    dv_j = e_j dA, dk_j = t e_j (v_j dA^T + dz).
 *
 * Threads: the (batch, head)s' rows are split into parts, enough for every thread to have
 * work (a single head at N = 1M included); the sums over key rows (maxima, z, A) and over
 * query rows (dC) are taken per part and added after. */
#include "rowblocks.h"

/* ------------------------------------------------------------------------------ forward */

/* Part `item` (bh * parts + part) of the key pass, one read of its rows: the column maxima
 * m [D] of its valid keys (-inf where none), and the weights' sums z [D] and products A
 * [D][Dv] against its own maxima (e_j = 2^(tl (k_j - m))), kept as an online softmax: a
 * feature whose maximum grows has its sums so far rescaled. */
static inline __attribute__((always_inline)) void key_sums_part(
    const float *k, const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const int64_t D,
    const int64_t Dv, float tl, int64_t parts, int64_t item, float *e, float *m, float *z,
    float *A) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * Nk * D, *vb = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    for (int64_t d = 0; d < D; d++) m[d] = -INFINITY;
    memset(z, 0, sizeof(float) * D);
    memset(A, 0, sizeof(float) * D * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB;
        column_block_sums(kb + a * D, r, D, tl, kv ? kv + a : NULL, m, z, A, vb + a * Dv, Dv, e,
                          e + RB * D);
    }
}

/* Query blocks lo .. hi - 1 (item = bh * nqb + block): out rows = softmax(t q) C. */
static inline __attribute__((always_inline)) void query_out_range(
    const float *q, const float *C, int64_t Nq, const int64_t D, const int64_t Dv, float tl,
    float *out, int64_t lo, int64_t hi, float *p, float *obuf) {
    const int64_t nqb = (Nq + RB - 1) / RB;
    for (int64_t it = lo; it < hi; it++) {
        const int64_t bh = it / nqb, a = (it % nqb) * RB;
        const int64_t r = Nq - a < RB ? Nq - a : RB, r4 = (r + 3) & ~(int64_t)3;
        row_softmax(q + (bh * Nq + a) * D, r, D, tl, NULL, p);
        memset(p + r * D, 0, sizeof(float) * (r4 - r) * D);
        rows_times_at(p, r, D, D, C + bh * D * Dv, Dv, out + bh * Nq * Dv, a, obuf);
    }
}

/* The keys' statistics of every (batch, head): c = t max (0 where no key is valid), z and
 * C = A / z, from the parts' online sums brought to the common maxima. */
static void forward_keys(const float *k, const float *v, const uint8_t *kvalid, int64_t BH,
                         int64_t H, int64_t Nk, int64_t D, int64_t Dv, float t, int nthreads,
                         float *c, float *z, float *C) {
    const int64_t parts = parts_of(BH, Nk, nthreads), items = BH * parts;
    float *mp = aligned_alloc(64, sizeof(float) * items * D);
    float *zp = aligned_alloc(64, sizeof(float) * items * D);
    float *Ap = aligned_alloc(64, sizeof(float) * items * D * Dv);
    const float tl = t * LOG2E;
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *e = aligned_alloc(64, sizeof(float) * (RB + 1) * D);
        for (int64_t it = lo; it < hi; it++) {
            if (D == 64 && Dv == 64)
                key_sums_part(k, v, kvalid, H, Nk, 64, 64, tl, parts, it, e, mp + it * D, zp + it * D,
                              Ap + it * D * Dv);
            else
                key_sums_part(k, v, kvalid, H, Nk, D, Dv, tl, parts, it, e, mp + it * D, zp + it * D,
                              Ap + it * D * Dv);
        }
        free(e);
    }
    for (int64_t bh = 0; bh < BH; bh++) {
        float *cb = c + bh * D;
        merge_column_parts(mp + bh * parts * D, zp + bh * parts * D, Ap + bh * parts * D * Dv, parts,
                           D, Dv, tl, cb, z + bh * D, C + bh * D * Dv);
        for (int64_t d = 0; d < D; d++) cb[d] = cb[d] == -INFINITY ? 0.0f : t * cb[d]; /* no valid key: any shift */
    }
    free(mp);
    free(zp);
    free(Ap);
}

/* q [BH, Nq, D], k [BH, Nk, D], v [BH, Nk, Dv] float32 contiguous; kvalid [BH / H, Nk]
 * bytes (1 = a real key) or NULL; t > 0 the temperature.  Writes out [BH, Nq, Dv] and the
 * saved statistics c, z [BH, D] and C [BH, D, Dv].  D and Dv multiples of VW, Nq, Nk >= 1. */
void effattn_efficient_f32(const float *q, const float *k, const float *v, const uint8_t *kvalid,
                           int64_t BH, int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv,
                           float t, float *out, float *c, float *z, float *C, int nthreads) {
    forward_keys(k, v, kvalid, BH, H, Nk, D, Dv, t, nthreads, c, z, C);
    const int64_t items = BH * ((Nq + RB - 1) / RB);
    const float tl = t * LOG2E;
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        float *p = aligned_alloc(64, sizeof(float) * RB * D);
        float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        if (D == 64 && Dv == 64)
            query_out_range(q, C, Nq, 64, 64, tl, out, lo, hi, p, obuf);
        else
            query_out_range(q, C, Nq, D, Dv, tl, out, lo, hi, p, obuf);
        free(p);
        free(obuf);
    }
}

/* ----------------------------------------------------------------------------- backward */

/* Part `item` of the query pass: dC [D][Dv] of its rows (written) and their dq rows. */
static inline __attribute__((always_inline)) void query_grads_part(
    const float *q, const float *dout, const float *Ct, int64_t Nq, const int64_t D,
    const int64_t Dv, float t, int64_t parts, int64_t item, float *dq, float *dC, float *p,
    float *dp, float *gbuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nq, item % parts, parts, &lo, &hi);
    const float *qb = q + bh * Nq * D, *gb = dout + bh * Nq * Dv;
    const float tl = t * LOG2E;
    memset(dC, 0, sizeof(float) * D * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        row_softmax(qb + a * D, r, D, tl, NULL, p);
        add_transposed_times(p, r, D, (float *)(gb + a * Dv), Dv, dC);
        if (dq == NULL) continue;
        rows_times(rows4(gb, a, r, Dv, gbuf), r4, Dv, Dv, (float *)Ct, D, dp, D);
        row_softmax_grad(p, dp, r, D, t, dq + (bh * Nq + a) * D, D);
    }
}

/* Part `item` of the key pass: dv = e dA and dk = t e (v dA^T + dz) of its rows. */
static inline __attribute__((always_inline)) void key_grads_part(
    const float *k, const float *v, const uint8_t *kvalid, int64_t H, int64_t Nk, const int64_t D,
    const int64_t Dv, float t, const float *cl, const float *dA, const float *dAt,
    const float *dz, int64_t parts, int64_t item, float *dk, float *dv, float *e, float *de,
    float *vbuf, float *obuf) {
    const int64_t bh = item / parts;
    int64_t lo, hi;
    part_rows(Nk, item % parts, parts, &lo, &hi);
    const float *kb = k + bh * Nk * D, *vb = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    const float tl = t * LOG2E;
    const vf tv = vsplat(t);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        column_weights(kb + a * D, r, D, tl, cl, kv ? kv + a : NULL, e);
        memset(e + r * D, 0, sizeof(float) * (r4 - r) * D);
        float *dvb = dv ? dv + bh * Nk * Dv : NULL, *o = dv ? out_rows(dvb, a, r, Dv, obuf) : NULL;
        if (dk == NULL) {
            rows_times(e, r4, D, D, (float *)dA, Dv, o, Dv);
        } else {
            column_grads(e, r4, D, rows4(vb, a, r, Dv, vbuf), Dv, dA, dAt, dz, o, Dv, de);
            float *dkb = dk + (bh * Nk + a) * D;
            for (int64_t j = 0; j < r; j++)
                for (int64_t d = 0; d < D; d += VW) vstore(dkb + j * D + d, tv * vload(de + j * D + d));
        }
        if (dv != NULL) put_rows(dvb, a, r, Dv, obuf);
    }
}

/* The gradients of effattn_efficient_f32: dout [BH, Nq, Dv] and the forward's c, z, C
 * in; dq [BH, Nq, D], dk [BH, Nk, D], dv [BH, Nk, Dv] written (each may be NULL: not
 * wanted). */
void effattn_efficient_backward_f32(const float *q, const float *k, const float *v,
                                    const uint8_t *kvalid, int64_t BH, int64_t H, int64_t Nq,
                                    int64_t Nk, int64_t D, int64_t Dv, float t, const float *c,
                                    const float *z, const float *C, const float *dout, float *dq,
                                    float *dk, float *dv, int nthreads) {
    const int64_t qparts = parts_of(BH, Nq, nthreads), qitems = BH * qparts;
    float *dCp = aligned_alloc(64, sizeof(float) * qitems * D * Dv);
    float *Ct = aligned_alloc(64, sizeof(float) * BH * Dv * D);
    transpose_each(C, BH, D, Dv, Ct);
#pragma omp parallel num_threads(nthreads) if (qitems > 1)
    {
        int64_t lo, hi;
        thread_share(qitems, &lo, &hi);
        float *p = aligned_alloc(64, sizeof(float) * RB * D), *dp = aligned_alloc(64, sizeof(float) * RB * D);
        float *gbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
        for (int64_t it = lo; it < hi; it++) {
            const float *Ctb = Ct + (it / qparts) * Dv * D;
            if (D == 64 && Dv == 64)
                query_grads_part(q, dout, Ctb, Nq, 64, 64, t, qparts, it, dq, dCp + it * D * Dv, p,
                                 dp, gbuf);
            else
                query_grads_part(q, dout, Ctb, Nq, D, Dv, t, qparts, it, dq, dCp + it * D * Dv, p,
                                 dp, gbuf);
        }
        free(p);
        free(dp);
        free(gbuf);
    }
    /* dA = dC / z, dz = -rowsum(dC C) / z per feature row (z = 0: no key, e = 0 there) */
    float *dA = aligned_alloc(64, sizeof(float) * BH * D * Dv);
    float *dAt = aligned_alloc(64, sizeof(float) * BH * Dv * D);
    float *dz = aligned_alloc(64, sizeof(float) * BH * D), *cl = aligned_alloc(64, sizeof(float) * BH * D);
    for (int64_t bh = 0; bh < BH; bh++) {
        float *dAb = dA + bh * D * Dv;
        memcpy(dAb, dCp + bh * qparts * D * Dv, sizeof(float) * D * Dv);
        for (int64_t p = 1; p < qparts; p++) {
            const float *x = dCp + (bh * qparts + p) * D * Dv;
            for (int64_t i = 0; i < D * Dv; i++) dAb[i] += x[i];
        }
        for (int64_t d = 0; d < D; d++) {
            const float zs = z[bh * D + d] == 0.0f ? 1.0f : z[bh * D + d];
            float s = 0.0f;
            for (int64_t x = 0; x < Dv; x++) {
                s += dAb[d * Dv + x] * C[(bh * D + d) * Dv + x];
                dAb[d * Dv + x] /= zs;
                dAt[(bh * Dv + x) * D + d] = dAb[d * Dv + x];
            }
            dz[bh * D + d] = -s / zs;
            cl[bh * D + d] = c[bh * D + d] * LOG2E;
        }
    }
    free(dCp);
    free(Ct);
    if (dk != NULL || dv != NULL) {
        const int64_t kparts = parts_of(BH, Nk, nthreads), kitems = BH * kparts;
#pragma omp parallel num_threads(nthreads) if (kitems > 1)
        {
            int64_t lo, hi;
            thread_share(kitems, &lo, &hi);
            float *e = aligned_alloc(64, sizeof(float) * RB * D), *de = aligned_alloc(64, sizeof(float) * RB * D);
            float *vbuf = aligned_alloc(64, sizeof(float) * RB * Dv);
            float *obuf = aligned_alloc(64, sizeof(float) * RB * Dv);
            for (int64_t it = lo; it < hi; it++) {
                const int64_t bh = it / kparts;
                const float *A = dA + bh * D * Dv, *At = dAt + bh * Dv * D;
                if (D == 64 && Dv == 64)
                    key_grads_part(k, v, kvalid, H, Nk, 64, 64, t, cl + bh * D, A, At, dz + bh * D,
                                   kparts, it, dk, dv, e, de, vbuf, obuf);
                else
                    key_grads_part(k, v, kvalid, H, Nk, D, Dv, t, cl + bh * D, A, At, dz + bh * D,
                                   kparts, it, dk, dv, e, de, vbuf, obuf);
            }
            free(e);
            free(de);
            free(vbuf);
            free(obuf);
        }
    }
    free(dA);
    free(dAt);
    free(dz);
    free(cl);
}
