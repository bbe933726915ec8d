/* effattn native kernel: LSH attention's sorted-chunk backward, fused (C99 + GCC vector
 * extensions, optionally OpenMP), loaded with ctypes by effattn/native/__init__.py.
 *
 * The gradients of lsh_chunks.c's merged (out, lse), as
 * effattn.mechanisms.lsh._group_backward computes them with torch operations: for every
 * sorted query chunk g of every round, against the C key rows of each of its window chunks
 * g - before .. g + after (cyclic over the T chunks of all rounds), the scores and masks are
 * recomputed, P = 2^(s - lse2) with the merged base-2 lse, dP = dO V^T,
 * dS = P (dP - delta) scale, and
 *     dQ = dS K  (added to the query tokens' rows),
 *     dK += dS^T Q, dV += P^T dO  (kept per key chunk in a thread's ring, added to the key
 *                                 tokens' rows when the chunk leaves the window).
 * Rows are read through the sorted positions (no gathered copies in memory).  One thread
 * owns a (batch*head)'s chunks, every round of them, so the rows it adds to are its own: no
 * atomics, no per-thread copies of the gradients. */
#include "vec.h"

/* One key chunk in a thread's ring: transposed keys Kt [D][C] (scores), key rows [C][D]
 * (dQ), transposed values Vt [Dv][C] (dP), the chunk's key and value gradients so far
 * dk [C][D], dv [C][Dv], positions and validity of its rows; `id` the (unwrapped) chunk
 * index it holds. */
typedef struct {
    int64_t id;
    float *kt, *kr, *vt, *dk, *dv;
    int32_t *pos;
    int32_t *valid; /* -1 valid, 0 not (a lane mask) */
} GradChunk;

/* dst[d] += src[d] for d < len (len a multiple of VW). */
static inline void add_row(float *dst, const float *src, int64_t len) {
    for (int64_t d = 0; d < len; d += VW) vstore(dst + d, vload(dst + d) + vload(src + d));
}

/* A ring entry's key and value gradients added to its tokens' rows of dk, dv (this bh's). */
static inline void flush_chunk(GradChunk *kc, int64_t C, int64_t D, int64_t Dv, float *dkb,
                               float *dvb) {
    if (kc->id == INT64_MIN) return;
    for (int64_t j = 0; j < C; j++) {
        add_row(dkb + (int64_t)kc->pos[j] * D, kc->dk + j * D, D);
        add_row(dvb + (int64_t)kc->pos[j] * Dv, kc->dv + j * Dv, Dv);
    }
    kc->id = INT64_MIN;
}

/* The chunks of (batch*head)s lo .. hi - 1 (see effattn_lsh_chunks_backward_f32); always
 * inlined, so that calls with constant C, D, Dv compile to fully unrolled loops. */
