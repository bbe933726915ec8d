/* effattn native kernel: causal feature-map (kernel) attention, query i over the valid keys
 * j <= i (top-left aligned), out_i = sum_j w_ij v_j / sum_j w_ij with w_ij = phi(q_i)
 * psi(k_j), forward and backward for float32 on the CPU (C99 + GCC vector extensions,
 * optionally OpenMP), loaded with ctypes by effattn/native/__init__.py;
 * effattn.mechanisms.kernel.feature_map_attention(causal=True) (chunked prefix sums, chunk
 * RB) on the kinds' features is the torch twin.  The kinds are feature_maps.h's.
 *
 * Each (batch, head) is one scan over blocks of RB positions.  Block t's queries take its
 * own keys through the masked block of weights W [RB][RB] and the earlier blocks' keys
 * through the carried sums S = sum psi_j^T v_j [M][Dv] and z = sum psi_j [M].
 *
 * FA_FAVOR's key features exp(u(k_j)) span any range, so they are carried against a
 * running shift, strictly causal as the twin's (no output depends, not even through
 * rounding, on a later key):
 *   s_j = max u(k_j) over the features (-inf for an invalid key), U_j = exp(u(k_j) - s_j);
 *   c_i = max_{j <= i} s_j (the shift query i's weights are taken against),
 *   R_t = c at block t's last position (the shift of the sums carried out of block t);
 *   w_ij = (phi_i U_j) exp(s_j - c_i) inside a block, and (phi_i S) exp(R_{t-1} - c_i) from
 *   the carried sums, every exponent <= 0; the sums move to R_t by exp(R_{t-1} - R_t) and
 *   take the block's keys as U_j exp(s_j - R_t).  The other kinds: s = c = R = 0.
 * The forward keeps den [Nq] (the normalizers as used) and c [Nq] for the backward.
 *
 * Backward, with gn_i = g_i / den_i and gd_i = -<g_i, out_i> / den_i (0 where den_i = 0),
 * dW_ij = (<gn_i, v_j> + gd_i) for allowed pairs, recomputing the features:
 *   queries: dphi_i = sum_j dW_ij e_ij U_j (the block, e_ij = exp(s_j - c_i)) + exp(R_{t-1}
 *     - c_i) (gn_i S^T + gd_i z), then dq_i through the query features; S and z, the keys'
 *     sums carried into each block, come from the forward where it kept them (states: the
 *     caller's choice, (M / RB) N Dv floats), else from a forward-order scan of their own;
 *   keys, in one reverse-order scan (which takes dq too where states were kept), carrying G = sum_i exp(R_t - c_i) phi_i^T gn_i [M][Dv] (and its
 *     transpose) and gz = sum_i exp(R_t - c_i) gd_i phi_i over the later blocks' queries:
 *     dv_j = sum_i W_ij gn_i + psi_j G, dU_j = sum_i dW_ij e_ij phi_i + exp(s_j - R_t) (v_j
 *     G^T + gz) (psi_j = U_j exp(s_j - R_t)), then dk_j through the key features (FA_FAVOR
 *     du_j = U_j dU_j: the gradient of u(k_j), s_j being a constant that cancels).
 *
 * Threads: with at least as many (batch, head)s as threads each is scanned by one thread
 * (the same bits whatever their count); with fewer, each scan is split into parts, which
 * start from the carried sums of the positions before them (the keys') and after them (the
 * queries' gradients), taken first in a pass of their own (scan_parts). */
#include "feature_maps.h"

/* A thread's scratch for one block. */
typedef struct {
    float *P;   /* [RB][M] query features */
    float *U;   /* [RB][M] key features against their own shift (rows past the keys zero) */
    float *UT;  /* [M][RB] U transposed (columns past the keys zero) */
    float *E;   /* [RB][RB] e_ij for the allowed pairs (FA_FAVOR; else 1), 0 elsewhere */
    float *W;   /* [RB][RB] the block's weights */
    float *dW;  /* [RB][RB] their gradient (backward) */
    float *VT;  /* [Dv][RB] the block's value rows transposed (backward) */
    float *G;   /* [RB][Dv] gn (backward) */
    float *dF;  /* [RB][M] a features' gradient (backward) */
    float *xq, *xk, *vb, *ob; /* [RB][D], [RB][D], [RB][Dv], [RB][max(D, Dv)] row copies */
    float s[RB], c[RB], f[RB], den[RB], gd[RB];
} Block;

static void block_alloc(Block *b, int64_t D, int64_t Dv, int64_t M) {
    const int64_t w = D > Dv ? D : Dv;
    float **bufs[] = {&b->P, &b->U, &b->UT, &b->E, &b->W, &b->dW, &b->VT, &b->G, &b->dF, &b->xq, &b->xk, &b->vb,
                      &b->ob};
    const int64_t sizes[] = {RB * M, RB * M, M * RB, RB * RB, RB * RB, RB * RB, Dv * RB, RB * Dv, RB * M, RB * D,
                             RB * D, RB * Dv, RB * w};
    for (int i = 0; i < 13; i++) *bufs[i] = aligned_alloc(64, sizeof(float) * sizes[i]);
}

