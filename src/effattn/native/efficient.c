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
#include "vec.h"

/* rows per block: a block's weights, values and products stay in L1/L2 */
#define RB 64

static const float LOG2E = 1.44269504088896341f;

/* Parts each (batch, head)'s rows are split into: enough items for every thread (twice
 * over, so that an odd count of heads still shares evenly), at most one per row block. */
static int64_t parts_of(int64_t BH, int64_t N, int nthreads) {
    int64_t p = (2 * (int64_t)nthreads + BH - 1) / BH;
    int64_t blocks = (N + RB - 1) / RB;
    if (p > blocks) p = blocks;
    return p < 1 ? 1 : p;
}

/* Rows lo .. hi - 1 of part `part` of `parts` over N rows, in whole row blocks. */
static void part_rows(int64_t N, int64_t part, int64_t parts, int64_t *lo, int64_t *hi) {
    int64_t blocks = (N + RB - 1) / RB;
    *lo = blocks * part / parts * RB;
    *hi = blocks * (part + 1) / parts * RB;
    if (*hi > N) *hi = N;
    if (*lo > N) *lo = N;
}

/* e [r][D] = 2^(tl x - cl) of key rows x [r][D] (0 for an invalid key). */
static inline __attribute__((always_inline)) void key_weights(
    const float *x, int64_t r, const int64_t D, const float *cl, float tl, const uint8_t *valid,
    float *e) {
    const vf tv = vsplat(tl);
    for (int64_t j = 0; j < r; j++) {
        if (valid != NULL && !valid[j]) {
            memset(e + j * D, 0, sizeof(float) * D);
            continue;
        }
        for (int64_t d = 0; d < D; d += VW)
            vstore(e + j * D + d, vexp2(vload(x + j * D + d) * tv - vload(cl + d)));
    }
}