static inline __attribute__((always_inline)) void grad_range(
    const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
    const uint8_t *k_valid, const float *lse2, const float *delta, const float *dout, int64_t n,
    int64_t R, const int64_t C, int64_t before, int64_t after, const int64_t D, const int64_t Dv,
    float qscale, float scale, int exclude_self, float penalty, int causal, float *dq, float *dk,
    float *dv, int64_t lo, int64_t hi) {
    const int64_t L = R * n, T = L / C, S = before + 1 + after, W = S * C;
    const int masks = exclude_self || causal || k_valid != NULL;
    float *qs = aligned_alloc(64, sizeof(float) * C * D), *qr = aligned_alloc(64, sizeof(float) * C * D);
    float *dor = aligned_alloc(64, sizeof(float) * C * Dv);
    float *pw = aligned_alloc(64, sizeof(float) * C * W), *ds = aligned_alloc(64, sizeof(float) * C * W);
    float *dqt = aligned_alloc(64, sizeof(float) * 4 * D);
    float *l2 = aligned_alloc(64, sizeof(float) * C), *dl = aligned_alloc(64, sizeof(float) * C);
    int32_t *qp = aligned_alloc(64, sizeof(int32_t) * C);
    int32_t *wpos = aligned_alloc(64, sizeof(int32_t) * W), *wvalid = aligned_alloc(64, sizeof(int32_t) * W);
    GradChunk ring[S];
    float *krs[S];
    for (int64_t s = 0; s < S; s++) {
        ring[s].id = INT64_MIN;
        ring[s].kt = aligned_alloc(64, sizeof(float) * D * C);
        ring[s].kr = aligned_alloc(64, sizeof(float) * C * D);
        ring[s].vt = aligned_alloc(64, sizeof(float) * Dv * C);
        ring[s].dk = aligned_alloc(64, sizeof(float) * C * D);
        ring[s].dv = aligned_alloc(64, sizeof(float) * C * Dv);
        ring[s].pos = aligned_alloc(64, sizeof(int32_t) * C);
        ring[s].valid = aligned_alloc(64, sizeof(int32_t) * C);
    }
    const vf pen = vsplat(penalty), vscale = vsplat(scale), vqscale = vsplat(qscale);
    for (int64_t bh = lo; bh < hi; bh++) {
        const float *qb = q + bh * n * D, *kb = k + bh * n * D, *vb = v + bh * n * Dv;
        const float *dob = dout + bh * n * Dv, *lb = lse2 + bh * n, *deb = delta + bh * n;
        float *dqb = dq + bh * n * D, *dkb = dk + bh * n * D, *dvb = dv + bh * n * Dv;
        for (int64_t g = 0; g < T; g++) {
            /* the next chunk's rows (and the gradient rows of the chunk that leaves the
             * ring then) are fetched while this one computes, spread over the loops below
             * as in lsh_chunks.c */
            const int64_t *pq_next = NULL, *pk_next = NULL;
            const GradChunk *leaving = NULL;
            if (g + 1 < T) {
                const int64_t cn = (((g + 1 + after) % T) + T) % T;
                pq_next = q_pos + bh * L + (g + 1) * C;
                pk_next = k_pos + bh * L + cn * C;
                leaving = &ring[(((g + 1 + after) % S) + S) % S];
                if (leaving->id == INT64_MIN || leaving->id == g + 1 + after) leaving = NULL;
            }
            /* the query rows (as they are, and scaled into base-2 scores), their output
             * gradients and statistics */
            for (int64_t i = 0; i < C; i++) {
                int64_t p = q_pos[bh * L + g * C + i];
                qp[i] = (int32_t)p;
                l2[i] = lb[p];
                dl[i] = deb[p];
                for (int64_t d = 0; d < D; d += VW) {
                    vf x = vload(qb + p * D + d);
                    vstore(qr + i * D + d, x);
                    vstore(qs + i * D + d, x * vqscale);
                }
                copy_row(dor + i * Dv, dob + p * Dv, Dv);
            }
            /* the window's key chunks (loaded into the ring where missing, the one leaving
             * flushed first), scores and dP = dO V^T */
            for (int64_t s = 0; s < S; s++) {
                int64_t c = g - before + s;
                GradChunk *kc = &ring[((c % S) + S) % S];
                if (kc->id != c) {
                    flush_chunk(kc, C, D, Dv, dkb, dvb);
                    int64_t cc = ((c % T) + T) % T;
                    for (int64_t j = 0; j < C; j++) {
                        int64_t p = k_pos[bh * L + cc * C + j];
                        kc->pos[j] = (int32_t)p;
                        kc->valid[j] = (k_valid == NULL || k_valid[bh * n + p]) ? -1 : 0;
                        const float *kr = kb + p * D, *vr = vb + p * Dv;
                        copy_row(kc->kr + j * D, kr, D);
                        for (int64_t d = 0; d < D; d++) kc->kt[d * C + j] = kr[d];
                        for (int64_t d = 0; d < Dv; d++) kc->vt[d * C + j] = vr[d];
                    }
                    memset(kc->dk, 0, sizeof(float) * C * D);
                    memset(kc->dv, 0, sizeof(float) * C * Dv);
                    kc->id = c;
                }
                krs[s] = kc->kr;
                for (int64_t i = 0; i < C; i += 4) {
                    mm_rows4(1, (int)D, qs + i * D, (int)D, 1, &kc->kt, (int)C, C / VW,
                             pw + i * W + s * C, (int)W, 0);
                    mm_rows4(1, (int)Dv, dor + i * Dv, (int)Dv, 1, &kc->vt, (int)C, C / VW,
                             ds + i * W + s * C, (int)W, 0);
                }
                if (masks) {
                    memcpy(wpos + s * C, kc->pos, sizeof(int32_t) * C);
                    memcpy(wvalid + s * C, kc->valid, sizeof(int32_t) * C);
                }
            }
            /* P = 2^(masked score - lse2) (masked: 0), dS = P (dP - delta) scale, in place */
            for (int64_t i = 0; i < C; i++) {
                float *prow = pw + i * W, *drow = ds + i * W;
                const vi qpi = (vi){0} + qp[i];
                if (pq_next != NULL) {
                    int64_t p = pq_next[i], pk = pk_next[i];
                    prefetch_row(qb + p * D, D);
                    prefetch_row(dob + p * Dv, Dv);
                    prefetch_row(kb + pk * D, D);
                    prefetch_row(vb + pk * Dv, Dv);
                }
                const vf lv = vsplat(l2[i]), dv_ = vsplat(dl[i]);
                for (int64_t j = 0; j < W; j += VW) {
                    vf x = vload(prow + j);
                    if (masks)
                        x = mask_scores(x, viload(wpos + j), viload(wvalid + j), qpi, exclude_self,
                                        pen, causal);
                    vf p = vexp2(x - lv);
                    vstore(prow + j, p);
                    vstore(drow + j, p * (vload(drow + j) - dv_) * vscale);
                }
            }
            /* dQ = dS K, added to the query tokens' rows */
            for (int64_t i = 0; i < C; i += 4) {
                for (int64_t r = 0; pq_next != NULL && r < 4; r++)
                    prefetch_row(dqb + pq_next[i + r] * D, D);
                mm_rows4((int)S, (int)C, ds + i * W, (int)W, 1, krs, (int)D, D / VW, dqt, (int)D, 0);
                for (int64_t r = 0; r < 4; r++) add_row(dqb + (int64_t)qp[i + r] * D, dqt + r * D, D);
            }
            /* dK += dS^T Q and dV += P^T dO, per window chunk (the weights read transposed) */
            float *qrs[1] = {qr}, *dos[1] = {dor};
            for (int64_t s = 0; s < S; s++) {
                GradChunk *kc = &ring[(((g - before + s) % S) + S) % S];
                for (int64_t j = 0; j < C; j += 4) {
                    for (int64_t r = 0; leaving != NULL && s == 0 && r < 4; r++) {
                        prefetch_row(dkb + (int64_t)leaving->pos[j + r] * D, D);
                        prefetch_row(dvb + (int64_t)leaving->pos[j + r] * Dv, Dv);
                    }
                    mm_rows4(1, (int)C, ds + s * C + j, 1, (int)W, qrs, (int)D, D / VW,
                             kc->dk + j * D, (int)D, 1);
                    mm_rows4(1, (int)C, pw + s * C + j, 1, (int)W, dos, (int)Dv, Dv / VW,
                             kc->dv + j * Dv, (int)Dv, 1);
                }
            }
        }
        for (int64_t s = 0; s < S; s++) flush_chunk(&ring[s], C, D, Dv, dkb, dvb);
    }
    for (int64_t s = 0; s < S; s++) {
        free(ring[s].kt);
        free(ring[s].kr);
        free(ring[s].vt);
        free(ring[s].dk);
        free(ring[s].dv);
        free(ring[s].pos);
        free(ring[s].valid);
    }
    free(qs);
    free(qr);
    free(dor);
    free(pw);
    free(ds);
    free(dqt);
    free(l2);
    free(dl);
    free(qp);
    free(wpos);
    free(wvalid);
}