static void block_free(Block *b) {
    float *bufs[] = {b->P, b->U, b->UT, b->E, b->W, b->dW, b->VT, b->G, b->dF, b->xq, b->xk, b->vb, b->ob};
    for (int i = 0; i < 13; i++) free(bufs[i]);
}

/* O [r4][ncol] += X [r4][K] (rows of ldx) Y [K][ncol] (r4 a multiple of 4). */
static inline __attribute__((always_inline)) void rows_times_add(
    const float *X, int64_t r4, int64_t ldx, int64_t K, const float *Y, const int64_t ncol, float *O,
    int64_t ldo) {
    float *ys[1] = {(float *)Y};
    for (int64_t i = 0; i < r4; i += 4)
        mm_rows4(1, (int)K, X + i * ldx, (int)ldx, 1, ys, (int)ncol, ncol / VW, O + i * ldo, (int)ldo, 1);
}

/* S [K][ncol] (rows of lds) += X^T Y over r rows: X [r][>= K] (rows of ldx), Y [r][ncol]
 * (K a multiple of 4). */
static inline __attribute__((always_inline)) void add_transposed_times_ld(
    const float *X, int64_t r, int64_t ldx, int64_t K, const float *Y, const int64_t ncol, float *S,
    int64_t lds) {
    float *ys[1] = {(float *)Y};
    for (int64_t d = 0; d < K; d += 4)
        mm_rows4(1, (int)r, X + d, 1, (int)ldx, ys, (int)ncol, ncol / VW, S + d * lds, (int)lds, 1);
}

static inline float shift_factor(float from, float to) { /* exp(from - to), 0 from -inf */
    return from == -INFINITY ? 0.0f : expf(from - to);
}

/* The block of positions a .. a + r - 1 (its keys: the first rk of them, rk <= r) of one
 * (batch, head), the carried shift Rprev in: b->P, U, UT, E, W (= (P U^T) e, masked), s,
 * c and f (exp(Rprev - c_i), the carried sums' factor).  Returns the shift the block
 * carries out (R_t = c_{r-1}); *Xq, *Xk the query and key rows read. */
static inline __attribute__((always_inline)) float block_weights(
    const int kind, const int64_t D, const int64_t M, const float *qb, const float *kb,
    const uint8_t *valid, const float *WrT, float h, int64_t a, int64_t r, int64_t rk, float Rprev,
    Block *b, const float **Xq, const float **Xk) {
    const int64_t r4 = (r + 3) & ~(int64_t)3, rk4 = (rk + 3) & ~(int64_t)3;
    *Xq = query_features(kind, qb, a, r, D, WrT, M, b->P, b->xq);
    *Xk = NULL;
    float cur = kind == FA_FAVOR ? Rprev : 0.0f;
    if (rk > 0) {
        *Xk = raw_features(kind, kb, a, rk, D, WrT, M, h, b->U, b->xk);
        if (kind == FA_FAVOR) {
            const vf l2 = vsplat(LOG2E);
            for (int64_t j = 0; j < rk4; j++) {
                float *u = b->U + j * M;
                const float sj = j < rk && (valid == NULL || valid[j]) ? block_max(u, 1, M, NULL) : -INFINITY;
                if (j < rk) b->s[j] = sj;
                if (sj == -INFINITY) {
                    memset(u, 0, sizeof(float) * M);
                    continue;
                }
                const vf sv = vsplat(sj);
                for (int64_t x = 0; x < M; x += VW) vstore(u + x, vexp2((vload(u + x) - sv) * l2));
            }
        } else {
            zero_invalid(b->U, rk, M, valid);
        }
        for (int64_t x = 0; x < M; x++) {
            float *ut = b->UT + x * RB;
            for (int64_t j = 0; j < rk; j++) ut[j] = b->U[j * M + x];
            memset(ut + rk, 0, sizeof(float) * (RB - rk));
        }
        rows_times(b->P, r4, M, M, b->UT, RB, b->W, RB);
    }
    if (kind == FA_FAVOR)
        for (int64_t j = rk; j < RB; j++) b->s[j] = -INFINITY;
    int32_t lane[VW];
    for (int x = 0; x < VW; x++) lane[x] = x;
    const vi lanes = viload(lane);
    const vf zero = vsplat(0.0f), one = vsplat(1.0f), ninf = vsplat(-INFINITY), l2 = vsplat(LOG2E);
    for (int64_t i = 0; i < r4; i++) {
        float *e = b->E + i * RB, *w = b->W + i * RB;
        if (i < r && kind == FA_FAVOR && i < rk && b->s[i] > cur) cur = b->s[i];
        if (i < r) {
            b->c[i] = cur;
            b->f[i] = kind == FA_FAVOR ? shift_factor(Rprev, cur) : 1.0f;
        }
        const int32_t lim = i < r ? (int32_t)(i + 1 < rk ? i + 1 : rk) : 0; /* allowed keys: j < lim */
        const vf cv = vsplat(cur);
        for (int64_t j = 0; j < RB; j += VW) {
            vi ok = (lanes + (int32_t)j) < lim;
            vf ev = one;
            if (kind == FA_FAVOR) {
                const vf sv = vload(b->s + j);
                ok &= sv > ninf;
                ev = vexp2((sv - cv) * l2);
            }
            ev = vselect(ok, ev, zero);
            vstore(e + j, ev);
            /* selected, not multiplied: a later key's product stays out of the row */
            vstore(w + j, rk == 0 ? zero : vselect(ok, vload(w + j) * ev, zero));
        }
    }
    return cur;
}