/* p [r][D] = softmax over the features of t x for query rows x [r][D] (tl = t log2 e). */
static inline __attribute__((always_inline)) void query_weights(
    const float *x, int64_t r, const int64_t D, float tl, float *p) {
    const vf tv = vsplat(tl);
    for (int64_t i = 0; i < r; i++) {
        const float *row = x + i * D;
        float *pr = p + i * D;
        vf mx = vload(row);
        for (int64_t d = VW; d < D; d += VW) {
            vf y = vload(row + d);
            mx = vselect(y > mx, y, mx);
        }
        const vf m = vsplat(hmax(mx));
        vf tot = vsplat(0.0f);
        for (int64_t d = 0; d < D; d += VW) {
            vf w = vexp2((vload(row + d) - m) * tv);
            vstore(pr + d, w);
            tot += w;
        }
        const vf inv = vsplat(1.0f / hsum(tot));
        for (int64_t d = 0; d < D; d += VW) vstore(pr + d, vload(pr + d) * inv);
    }
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
    float *mt = e + RB * D; /* the block's maxima, then tl m */
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB;
        const float *x = kb + a * D;
        for (int64_t d = 0; d < D; d++) mt[d] = -INFINITY;
        for (int64_t j = 0; j < r; j++) {
            if (kv != NULL && !kv[a + j]) continue;
            for (int64_t d = 0; d < D; d += VW) {
                vf y = vload(x + j * D + d), mb = vload(mt + d);
                vstore(mt + d, vselect(y > mb, y, mb));
            }
        }
        for (int64_t d = 0; d < D; d++) {
            if (mt[d] > m[d]) { /* a new maximum: the sums so far scaled down to it */
                const float f = m[d] == -INFINITY ? 0.0f : exp2f(tl * (m[d] - mt[d]));
                z[d] *= f;
                for (int64_t x2 = 0; x2 < Dv; x2++) A[d * Dv + x2] *= f;
                m[d] = mt[d];
            }
            mt[d] = m[d] == -INFINITY ? 0.0f : tl * m[d];
        }
        key_weights(x, r, D, mt, tl, kv ? kv + a : NULL, e);
        for (int64_t d = 0; d < D; d += VW) {
            vf s = vload(z + d);
            for (int64_t j = 0; j < r; j++) s += vload(e + j * D + d);
            vstore(z + d, s);
        }
        add_transposed_times(e, r, D, (float *)(vb + a * Dv), Dv, A);
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
        query_weights(q + (bh * Nq + a) * D, r, D, tl, p);
        memset(p + r * D, 0, sizeof(float) * (r4 - r) * D);
        float *o = out_rows(out + bh * Nq * Dv, a, r, Dv, obuf);
        rows_times(p, r4, D, D, (float *)(C + bh * D * Dv), Dv, o, Dv);
        put_rows(out + bh * Nq * Dv, a, r, Dv, obuf);
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
        float *zb = z + bh * D, *Cb = C + bh * D * Dv;
        for (int64_t d = 0; d < D; d++) {
            float mx = -INFINITY;
            for (int64_t p = 0; p < parts; p++) mx = fmaxf(mx, mp[(bh * parts + p) * D + d]);
            float zs = 0.0f;
            for (int64_t x = 0; x < Dv; x++) Cb[d * Dv + x] = 0.0f;
            for (int64_t p = 0; p < parts; p++) {
                const int64_t i = bh * parts + p;
                if (mp[i * D + d] == -INFINITY) continue; /* no valid key in the part */
                const float f = exp2f(tl * (mp[i * D + d] - mx));
                zs += zp[i * D + d] * f;
                for (int64_t x = 0; x < Dv; x++) Cb[d * Dv + x] += Ap[(i * D + d) * Dv + x] * f;
            }
            zb[d] = zs;
            c[bh * D + d] = mx == -INFINITY ? 0.0f : t * mx; /* no valid key: any shift */
            const float inv = zs == 0.0f ? 1.0f : 1.0f / zs;
            for (int64_t x = 0; x < Dv; x++) Cb[d * Dv + x] *= inv;
        }
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
    const vf tv = vsplat(t);
    memset(dC, 0, sizeof(float) * D * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB, r4 = (r + 3) & ~(int64_t)3;
        query_weights(qb + a * D, r, D, tl, p);
        add_transposed_times(p, r, D, (float *)(gb + a * Dv), Dv, dC);
        if (dq == NULL) continue;
        rows_times(rows4(gb, a, r, Dv, gbuf), r4, Dv, Dv, (float *)Ct, D, dp, D);
        float *dqb = dq + (bh * Nq + a) * D;
        for (int64_t i = 0; i < r; i++) {
            const float *pr = p + i * D, *dpr = dp + i * D;
            vf s = vsplat(0.0f);
            for (int64_t d = 0; d < D; d += VW) s += vload(pr + d) * vload(dpr + d);
            const vf sv = vsplat(hsum(s));
            for (int64_t d = 0; d < D; d += VW)
                vstore(dqb + i * D + d, tv * vload(pr + d) * (vload(dpr + d) - sv));
        }
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
        key_weights(kb + a * D, r, D, cl, tl, kv ? kv + a : NULL, e);
        memset(e + r * D, 0, sizeof(float) * (r4 - r) * D);
        if (dv != NULL) {
            float *dvb = dv + bh * Nk * Dv;
            float *o = out_rows(dvb, a, r, Dv, obuf);
            rows_times(e, r4, D, D, (float *)dA, Dv, o, Dv);
            put_rows(dvb, a, r, Dv, obuf);
        }
        if (dk == NULL) continue;
        rows_times(rows4(vb, a, r, Dv, vbuf), r4, Dv, Dv, (float *)dAt, D, de, D);
        float *dkb = dk + (bh * Nk + a) * D;
        for (int64_t j = 0; j < r; j++)
            for (int64_t d = 0; d < D; d += VW)
                vstore(dkb + j * D + d,
                       tv * vload(e + j * D + d) * (vload(de + j * D + d) + vload(dz + d)));
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
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t d = 0; d < D; d++)
            for (int64_t x = 0; x < Dv; x++) Ct[(bh * Dv + x) * D + d] = C[(bh * D + d) * Dv + x];
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
