/* effattn native kernel: LSH attention's sorted-chunk forward, fused (C99 + GCC vector
 * extensions, optionally OpenMP), loaded with ctypes by effattn/native/__init__.py.
 *
 * For every (batch*head) bh and sorted chunk g of a range, the chunk's C query rows attend
 * to the C key rows of each of its window chunks g - before .. g + after (cyclic over the
 * T sorted chunks of all rounds), exactly as effattn.mechanisms.lsh._group_forward does
 * with torch operations: the rows are read straight from q, k, v through the sorted
 * positions (no gathered copies in memory), each key chunk is transposed once into a
 * thread's buffer and reused by the query chunks that see it, and the scores, their
 * masks, the base-2 softmax and the product with the values stay in that thread's cache.
 * The float32 register blocks are 4 rows x up to 4 vectors (VW lanes: 16 with AVX-512,
 * else 8; the compiler splits them where the machine's vectors are narrower). */
#include "vec.h"

/* One key chunk in a thread's ring: transposed keys Kt [D][C], values [C][Dv], positions
 * and validity of its rows; `id` the (unwrapped) chunk index it holds. */
typedef struct {
    int64_t id;
    float *kt, *v;
    int32_t *pos;
    int32_t *valid; /* -1 valid, 0 not (a lane mask) */
} KeyChunk;

/* Row stats of a chunk's C rows (C a multiple of VW): from the base-2 row maxima m and
 * weight sums t, the natural log-sum-exp l (-inf where m is: no key) and the factors the
 * unnormalized output rows get: written (merge = 0) as o * inv (inv = 1 / t), or merged
 * (merge = 1, effattn.softmax.merge_pair_) into the token's row and lse a as
 * out * keep + o * scale, lse = logaddexp(a, l), with w = exp(l) / (exp(a) + exp(l)),
 * keep = 1 - w, scale = w / t (a row without keys leaves the token's row as it is).  a
 * holds the tokens' current lse on entry (merge) and their new lse on exit. */
static inline void row_stats(int64_t C, const float *m, const float *t, float *a, float *keep,
                             float *scale, int merge) {
    const vf ninf = vsplat(-INFINITY), zero = vsplat(0.0f), one = vsplat(1.0f);
    const float ln2 = 0.69314718055994531f, log2e = 1.44269504088896341f;
    for (int64_t i = 0; i < C; i += VW) {
        vf mv = vload(m + i), tv = vload(t + i);
        vi none = mv == ninf;
        vf ts = vselect(none, one, tv);
        vf l = vselect(none, ninf, (vlog2(ts) + mv) * ln2);
        vf inv = vselect(none, zero, one / ts);
        if (!merge) {
            vstore(a + i, l);
            vstore(keep + i, zero);
            vstore(scale + i, inv);
            continue;
        }
        vf av = vload(a + i), d = av - l;
        vf ad = vselect(d < 0.0f, -d, d);
        vf e = vexp2(-ad * log2e); /* exp(-|a - l|); 0 where one side is -inf */
        vi l_wins = l >= av;
        vf w = vselect(l_wins, one, e) / (one + e);
        vf mx = vselect(l_wins, l, av);
        vf lse = mx + vlog2(one + e) * ln2;
        w = vselect(none, zero, w);
        vstore(a + i, vselect(none, av, lse));
        vstore(keep + i, one - w);
        vstore(scale + i, w * inv);
    }
}

/* dst = dst * keep + o * scale over Dv (merge), or dst = o * scale (keep unused). */
static inline void put_row(float *dst, const float *o, float keep, float scale, int64_t Dv,
                           int merge) {
    vf sv = vsplat(scale);
    if (!merge) {
        for (int64_t d = 0; d < Dv; d += VW) vstore(dst + d, vload(o + d) * sv);
        return;
    }
    vf kv = vsplat(keep);
    for (int64_t d = 0; d < Dv; d += VW) vstore(dst + d, vload(dst + d) * kv + vload(o + d) * sv);
}

/* The query chunk loop.  q, k [BH*n, D], v [BH*n, Dv] (rows in original order, flat over
 * bh); q_pos, k_pos [BH, R*n] (sorted slot -> original position; k_pos may equal q_pos);
 * k_valid [BH, n] bytes (1 = valid) or NULL.  Chunks first .. first + count - 1 of the
 * T = R*n/C sorted chunks, each holding a token at most once (one round's chunks); each
 * sees chunks g - before .. g + after mod T (T >= their count).  Each query row's
 * normalized output and natural log-sum-exp (zeros and -inf for a row with every key
 * masked) go to its token's row of out [BH, n, Dv] and lse [BH, n] (contiguous), written
 * (merge = 0) or merged into what is there (merge = 1: the log-sum-exp merge of rounds).
 * qscale multiplies the query rows (the softmax scale times log2 e: the scores are in
 * base-2 units); penalty (base-2 units) is subtracted from a score whose key position
 * equals the query's (exclude_self); causal masks keys after the query.  Requires C, D, Dv
 * multiples of VW (the caller checks effattn_lsh_vector_width). */