/* FA_FAVOR: the carried sums moved from shift Rprev to Rnew, S (nS floats) and z [M] times
 * exp(Rprev - Rnew); then the block's key features U [rk][M] as psi_j = U_j exp(s_j - Rnew)
 * (in place).  The other kinds: nothing. */
static inline __attribute__((always_inline)) void carry_shift(
    const int kind, const int64_t M, float Rprev, float Rnew, float *S, int64_t nS, float *z, Block *b,
    int64_t rk) {
    if (kind != FA_FAVOR) return;
    const float g = shift_factor(Rprev, Rnew);
    if (g != 1.0f) {
        for (int64_t i = 0; i < nS; i++) S[i] *= g;
        if (z != NULL)
            for (int64_t x = 0; x < M; x++) z[x] *= g;
    }
    for (int64_t j = 0; j < rk; j++) {
        const vf e = vsplat(b->s[j] == -INFINITY ? 0.0f : expf(b->s[j] - Rnew));
        for (int64_t x = 0; x < M; x += VW) vstore(b->U + j * M + x, vload(b->U + j * M + x) * e);
    }
}

/* z [M] += the column sums of U [rk][M]. */
static inline __attribute__((always_inline)) void add_column_sums(const float *U, int64_t rk, const int64_t M,
                                                                 float *z) {
    for (int64_t x = 0; x < M; x += VW) {
        vf s = vload(z + x);
        for (int64_t j = 0; j < rk; j++) s += vload(U + j * M + x);
        vstore(z + x, s);
    }
}

/* The key rows of the block of r positions at a: those before Nk. */
static inline int64_t block_keys(int64_t a, int64_t r, int64_t Nk) {
    return Nk - a <= 0 ? 0 : Nk - a < r ? Nk - a : r;
}

/* gn = g / den into b->G [r4][Dv] (rows past r zero) and gd [r] = -<g, out> / den (0 where
 * den = 0) for the block at a; then b->dW [r][RB] = (gn V^T + gd) e (V [rk][Dv] the block's
 * value rows; b->E as block_weights left it). */
static inline __attribute__((always_inline)) void block_weight_grads(
    const int64_t Dv, const float *gb, const float *ob, const float *den, int64_t a, int64_t r,
    const float *V, int64_t rk, Block *b) {
    const int64_t r4 = (r + 3) & ~(int64_t)3;
    normalizer_grads(gb + a * Dv, ob + a * Dv, den + a, r, r4, Dv, b->G, b->gd);
    if (rk == 0) return;
    for (int64_t x = 0; x < Dv; x++) {
        float *vt = b->VT + x * RB;
        for (int64_t j = 0; j < rk; j++) vt[j] = V[j * Dv + x];
        memset(vt + rk, 0, sizeof(float) * (RB - rk));
    }
    rows_times(b->G, r4, Dv, Dv, b->VT, RB, b->dW, RB);
    const vf zero = vsplat(0.0f);
    for (int64_t i = 0; i < r; i++) {
        const vf gdi = vsplat(b->gd[i]);
        for (int64_t j = 0; j < RB; j += VW) {
            const vf ev = vload(b->E + i * RB + j);
            vstore(b->dW + i * RB + j, vselect(ev != zero, (vload(b->dW + i * RB + j) + gdi) * ev, zero));
        }
    }
}

/* The block's queries (features b->P [r][M], gn b->G [r][Dv], gd; shifts b->c) added to the
 * carried sums G [M][Dv], G^T [Dv][M] (where not NULL) and gz [M], each query scaled by
 * exp(Rref - c_i) (FA_FAVOR; gn and gd scaled in place). */
static inline __attribute__((always_inline)) void add_block_queries(
    const int kind, const int64_t Dv, const int64_t M, Block *b, int64_t r, float Rref, float *G, float *GT,
    float *gz) {
    if (kind == FA_FAVOR)
        for (int64_t i = 0; i < r; i++) {
            const float fi = shift_factor(Rref, b->c[i]);
            const vf fv = vsplat(fi);
            for (int64_t x = 0; x < Dv; x += VW) vstore(b->G + i * Dv + x, vload(b->G + i * Dv + x) * fv);
            b->gd[i] *= fi;
        }
    add_transposed_times(b->P, r, M, b->G, Dv, G);
    if (GT != NULL) add_transposed_times(b->G, r, Dv, b->P, M, GT);
    for (int64_t x = 0; x < M; x += VW) {
        vf s = vload(gz + x);
        for (int64_t i = 0; i < r; i++) s += vbcast(b->gd + i) * vload(b->P + i * M + x);
        vstore(gz + x, s);
    }
}

/* ------------------------------------------------------------------ parts of a scan */

/* Parts each (batch, head)'s scan is split into (whole blocks): 1 where there are at least
 * as many (batch, head)s as threads; else enough for every thread.  A part past the first
 * starts from the sums of the positions before it (the keys') or after it (the queries'
 * gradients), taken first in a pass of their own (key_prefixes, query_suffixes). */