/* The gradients of every sorted chunk's attention (all R rounds of n tokens), added to dq,
 * dk [BH*n, D] and dv [BH*n, Dv] (rows in original order, flat over bh; zeros on entry for
 * the gradients alone).  q, k [BH*n, D], v [BH*n, Dv]; q_pos, k_pos [BH, R*n] (sorted slot ->
 * original position; k_pos may equal q_pos); k_valid [BH, n] bytes (1 = valid) or NULL;
 * lse2 [BH, n]: the merged log-sum-exp in base-2 units (0 for a row without keys); delta
 * [BH, n]: rowsum(dout * out) minus the lse's gradient; dout [BH*n, Dv].  qscale, penalty,
 * exclude_self, causal, before, after as in effattn_lsh_chunks_f32 (T = R*n/C >= 1 + before
 * + after); scale: the softmax scale (natural units).  (batch*head)s are shared out among
 * nthreads threads, one thread for all of one's chunks.  Requires C, D, Dv multiples of VW. */
void effattn_lsh_chunks_backward_f32(
    const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
    const uint8_t *k_valid, const float *lse2, const float *delta, const float *dout, int64_t BH,
    int64_t n, int64_t R, int64_t C, int64_t before, int64_t after, int64_t D, int64_t Dv,
    float qscale, float scale, int exclude_self, float penalty, int causal, float *dq, float *dk,
    float *dv, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (BH > 1)
    for (int64_t bh = 0; bh < BH; bh++) {
        if (C == 64 && D == 64 && Dv == 64) /* the default shape, unrolled */
            grad_range(q, k, v, q_pos, k_pos, k_valid, lse2, delta, dout, n, R, 64, before, after,
                       64, 64, qscale, scale, exclude_self, penalty, causal, dq, dk, dv, bh, bh + 1);
        else
            grad_range(q, k, v, q_pos, k_pos, k_valid, lse2, delta, dout, n, R, C, before, after,
                       D, Dv, qscale, scale, exclude_self, penalty, causal, dq, dk, dv, bh, bh + 1);
    }
}