/* One thread's items lo .. hi - 1 (item = bh * count + chunk - first) of
 * effattn_lsh_chunks_f32; always inlined, so that calls with constant C, D, Dv compile
 * to fully unrolled loops. */
static inline __attribute__((always_inline)) void chunk_range(
    const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
    const uint8_t *k_valid, int64_t n, int64_t R, const int64_t C, int64_t before, int64_t after,
    const int64_t D, const int64_t Dv, float qscale, int exclude_self, float penalty, int causal,
    int64_t first, int64_t count, float *out, float *lse, int merge, int64_t lo, int64_t hi) {
    const int64_t L = R * n, T = L / C, S = before + 1 + after, W = S * C;
    const int masks = exclude_self || causal || k_valid != NULL;
    {
        float *qs = aligned_alloc(64, sizeof(float) * C * D);
        float *sc = aligned_alloc(64, sizeof(float) * C * W);
        float *o = aligned_alloc(64, sizeof(float) * 4 * Dv);
        int32_t *qp = aligned_alloc(64, sizeof(int32_t) * C);
        float *mrow = aligned_alloc(64, sizeof(float) * C), *trow = aligned_alloc(64, sizeof(float) * C);
        float *la = aligned_alloc(64, sizeof(float) * C), *keep = aligned_alloc(64, sizeof(float) * C);
        float *scl = aligned_alloc(64, sizeof(float) * C);
        int32_t *wpos = aligned_alloc(64, sizeof(int32_t) * W), *wvalid = aligned_alloc(64, sizeof(int32_t) * W);
        KeyChunk ring[S];
        float *vs[S];
        for (int64_t s = 0; s < S; s++) {
            ring[s].id = INT64_MIN;
            ring[s].kt = aligned_alloc(64, sizeof(float) * D * C);
            ring[s].v = aligned_alloc(64, sizeof(float) * C * Dv);
            ring[s].pos = aligned_alloc(64, sizeof(int32_t) * C);
            ring[s].valid = aligned_alloc(64, sizeof(int32_t) * C);
        }
        int64_t ring_bh = -1;
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / count, g = first + it % count;
            const float *qb = q + bh * n * D, *kb = k + bh * n * D, *vb = v + bh * n * Dv;
            float *ob = out + bh * n * Dv, *lbh = lse + bh * n;
            if (bh != ring_bh) {
                for (int64_t s = 0; s < S; s++) ring[s].id = INT64_MIN;
                ring_bh = bh;
            }
            /* the next chunk's rows are fetched while this one computes, a row of each
             * per row of the softmax loop below (all at once, the prefetches queued behind
             * each other: ~13 % of the kernel's time went to them) */
            const int64_t *pq_next = NULL, *pk_next = NULL;
            const int64_t bn = (it + 1) / count;
            if (it + 1 < hi) {
                const int64_t gn = first + (it + 1) % count, cn = (((gn + after) % T) + T) % T;
                pq_next = q_pos + bn * L + gn * C;
                pk_next = k_pos + bn * L + cn * C;
            }
            /* the query rows, scaled */
            for (int64_t i = 0; i < C; i++) {
                int64_t p = q_pos[bh * L + g * C + i];
                qp[i] = (int32_t)p;
                const float *src = qb + p * D;
                vf qv = vsplat(qscale);
                for (int64_t d = 0; d < D; d += VW) vstore(qs + i * D + d, vload(src + d) * qv);
            }
            /* the window's key chunks (loaded into the ring where missing) and scores */
            for (int64_t s = 0; s < S; s++) {
                int64_t c = g - before + s;
                KeyChunk *kc = &ring[((c % S) + S) % S];
                if (kc->id != c) {
                    int64_t cc = ((c % T) + T) % T;
                    for (int64_t j = 0; j < C; j++) {
                        int64_t p = k_pos[bh * L + cc * C + j];
                        kc->pos[j] = (int32_t)p;
                        kc->valid[j] = (k_valid == NULL || k_valid[bh * n + p]) ? -1 : 0;
                        const float *kr = kb + p * D;
                        for (int64_t d = 0; d < D; d++) kc->kt[d * C + j] = kr[d];
                        copy_row(kc->v + j * Dv, vb + p * Dv, Dv);
                    }
                    kc->id = c;
                }
                vs[s] = kc->v;
                for (int64_t i = 0; i < C; i += 4) /* the scores against this chunk */
                    mm_rows4(1, (int)D, qs + i * D, (int)D, 1, &kc->kt, (int)C, C / VW,
                             sc + i * W + s * C, (int)W, 0);
                if (masks) { /* the window's key positions and validity, for the masks */
                    memcpy(wpos + s * C, kc->pos, sizeof(int32_t) * C);
                    memcpy(wvalid + s * C, kc->valid, sizeof(int32_t) * C);
                }
            }
            /* base-2 softmax weights (in place), row maxima and sums */
            const vf ninf = vsplat(-INFINITY), pen = vsplat(penalty);
            for (int64_t i = 0; i < C; i++) {
                float *row = sc + i * W;
                vf mx = ninf;
                const vi qpi = (vi){0} + qp[i];
                if (pq_next != NULL) {
                    prefetch_row(q + (bn * n + pq_next[i]) * D, D);
                    if (merge) prefetch_row(out + (bn * n + pq_next[i]) * Dv, Dv);
                    prefetch_row(k + (bn * n + pk_next[i]) * D, D);
                    prefetch_row(v + (bn * n + pk_next[i]) * Dv, Dv);
                }
                for (int64_t j = 0; j < W; j += VW) {
                    vf x = vload(row + j);
                    if (masks) { /* the self penalty, then -inf at masked keys */
                        x = mask_scores(x, viload(wpos + j), viload(wvalid + j), qpi,
                                        exclude_self, pen, causal);
                        vstore(row + j, x);
                    }
                    mx = vselect(x > mx, x, mx);
                }
                float m = hmax(mx);
                mrow[i] = m;
                if (m == -INFINITY) { /* every key masked: zero weights */
                    memset(row, 0, sizeof(float) * W);
                    trow[i] = 0.0f;
                    continue;
                }
                vf tot = vsplat(0.0f), mv = vsplat(m);
                for (int64_t j = 0; j < W; j += VW) {
                    vf w = vexp2(vload(row + j) - mv);
                    vstore(row + j, w);
                    tot += w;
                }
                trow[i] = hsum(tot);
            }
            if (merge)
                for (int64_t i = 0; i < C; i++) la[i] = lbh[qp[i]];
            row_stats(C, mrow, trow, la, keep, scl, merge);
            for (int64_t i = 0; i < C; i++) lbh[qp[i]] = la[i];
            /* weights times values, normalized (or merged) into the tokens' rows */
            for (int64_t i = 0; i < C; i += 4) {
                mm_rows4((int)S, (int)C, sc + i * W, (int)W, 1, vs, (int)Dv, Dv / VW, o, (int)Dv, 0);
                for (int64_t r = 0; r < 4; r++)
                    put_row(ob + (int64_t)qp[i + r] * Dv, o + r * Dv, keep[i + r], scl[i + r], Dv, merge);
            }
        }
        for (int64_t s = 0; s < S; s++) {
            free(ring[s].kt);
            free(ring[s].v);
            free(ring[s].pos);
            free(ring[s].valid);
        }
        free(qs);
        free(sc);
        free(o);
        free(qp);
        free(mrow);
        free(trow);
        free(la);
        free(keep);
        free(scl);
        free(wpos);
        free(wvalid);
    }
}

void effattn_lsh_chunks_f32(const float *q, const float *k, const float *v, const int64_t *q_pos,
                            const int64_t *k_pos, const uint8_t *k_valid, int64_t BH, int64_t n,
                            int64_t R, int64_t C, int64_t before, int64_t after, int64_t D,
                            int64_t Dv, float qscale, int exclude_self, float penalty, int causal,
                            int64_t first, int64_t count, float *out, float *lse, int merge,
                            int nthreads) {
    const int64_t items = BH * count;
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        if (C == 64 && D == 64 && Dv == 64) /* the default shape, unrolled */
            chunk_range(q, k, v, q_pos, k_pos, k_valid, n, R, 64, before, after, 64, 64, qscale,
                        exclude_self, penalty, causal, first, count, out, lse, merge, lo, hi);
        else
            chunk_range(q, k, v, q_pos, k_pos, k_valid, n, R, C, before, after, D, Dv, qscale,
                        exclude_self, penalty, causal, first, count, out, lse, merge, lo, hi);
    }
}

/* The lane count C, D and Dv must be multiples of. */
int effattn_lsh_vector_width(void) { return VW; }