static inline int64_t scan_parts(int64_t BH, int64_t Nq, int nthreads) {
    if (BH >= nthreads) return 1;
    const int64_t p = (nthreads + BH - 1) / BH, blocks = (Nq + RB - 1) / RB;
    return p > blocks ? blocks : p;
}

/* Each item's (bh * parts + part) carried sums in: m [items] (the shift), z [items][M],
 * S [items][M][Dv]; all NULL with one part (every scan starts from zero). */
typedef struct {
    float *m, *z, *S;
} Carry;

static void carry_free(Carry *c) {
    free(c->m);
    free(c->z);
    free(c->S);
}

static Carry carry_alloc(int64_t items, int64_t M, int64_t Dv) {
    Carry c = {aligned_alloc(64, sizeof(float) * items), aligned_alloc(64, sizeof(float) * items * M),
               aligned_alloc(64, sizeof(float) * items * M * Dv)};
    return c;
}

/* Item `it`'s carried sums into S [M][Dv] and z; returns its shift (zeros and FA_FAVOR's
 * -inf, else 0, where there is no carry). */
static float carry_in(const Carry *c, int kind, int64_t it, int64_t M, int64_t Dv, float *S, float *z) {
    if (c->m == NULL) {
        memset(S, 0, sizeof(float) * M * Dv);
        memset(z, 0, sizeof(float) * M);
        return kind == FA_FAVOR ? -INFINITY : 0.0f;
    }
    memcpy(S, c->S + it * M * Dv, sizeof(float) * M * Dv);
    memcpy(z, c->z + it * M, sizeof(float) * M);
    return c->m[it];
}

/* (m, z, S) += (m2, z2, S2) against the larger shift (sums of M and M * Dv floats). */
static void merge_sums(float *m, float *z, float *S, float m2, const float *z2, const float *S2, int64_t M,
                       int64_t Dv) {
    const float mx = fmaxf(*m, m2);
    if (mx == -INFINITY) return; /* neither has a valid key */
    const float s1 = shift_factor(*m, mx), s2 = shift_factor(m2, mx);
    for (int64_t i = 0; i < M; i++) z[i] = z[i] * s1 + z2[i] * s2;
    for (int64_t i = 0; i < M * Dv; i++) S[i] = S[i] * s1 + S2[i] * s2;
    *m = mx;
}

/* Part `it`'s queries' sums G [M][Dv], gz [M] for the reverse scan (backward_scan's
 * carried sums) against the shift c at the position before the part. */
static inline __attribute__((always_inline)) void query_sums_part(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *q, const float *out,
    const float *den, const float *cs, const float *dout, const float *WrT, int64_t Nq, int64_t parts, int64_t it,
    Block *b, float *G, float *gz) {
    const int64_t bh = it / parts;
    int64_t a0, a1;
    part_rows(Nq, it % parts, parts, &a0, &a1);
    const float *cb = cs + bh * Nq, Rref = kind == FA_FAVOR && a0 > 0 ? cb[a0 - 1] : 0.0f;
    memset(G, 0, sizeof(float) * M * Dv);
    memset(gz, 0, sizeof(float) * M);
    for (int64_t a = a0; a < a1; a += RB) {
        const int64_t r = a1 - a < RB ? a1 - a : RB;
        query_features(kind, q + bh * Nq * D, a, r, D, WrT, M, b->P, b->xq);
        normalizer_grads(dout + (bh * Nq + a) * Dv, out + (bh * Nq + a) * Dv, den + bh * Nq + a, r,
                         (r + 3) & ~(int64_t)3, Dv, b->G, b->gd);
        memcpy(b->c, cb + a, sizeof(float) * r);
        add_block_queries(kind, Dv, M, b, r, Rref, G, NULL, gz);
    }
}

/* Each part's own sums (items bh * parts + part): keys (keys_side 1) their key_sums_rows
 * over the part's key rows, else query_sums_part (the arguments of the other side unused). */
static Carry own_sums(int keys_side, int kind, const float *k, const float *v, const uint8_t *kvalid,
                      const float *q, const float *out, const float *den, const float *c, const float *dout,
                      const float *WrT, int64_t BH, int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv,
                      int64_t M, float h, int64_t parts, int nthreads) {
    const int64_t items = BH * parts;
    Carry own = carry_alloc(items, M, Dv);
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        Block b;
        block_alloc(&b, D, Dv, M);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t bh = it / parts;
            int64_t a0, a1;
            part_rows(Nq, it % parts, parts, &a0, &a1);
            if (keys_side) {
                if (a1 > Nk) a1 = Nk;
                if (a0 > a1) a0 = a1;
                BY_KIND(key_sums_rows, k + bh * Nk * D, v + bh * Nk * Dv, kvalid ? kvalid + (bh / H) * Nk : NULL,
                        a0, a1, WrT, h, b.U, b.xk, own.m + it, own.z + it * M, own.S + it * M * Dv);
            } else {
                own.m[it] = kind == FA_FAVOR && a0 > 0 ? c[bh * Nq + a0 - 1] : 0.0f;
                BY_KIND(query_sums_part, q, out, den, c, dout, WrT, Nq, parts, it, &b, own.S + it * M * Dv,
                        own.z + it * M);
            }
        }
        block_free(&b);
    }
    return own;
}

/* The keys' carried sums into each part of every (batch, head): the sums of the keys
 * before it (own_sums, then an exclusive scan over the parts). */
static Carry key_prefixes(int kind, const float *k, const float *v, const uint8_t *kvalid, const float *WrT,
                          int64_t BH, int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, int64_t M,
                          float h, int64_t parts, int nthreads) {
    Carry in = {0};
    if (parts == 1) return in;
    const int64_t items = BH * parts;
    Carry own = own_sums(1, kind, k, v, kvalid, NULL, NULL, NULL, NULL, NULL, WrT, BH, H, Nq, Nk, D, Dv, M, h,
                         parts, nthreads);
    in = carry_alloc(items, M, Dv);
    for (int64_t bh = 0; bh < BH; bh++) {
        const int64_t i0 = bh * parts;
        in.m[i0] = kind == FA_FAVOR ? -INFINITY : 0.0f;
        memset(in.z + i0 * M, 0, sizeof(float) * M);
        memset(in.S + i0 * M * Dv, 0, sizeof(float) * M * Dv);
        for (int64_t p = 1; p < parts; p++) {
            const int64_t it = i0 + p;
            in.m[it] = in.m[it - 1];
            memcpy(in.z + it * M, in.z + (it - 1) * M, sizeof(float) * M);
            memcpy(in.S + it * M * Dv, in.S + (it - 1) * M * Dv, sizeof(float) * M * Dv);
            merge_sums(in.m + it, in.z + it * M, in.S + it * M * Dv, own.m[it - 1], own.z + (it - 1) * M,
                       own.S + (it - 1) * M * Dv, M, Dv);
        }
    }
    carry_free(&own);
    return in;
}

/* The later queries' carried sums into each part of every (batch, head) for the reverse
 * scan: own_sums, then an exclusive scan over the parts from the last, each part's sums
 * moved to the shift before the part they go into. */
static Carry query_suffixes(int kind, const float *q, const float *out, const float *den, const float *c,
                            const float *dout, const float *WrT, int64_t BH, int64_t Nq, int64_t D, int64_t Dv,
                            int64_t M, int64_t parts, int nthreads) {
    Carry in = {0};
    if (parts == 1) return in;
    const int64_t items = BH * parts;
    Carry own = own_sums(0, kind, NULL, NULL, NULL, q, out, den, c, dout, WrT, BH, 1, Nq, Nq, D, Dv, M, 0.0f,
                         parts, nthreads);
    in = carry_alloc(items, M, Dv);
    for (int64_t bh = 0; bh < BH; bh++) {
        const int64_t last = bh * parts + parts - 1;
        memset(in.z + last * M, 0, sizeof(float) * M);
        memset(in.S + last * M * Dv, 0, sizeof(float) * M * Dv);
        for (int64_t it = last - 1; it >= bh * parts; it--) {
            /* into part it: part it + 1's sums and what went into it, at part it + 1's shift */
            const float g = it + 2 <= last ? (kind == FA_FAVOR ? shift_factor(own.m[it + 1], own.m[it + 2]) : 1.0f)
                                           : 0.0f;
            for (int64_t i = 0; i < M; i++) in.z[it * M + i] = own.z[(it + 1) * M + i] + g * in.z[(it + 1) * M + i];
            for (int64_t i = 0; i < M * Dv; i++)
                in.S[it * M * Dv + i] = own.S[(it + 1) * M * Dv + i] + g * in.S[(it + 1) * M * Dv + i];
        }
    }
    carry_free(&own);
    return in;
}

/* dq for the block at a (r rows, rk keys) once block_weights and block_weight_grads ran:
 * dphi = f (gn S^T + gd z) + dW U (ST [Dv][M], z [M] the keys' carried sums into the
 * block), then through the query features (Xq the query rows read) into dqb's rows. */
static inline __attribute__((always_inline)) void query_grads_block(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *Wr, const float *Xq,
    const float *ST, const float *z, int64_t a, int64_t r, int64_t rk, float *dqb, Block *b) {
    const int64_t r4 = (r + 3) & ~(int64_t)3;
    rows_times(b->G, r4, Dv, Dv, (float *)ST, M, b->dF, M);
    for (int64_t i = 0; i < r; i++) {
        const vf fi = vsplat(b->f[i]), gi = vsplat(b->gd[i]);
        for (int64_t x = 0; x < M; x += VW)
            vstore(b->dF + i * M + x, fi * (vload(b->dF + i * M + x) + gi * vload(z + x)));
    }
    if (rk > 0) rows_times_add(b->dW, r4, RB, rk, b->U, M, b->dF, M);
    if (kind == FA_FAVOR) {
        row_softmax_grad(b->P, b->dF, r, M, 1.0f, b->dF, M);
        float *o = out_rows(dqb, a, r, D, b->ob);
        rows_times(b->dF, r4, M, M, (float *)Wr, D, o, D);
        put_rows(dqb, a, r, D, b->ob);
    } else {
        map_backward(kind, Xq, b->P, b->dF, r, D, M, dqb + a * D, D);
    }
}

/* ------------------------------------------------------------------------------ forward */

/* The output rows of the block at a: (f P S + W V) / (f P z + rowsum W) into ob's rows (S
 * [M][Dv], z [M] the carried sums, V the block's value rows); b->den the normalizers. */
static inline __attribute__((always_inline)) void block_out(
    const int64_t Dv, const int64_t M, const float *S, const float *z, const float *V, int64_t a, int64_t r,
    int64_t rk, float *ob, Block *b) {
    const int64_t r4 = (r + 3) & ~(int64_t)3;
    float *o = out_rows(ob, a, r, Dv, b->ob);
    rows_times(b->P, r4, M, M, (float *)S, Dv, o, Dv);
    row_dots(b->P, r, M, z, b->den);
    for (int64_t i = 0; i < r; i++) {
        b->den[i] *= b->f[i];
        const vf fi = vsplat(b->f[i]);
        for (int64_t x = 0; x < Dv; x += VW) vstore(o + i * Dv + x, vload(o + i * Dv + x) * fi);
    }
    if (rk > 0) {
        rows_times_add(b->W, r4, RB, rk, V, Dv, o, Dv);
        for (int64_t i = 0; i < r; i++) {
            vf s = vsplat(0.0f);
            for (int64_t j = 0; j < RB; j += VW) s += vload(b->W + i * RB + j);
            b->den[i] += hsum(s);
        }
    }
    divide_rows(o, r, Dv, b->den);
    put_rows(ob, a, r, Dv, b->ob);
}

/* A block's carried sums in as the backward reads them: st [Dv + 1][M] = S^T (S [M][Dv]),
 * then z [M]. */
static inline void store_state(const float *S, const float *z, int64_t Dv, int64_t M, float *st) {
    transpose_each(S, 1, M, Dv, st);
    memcpy(st + Dv * M, z, sizeof(float) * M);
}

/* The forward-order scan of positions lo .. hi - 1 of one (batch, head): their outputs, den
 * and c, and (where states is not NULL) each block's carried sums in, for the backward
 * (grads 0); or dq from dout, for a forward that kept no states (grads 1; out and den the
 * forward's).  The carried sums in: S [M][Dv] (grads 0) or S^T [Dv][M] (grads 1), z [M]
 * against the shift R (the keys before lo; updated in place). */
static inline __attribute__((always_inline)) void forward_scan(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const int grads, const float *q,
    const float *k, const float *v, const uint8_t *kvalid, int64_t H, int64_t Nq, int64_t Nk, const float *WrT,
    const float *Wr, float h, float *out, float *den, float *cs, float *states, const float *dout, int64_t bh,
    int64_t lo, int64_t hi, float *dq, Block *b, float *S, float *z, float R) {
    const float *qb = q + bh * Nq * D, *kb = k + bh * Nk * D, *vbh = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    float *ob = out + bh * Nq * Dv;
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = Nq - a < RB ? Nq - a : RB;
        const int64_t rk = block_keys(a, r, Nk);
        if (!grads && states != NULL) /* S^T [Dv][M] and z [M], as the backward reads them */
            store_state(S, z, Dv, M, states + (bh * ((Nq + RB - 1) / RB) + a / RB) * (Dv + 1) * M);
        const float *Xq, *Xk, *V = rk > 0 ? rows4(vbh, a, rk, Dv, b->vb) : NULL;
        const float Rn = block_weights(kind, D, M, qb, kb, kv ? kv + a : NULL, WrT, h, a, r, rk, R, b, &Xq, &Xk);
        if (grads) {
            block_weight_grads(Dv, dout + bh * Nq * Dv, ob, den + bh * Nq, a, r, V, rk, b);
            query_grads_block(kind, D, Dv, M, Wr, Xq, S, z, a, r, rk, dq + bh * Nq * D, b);
        } else { /* out = (f P S + W V) / (f P z + rowsum W) */
            block_out(Dv, M, S, z, V, a, r, rk, ob, b);
            memcpy(den + bh * Nq + a, b->den, sizeof(float) * r);
            memcpy(cs + bh * Nq + a, b->c, sizeof(float) * r);
        }
        if (rk > 0 && Rn != -INFINITY) { /* the block's keys into the carried sums */
            carry_shift(kind, M, R, Rn, S, M * Dv, z, b, rk);
            add_column_sums(b->U, rk, M, z);
            if (!grads)
                add_transposed_times(b->U, rk, M, (float *)V, Dv, S);
            else
                add_transposed_times(V, rk, Dv, b->U, M, S);
        }
        R = Rn;
    }
}

/* q [BH, Nq, D], k [BH, Nk, D], v [BH, Nk, Dv] float32 contiguous; kvalid [BH / H, Nk]
 * bytes (1 = a real key) or NULL; kind and Wr, h, M as effattn_feature_attention_f32.
 * Writes out [BH, Nq, Dv] and what the backward takes: den [BH, Nq] (each query's
 * normalizer; 0: no weight, a zero output row), c [BH, Nq] (FA_FAVOR: the shift of its
 * weights, -inf before the first valid key; else 0) and, where not NULL, states [BH][T][Dv +
 * 1][M] (T = ceil(Nq / RB)): each block's carried sums in, S^T and z, against the shift c
 * at the position before the block. */
void effattn_causal_feature_attention_f32(const float *q, const float *k, const float *v,
                                          const uint8_t *kvalid, const float *Wr, int kind, int64_t BH,
                                          int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv,
                                          int64_t M, float h, float *out, float *den, float *c,
                                          float *states, int nthreads) {
    float *WrT = transposed(Wr, M, D);
    const int64_t parts = scan_parts(BH, Nq, nthreads), items = BH * parts;
    Carry in = key_prefixes(kind, k, v, kvalid, WrT, BH, H, Nq, Nk, D, Dv, M, h, parts, nthreads);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        Block b;
        block_alloc(&b, D, Dv, M);
        float *S = aligned_alloc(64, sizeof(float) * M * Dv), *z = aligned_alloc(64, sizeof(float) * M);
        for (int64_t it = lo; it < hi; it++) {
            int64_t a0, a1;
            part_rows(Nq, it % parts, parts, &a0, &a1);
            const float R = carry_in(&in, kind, it, M, Dv, S, z);
            BY_KIND(forward_scan, 0, q, k, v, kvalid, H, Nq, Nk, WrT, NULL, h, out, den, c, states, NULL, it / parts,
                    a0, a1, NULL, &b, S, z, R);
        }
        free(S);
        free(z);
        block_free(&b);
    }
    carry_free(&in);
    free(WrT);
}

/* ----------------------------------------------------------------------------- backward */

/* The reverse-order scan of positions hi - 1 .. lo of one (batch, head): dq (from the
 * forward's states: the keys' carried sums into each block), dk, dv (each where not NULL).
 * The carried sums of the later queries in: G [M][Dv], G^T [Dv][M], gz [M] against the
 * shift c at hi - 1 (updated in place). */
static inline __attribute__((always_inline)) void backward_scan(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *q, const float *k,
    const float *v, const uint8_t *kvalid, int64_t H, int64_t Nq, int64_t Nk, const float *WrT,
    const float *Wr, float h, const float *out, const float *den, const float *cs, const float *states,
    const float *dout, int64_t bh, int64_t lo, int64_t hi, float *dq, float *dk, float *dv, Block *b, float *G,
    float *GT, float *gz) {
    const float *qb = q + bh * Nq * D, *kb = k + bh * Nk * D, *vbh = v + bh * Nk * Dv;
    const uint8_t *kv = kvalid ? kvalid + (bh / H) * Nk : NULL;
    const float *cb = cs + bh * Nq;
    for (int64_t a = (hi - 1) / RB * RB; a >= lo; a -= RB) {
        const int64_t r = Nq - a < RB ? Nq - a : RB;
        const int64_t rk = block_keys(a, r, Nk), rk4 = (rk + 3) & ~(int64_t)3;
        const float R = kind != FA_FAVOR ? 0.0f : a == 0 ? -INFINITY : cb[a - 1];
        const float *Xq, *Xk, *V = rk > 0 ? rows4(vbh, a, rk, Dv, b->vb) : NULL;
        const float Rn = block_weights(kind, D, M, qb, kb, kv ? kv + a : NULL, WrT, h, a, r, rk, R, b, &Xq, &Xk);
        block_weight_grads(Dv, dout + bh * Nq * Dv, out + bh * Nq * Dv, den + bh * Nq, a, r, V, rk, b);
        if (dq != NULL) { /* from the keys' carried sums into the block, kept by the forward */
            const float *st = states + (bh * ((Nq + RB - 1) / RB) + a / RB) * (Dv + 1) * M;
            query_grads_block(kind, D, Dv, M, Wr, Xq, st, st + Dv * M, a, r, rk, dq + bh * Nq * D, b);
        }
        if (rk > 0 && (dk != NULL || dv != NULL)) {
            const uint8_t *valid = kv ? kv + a : NULL;
            float e[RB]; /* exp(s_j - R_t): the carried sums' factor of each key */
            for (int64_t j = 0; j < rk; j++)
                e[j] = kind != FA_FAVOR ? 1.0f : b->s[j] == -INFINITY ? 0.0f : expf(b->s[j] - Rn);
            if (dv != NULL) { /* dv = e (U G) + W^T gn */
                float *dvb = dv + bh * Nk * Dv, *o = out_rows(dvb, a, rk, Dv, b->ob);
                rows_times(b->U, rk4, M, M, G, Dv, o, Dv);
                for (int64_t j = 0; j < rk; j++) {
                    const vf ej = vsplat(e[j]);
                    for (int64_t x = 0; x < Dv; x += VW) vstore(o + j * Dv + x, vload(o + j * Dv + x) * ej);
                }
                add_transposed_times_ld(b->W, r, RB, rk4, b->G, Dv, o, Dv);
                put_rows(dvb, a, rk, Dv, b->ob);
            }
            /* dU = e (V G^T + gz) + dW^T P */
            rows_times(V, rk4, Dv, Dv, GT, M, b->dF, M);
            for (int64_t j = 0; j < rk; j++) {
                const vf ej = vsplat(e[j]);
                for (int64_t x = 0; x < M; x += VW)
                    vstore(b->dF + j * M + x, (vload(b->dF + j * M + x) + vload(gz + x)) * ej);
            }
            add_transposed_times_ld(b->dW, r, RB, rk4, b->P, M, b->dF, M);
            zero_invalid(b->dF, rk, M, valid);
            float *dkb = dk == NULL ? NULL : dk + bh * Nk * D;
            if (dkb != NULL && kind != FA_FAVOR) {
                map_backward(kind, Xk, b->U, b->dF, rk, D, M, dkb + a * D, D);
            } else if (dkb != NULL) { /* du = U dU; dk = du Wr - 2 h k rowsum(du) */
                for (int64_t j = 0; j < rk4; j++)
                    for (int64_t x = 0; x < M; x += VW)
                        vstore(b->dF + j * M + x, j < rk ? vload(b->dF + j * M + x) * vload(b->U + j * M + x) : vsplat(0.0f));
                float *ko = out_rows(dkb, a, rk, D, b->ob);
                rows_times(b->dF, rk4, M, M, (float *)Wr, D, ko, D);
                for (int64_t j = 0; j < rk; j++) {
                    vf s = vsplat(0.0f);
                    for (int64_t x = 0; x < M; x += VW) s += vload(b->dF + j * M + x);
                    const vf fv = vsplat(-2.0f * h * hsum(s));
                    for (int64_t d = 0; d < D; d += VW)
                        vstore(ko + j * D + d, vload(ko + j * D + d) + fv * vload(Xk + j * D + d));
                }
                put_rows(dkb, a, rk, D, b->ob);
            }
        }
        if (dk == NULL && dv == NULL) continue; /* the carried sums serve only the keys */
        /* the carried sums moved to the previous block's shift, this block's queries added */
        const float g = kind == FA_FAVOR ? shift_factor(R, Rn) : 1.0f;
        if (g != 1.0f) {
            for (int64_t i = 0; i < M * Dv; i++) G[i] *= g, GT[i] *= g;
            for (int64_t x = 0; x < M; x++) gz[x] *= g;
        }
        if (a == lo) break; /* the part's first block: its queries go to the parts before */
        add_block_queries(kind, Dv, M, b, r, R, G, GT, gz);
    }
}

/* The gradients of effattn_causal_feature_attention_f32: its out, den, c and dout [BH, Nq,
 * Dv] in; dq [BH, Nq, D], dk [BH, Nk, D], dv [BH, Nk, Dv] written (each may be NULL: not
 * wanted; key rows no query sees, past Nq, get zeros). */
void effattn_causal_feature_attention_backward_f32(
    const float *q, const float *k, const float *v, const uint8_t *kvalid, const float *Wr, int kind,
    int64_t BH, int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, int64_t M, float h,
    const float *out, const float *den, const float *c, const float *states, const float *dout, float *dq,
    float *dk, float *dv, int nthreads) {
    float *WrT = transposed(Wr, M, D);
    if (Nk > Nq) { /* keys after the last query: no weight */
        for (int64_t bh = 0; bh < BH; bh++) {
            if (dk != NULL) memset(dk + (bh * Nk + Nq) * D, 0, sizeof(float) * (Nk - Nq) * D);
            if (dv != NULL) memset(dv + (bh * Nk + Nq) * Dv, 0, sizeof(float) * (Nk - Nq) * Dv);
        }
    }
    const int64_t parts = scan_parts(BH, Nq, nthreads), items = BH * parts;
    const int keys = dk != NULL || dv != NULL, scan_dq = dq != NULL && states == NULL;
    Carry in = {0}, kin = {0};
    if (keys) in = query_suffixes(kind, q, out, den, c, dout, WrT, BH, Nq, D, Dv, M, parts, nthreads);
    if (scan_dq) kin = key_prefixes(kind, k, v, kvalid, WrT, BH, H, Nq, Nk, D, Dv, M, h, parts, nthreads);
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        Block b;
        block_alloc(&b, D, Dv, M);
        float *G = aligned_alloc(64, sizeof(float) * M * Dv), *GT = aligned_alloc(64, sizeof(float) * M * Dv);
        float *gz = aligned_alloc(64, sizeof(float) * M);
        for (int64_t it = lo; it < hi; it++) {
            int64_t a0, a1;
            part_rows(Nq, it % parts, parts, &a0, &a1);
            if (scan_dq) { /* no states kept: dq by a forward scan of its own */
                const float R = carry_in(&kin, kind, it, M, Dv, G, gz);
                transpose_each(G, 1, M, Dv, GT);
                BY_KIND(forward_scan, 1, q, k, v, kvalid, H, Nq, Nk, WrT, Wr, h, (float *)out, (float *)den, NULL, NULL,
                        dout, it / parts, a0, a1, dq, &b, GT, gz, R);
                if (!keys) continue;
            }
            carry_in(&in, kind, it, M, Dv, G, gz);
            transpose_each(G, 1, M, Dv, GT);
            BY_KIND(backward_scan, q, k, v, kvalid, H, Nq, Nk, WrT, Wr, h, out, den, c, states, dout, it / parts, a0,
                    a1, scan_dq ? NULL : dq, dk, dv, &b, G, GT, gz);
        }
        free(G);
        free(GT);
        free(gz);
        block_free(&b);
    }
    carry_free(&in);
    carry_free(&kin);
    free(WrT);
}
