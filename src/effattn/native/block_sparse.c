/* effattn native kernel: the block-sparse engine's forward and backward for float32 on the
 * CPU (C99 + GCC vector extensions, optionally OpenMP), loaded with ctypes by
 * effattn/native/__init__.py; effattn.mechanisms.blocksparse._forward / _backward are the
 * torch twins.
 *
 * Square blocks of C rows.  Query block g of (batch, head) (b, h) sees key blocks
 * layout[b, h, g, 0 .. S-1] (-1: empty slot) or, with no layout, every key block.  Pairs are
 * masked by original positions: keys after the query (causal), invalid keys, a distance rule
 * (|i - j| <= band, dil | i - j, i != j: sliding windows, Sparse Transformer's near and
 * off-diagonal rules), and the shared-QK self pair lowered by a penalty.
 *
 * The scores of a query block are computed transposed, S^T [keys][queries] = K Q^T: the key
 * and value rows are read in place (they are contiguous rows of k and v: no gathered copies,
 * no transposes) and only the query block is transposed, once for all its slots.  The
 * softmax then runs down the columns with a query per lane (row maxima and sums are plain
 * vector maxima and sums over the key rows), and the product with the values reads the
 * weights transposed.  Rows with every key masked get zeros and lse = -inf.
 *
 * Forward: an online softmax over chunks of slots (the transposed scores of a chunk stay
 * in cache), each query block's result written to out (and its natural log-sum-exp to
 * lse).  Backward (FlashAttention-2): P = 2^(s - lse2) from the saved lse, dP = dO V^T,
 * dS = P (dP - delta) scale, dQ = dS K, dK += dS^T Q, dV += P^T dO, the key and value
 * gradients added straight to the rows of dk, dv: one thread owns a (batch, head), so the
 * rows it adds to are its own (no atomics, no per-thread copies). */
#include "vec.h"

/* Indices of the int64 configuration array both entry points take. */
enum {
    CF_B, CF_H, CF_NQB, CF_NKB, CF_S, CF_C, CF_D, CF_DV,
    CF_LAY_SB, CF_LAY_SH, /* layout [., ., nqb, S] strides of b and h (0: broadcast) */
    CF_FULL_SB, CF_FULL_SH, /* full-slot hint, like the layout */
    CF_QP_SB, CF_QP_SH, CF_KP_SB, CF_KP_SH, CF_KV_SB, CF_KV_SH, /* positions, validity */
    /* batch and head strides (elements) of the row tensors, whose rows are contiguous:
     * queries, keys, values, the output (forward) or its gradient (backward), dq, dk, dv */
    CF_Q_SB, CF_Q_SH, CF_K_SB, CF_K_SH, CF_V_SB, CF_V_SH, CF_O_SB, CF_O_SH,
    CF_DQ_SB, CF_DQ_SH, CF_DK_SB, CF_DK_SH, CF_DV_SB, CF_DV_SH,
    CF_CAUSAL, CF_EXCLUDE_SELF, CF_BAND, CF_DIL, CF_OFFDIAG,
    CF_NSTAT, /* rows per (batch, head) of the row tensors and the per-row statistics */
    CF_COUNT
};

typedef struct {
    int64_t B, H, nqb, nkb, S, C, D, Dv;
    const int64_t *lay, *qp, *kp;
    const int64_t *rows; /* engine row s -> row rows[s] of the row tensors (-1: a padding
                          * slot: read as zeros, never written); NULL: row s itself */
    const uint8_t *full, *kv;
    int64_t lay_sb, lay_sh, full_sb, full_sh, qp_sb, qp_sh, kp_sb, kp_sh, kv_sb, kv_sh;
    int causal, exclude_self, offdiag, any_rule;
    int64_t band, dil;
    float penalty;
} Pattern;

static Pattern pattern_of(const int64_t *cf, const int64_t *lay, const uint8_t *full,
                          const int64_t *qp, const int64_t *kp, const uint8_t *kv,
                          const int64_t *rows, float penalty) {
    Pattern p = {cf[CF_B], cf[CF_H], cf[CF_NQB], cf[CF_NKB], cf[CF_S], cf[CF_C], cf[CF_D], cf[CF_DV],
                 lay, qp, kp, rows, full, kv,
                 cf[CF_LAY_SB], cf[CF_LAY_SH], cf[CF_FULL_SB], cf[CF_FULL_SH], cf[CF_QP_SB],
                 cf[CF_QP_SH], cf[CF_KP_SB], cf[CF_KP_SH], cf[CF_KV_SB], cf[CF_KV_SH],
                 (int)cf[CF_CAUSAL], (int)cf[CF_EXCLUDE_SELF], (int)cf[CF_OFFDIAG], 0,
                 cf[CF_BAND], cf[CF_DIL], penalty};
    p.any_rule = p.causal || p.exclude_self || p.offdiag || p.band >= 0 || p.dil > 1 || kv != NULL;
    return p;
}

/* One slot of a query block: its key block, whether its pairs need masking, and the key
 * rows' positions and validity (-1 valid, 0 not). */
typedef struct {
    int64_t block;
    int mask;
} Slot;

/* The slots query block g of (b, h) sees, empty ones and (causal, band) ones with no
 * allowed pair left out; the query positions go to qp32 [C].  Returns the count. */
static int64_t slots_of(const Pattern *p, int64_t b, int64_t h, int64_t g, Slot *out,
                        int32_t *qp32) {
    const int64_t C = p->C;
    const int64_t *qp = p->qp + b * p->qp_sb + h * p->qp_sh + g * C;
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int64_t i = 0; i < C; i++) {
        qp32[i] = (int32_t)qp[i];
        qmin = qp[i] < qmin ? qp[i] : qmin;
        qmax = qp[i] > qmax ? qp[i] : qmax;
    }
    const int64_t n = p->lay ? p->S : p->nkb;
    const int64_t *lay = p->lay ? p->lay + b * p->lay_sb + h * p->lay_sh + g * p->S : NULL;
    const uint8_t *full = p->full ? p->full + b * p->full_sb + h * p->full_sh + g * p->S : NULL;
    const int64_t *kp = p->kp + b * p->kp_sb + h * p->kp_sh;
    int64_t count = 0;
    for (int64_t s = 0; s < n; s++) {
        int64_t blk = lay ? lay[s] : s;
        if (blk < 0) continue;
        if (p->causal || p->band >= 0) { /* no pair allowed in the whole block: skipped */
            int64_t kmin = INT64_MAX, kmax = INT64_MIN;
            for (int64_t j = 0; j < C; j++) {
                int64_t x = kp[blk * C + j];
                kmin = x < kmin ? x : kmin;
                kmax = x > kmax ? x : kmax;
            }
            if (p->causal && kmin > qmax) continue;
            if (p->band >= 0 && (kmin - qmax > p->band || qmin - kmax > p->band)) continue;
        }
        out[count].block = blk;
        out[count].mask = p->any_rule && (p->exclude_self || full == NULL || !full[s]);
        count++;
    }
    return count;
}

/* Masks a transposed score row: key j (position kpos, validity kval as a lane mask)
 * against the queries at positions qp (a vector of lanes). */
static inline vf mask_key_row(const Pattern *p, vf x, int32_t kpos, int32_t kval, vi qp, vf pen) {
    const vi kp = (vi){0} + kpos;
    x = mask_scores(x, kp, (vi){0} + kval, qp, p->exclude_self, pen, p->causal);
    if (p->band >= 0 || p->dil > 1 || p->offdiag) {
        vi d = qp - kp, drop = (vi){0};
        if (p->band >= 0) drop |= (d > (int32_t)p->band) | (d < -(int32_t)p->band);
        if (p->dil > 1) drop |= (d % (int32_t)p->dil) != 0;
        if (p->offdiag) drop |= d == 0;
        x = vselect(drop, vsplat(-INFINITY), x);
    }
    return x;
}

/* Transposed scores of one slot, ST [C keys][C queries]: the key rows K [C][D] of key block
 * sl->block against the scaled, transposed query block Qt [D][C], masked where needed. */
static inline __attribute__((always_inline)) void slot_scores(
    const Pattern *p, const Slot *sl, const float *K, float *const *qt, const int64_t C,
    const int64_t D, const int64_t *kp, const uint8_t *kv, const int32_t *qp32, vf pen, float *ST) {
    for (int64_t j = 0; j < C; j += 4)
        mm_rows4(1, (int)D, K + j * D, (int)D, 1, qt, (int)C, C / VW, ST + j * C, (int)C, 0);
    if (!sl->mask) return;
    for (int64_t j = 0; j < C; j++) {
        int64_t key = sl->block * C + j;
        int32_t kpos = (int32_t)kp[key], kval = (kv == NULL || kv[key]) ? -1 : 0;
        for (int64_t i = 0; i < C; i += VW)
            vstore(ST + j * C + i, mask_key_row(p, vload(ST + j * C + i), kpos, kval,
                                                viload(qp32 + i), pen));
    }
}

/* The row of the row tensors that engine row s is (-1: a padding slot). */
static inline int64_t row_of(const Pattern *p, int64_t s) { return p->rows ? p->rows[s] : s; }

/* Rows s0 .. s0 + C - 1 of a (batch, head)'s row tensor x (rows of len): in place where
 * they are x's own rows, else gathered into buf (a padding slot's row zero). */
static inline const float *block_rows(const Pattern *p, const float *x, int64_t s0, int64_t C,
                                      int64_t len, float *buf) {
    if (p->rows == NULL) return x + s0 * len;
    for (int64_t i = 0; i < C; i++) {
        int64_t r = p->rows[s0 + i];
        if (r >= 0)
            copy_row(buf + i * len, x + r * len, len);
        else
            memset(buf + i * len, 0, sizeof(float) * len);
    }
    return buf;
}

/* x [C][D] (rows of engine block s0 of a (batch, head)'s row tensor, rows of ld) times f,
 * transposed into xt [D][C] (a padding slot's column zero). */
static inline void transpose_scaled(const Pattern *p, const float *x, int64_t s0, int64_t ld,
                                    int64_t C, int64_t D, float f, float *xt) {
    for (int64_t i = 0; i < C; i++) {
        int64_t r = row_of(p, s0 + i);
        for (int64_t d = 0; d < D; d++) xt[d * C + i] = r >= 0 ? x[r * ld + d] * f : 0.0f;
    }
}

/* ------------------------------------------------------------------------------ forward */

/* Query blocks lo .. hi - 1 (item = (b * H + h) * nqb + g) of effattn_block_sparse_f32;
 * always inlined, so that calls with constant C, D, Dv compile to fully unrolled loops. */
static inline __attribute__((always_inline)) void forward_range(
    const Pattern *p, const float *q, const float *k, const float *v, const int64_t *cf,
    const int64_t C, const int64_t D, const int64_t Dv, float qscale, int64_t chunk, float *out,
    float *lse, int64_t lo, int64_t hi) {
    const int64_t H = p->H, nqb = p->nqb, nstat = cf[CF_NSTAT];
    const int64_t nslots = p->lay ? p->S : p->nkb;
    float *qt = aligned_alloc(64, sizeof(float) * D * C);
    float *st = aligned_alloc(64, sizeof(float) * chunk * C * C);
    float *o = aligned_alloc(64, sizeof(float) * C * Dv);
    float *m = aligned_alloc(64, sizeof(float) * C), *t = aligned_alloc(64, sizeof(float) * C);
    float *alpha = aligned_alloc(64, sizeof(float) * C);
    int32_t *qp32 = aligned_alloc(64, sizeof(int32_t) * C);
    /* gathered key and value rows of a step's slots (rows given) */
    float *kbuf = p->rows ? aligned_alloc(64, sizeof(float) * chunk * C * D) : NULL;
    float *vbuf = p->rows ? aligned_alloc(64, sizeof(float) * chunk * C * Dv) : NULL;
    Slot *slots = malloc(sizeof(Slot) * (nslots > 0 ? nslots : 1));
    const float **vs = malloc(sizeof(float *) * chunk);
    const vf pen = vsplat(p->penalty), ninf = vsplat(-INFINITY), zero = vsplat(0.0f);
    for (int64_t it = lo; it < hi; it++) {
        const int64_t bh = it / nqb, g = it % nqb, b = bh / H, h = bh % H;
        const float *kb = k + b * cf[CF_K_SB] + h * cf[CF_K_SH];
        const float *vb = v + b * cf[CF_V_SB] + h * cf[CF_V_SH];
        const int64_t *kp = p->kp + b * p->kp_sb + h * p->kp_sh;
        const uint8_t *kv = p->kv ? p->kv + b * p->kv_sb + h * p->kv_sh : NULL;
        float *ob = out + b * cf[CF_O_SB] + h * cf[CF_O_SH];
        const int64_t n = slots_of(p, b, h, g, slots, qp32);
        transpose_scaled(p, q + b * cf[CF_Q_SB] + h * cf[CF_Q_SH], g * C, D, C, D, qscale, qt);
        for (int64_t i = 0; i < C; i += VW) {
            vstore(m + i, ninf);
            vstore(t + i, zero);
        }
        for (int64_t s0 = 0; s0 < n; s0 += chunk) {
            const int64_t ns = n - s0 < chunk ? n - s0 : chunk, W = ns * C;
            for (int64_t s = 0; s < ns; s++) {
                const int64_t blk = slots[s0 + s].block;
                const float *K = block_rows(p, kb, blk * C, C, D, kbuf + (kbuf ? s * C * D : 0));
                slot_scores(p, slots + s0 + s, K, &qt, C, D, kp, kv, qp32, pen, st + s * C * C);
                vs[s] = block_rows(p, vb, blk * C, C, Dv, vbuf + (vbuf ? s * C * Dv : 0));
            }
            /* per query (lane): the running maximum, the factor on what came before, the
             * weights 2^(s - m) in place and their sums */
            for (int64_t i = 0; i < C; i += VW) {
                vf mx = ninf;
                for (int64_t j = 0; j < W; j++) {
                    vf x = vload(st + j * C + i);
                    mx = vselect(x > mx, x, mx);
                }
                vf mold = vload(m + i), mnew = vselect(mx > mold, mx, mold);
                vf msafe = vselect(mnew == ninf, zero, mnew);
                vf a = vexp2(mold - msafe); /* 0 where nothing came before */
                vf tot = vload(t + i) * a;
                for (int64_t j = 0; j < W; j++) {
                    vf w = vexp2(vload(st + j * C + i) - msafe);
                    vstore(st + j * C + i, w);
                    tot += w;
                }
                vstore(m + i, mnew);
                vstore(t + i, tot);
                vstore(alpha + i, a);
            }
            if (s0 > 0)
                for (int64_t i = 0; i < C; i++) {
                    vf a = vsplat(alpha[i]);
                    for (int64_t d = 0; d < Dv; d += VW) vstore(o + i * Dv + d, vload(o + i * Dv + d) * a);
                }
            for (int64_t i = 0; i < C; i += 4) /* weights (read transposed) times values */
                mm_rows4((int)ns, (int)C, st + i, 1, (int)C, (float *const *)vs, (int)Dv, Dv / VW,
                         o + i * Dv, (int)Dv, s0 > 0);
        }
        const float ln2 = 0.69314718055994531f;
        float *lb = lse ? lse + bh * nstat : NULL;
        for (int64_t i = 0; i < C; i++) {
            const int64_t r = row_of(p, g * C + i);
            if (r < 0) continue; /* a padding slot */
            float *dst = ob + r * Dv;
            if (n == 0 || t[i] == 0.0f) { /* no key: zeros, lse -inf */
                for (int64_t d = 0; d < Dv; d += VW) vstore(dst + d, zero);
                if (lb) lb[r] = -INFINITY;
                continue;
            }
            vf inv = vsplat(1.0f / t[i]);
            for (int64_t d = 0; d < Dv; d += VW) vstore(dst + d, vload(o + i * Dv + d) * inv);
            if (lb) lb[r] = (m[i] + log2f(t[i])) * ln2;
        }
    }
    free(qt);
    free(st);
    free(o);
    free(m);
    free(t);
    free(alpha);
    free(qp32);
    free(kbuf);
    free(vbuf);
    free(slots);
    free(vs);
}

/* The engine's forward.  cf: the configuration (CF_* above).  Query rows [.][D] at
 * q + b*q_sb + h*q_sh, key rows [.][D] and value rows [.][Dv] likewise, output rows [.][Dv]
 * at out + b*o_sb + h*o_sh; lse [B*H, nstat] or NULL.  Engine row s (query block g holds
 * rows g*C .. g*C + C - 1, key block j likewise) is row rows[s] of these (rows NULL: row
 * s).  qscale: the softmax scale times log2 e (base-2 scores); penalty: the self pair's,
 * base-2 units; chunk: slots per online-softmax step.  C, D, Dv multiples of VW. */
void effattn_block_sparse_f32(const int64_t *cf, const float *q, const float *k, const float *v,
                              const int64_t *lay, const uint8_t *full, const int64_t *qp,
                              const int64_t *kp, const uint8_t *kv, const int64_t *rows,
                              float qscale, float penalty, int64_t chunk, float *out, float *lse,
                              int nthreads) {
    const Pattern p = pattern_of(cf, lay, full, qp, kp, kv, rows, penalty);
    const int64_t items = p.B * p.H * p.nqb;
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        int64_t lo, hi;
        thread_share(items, &lo, &hi);
        if (p.C == 64 && p.D == 64 && p.Dv == 64) /* the default shape, unrolled */
            forward_range(&p, q, k, v, cf, 64, 64, 64, qscale, chunk, out, lse, lo, hi);
        else
            forward_range(&p, q, k, v, cf, p.C, p.D, p.Dv, qscale, chunk, out, lse, lo, hi);
    }
}

/* ----------------------------------------------------------------------------- backward */

/* dst rows (rows of len of a (batch, head)'s row tensor) of engine rows s0 .. s0 + C - 1
 * plus src [C][len] (add) or set to it; padding slots skipped. */
static inline void put_block_rows(const Pattern *p, float *dst, int64_t s0, int64_t C,
                                  int64_t len, const float *src, int add) {
    for (int64_t i = 0; i < C; i++) {
        int64_t r = row_of(p, s0 + i);
        if (r < 0) continue;
        float *d = dst + r * len;
        if (add)
            for (int64_t x = 0; x < len; x += VW) vstore(d + x, vload(d + x) + vload(src + i * len + x));
        else
            copy_row(d, src + i * len, len);
    }
}

/* The (batch*head)s lo .. hi - 1 of effattn_block_sparse_backward_f32 (inlined as above). */
static inline __attribute__((always_inline)) void backward_range(
    const Pattern *p, const float *q, const float *k, const float *v, const int64_t *cf,
    const float *lse2, const float *delta, const float *dout, const int64_t C, const int64_t D,
    const int64_t Dv, float qscale, float scale, float *dq, float *dk, float *dv, int add_dq,
    int64_t lo, int64_t hi) {
    const int64_t H = p->H, nqb = p->nqb, nstat = cf[CF_NSTAT];
    const int64_t nslots = p->lay ? p->S : p->nkb;
    float *qt = aligned_alloc(64, sizeof(float) * D * C), *dot = aligned_alloc(64, sizeof(float) * Dv * C);
    float *pt = aligned_alloc(64, sizeof(float) * C * C), *ds = aligned_alloc(64, sizeof(float) * C * C);
    float *dqa = aligned_alloc(64, sizeof(float) * C * D);
    float *l2 = aligned_alloc(64, sizeof(float) * C), *de = aligned_alloc(64, sizeof(float) * C);
    int32_t *qp32 = aligned_alloc(64, sizeof(int32_t) * C);
    /* rows given: gathered query, output-gradient, key and value rows, and the key block's
     * gradients before they go to their rows */
    float *qbuf = NULL, *dobuf = NULL, *kbuf = NULL, *vbuf = NULL, *dkl = NULL, *dvl = NULL;
    if (p->rows) {
        qbuf = aligned_alloc(64, sizeof(float) * C * D);
        dobuf = aligned_alloc(64, sizeof(float) * C * Dv);
        kbuf = aligned_alloc(64, sizeof(float) * C * D);
        vbuf = aligned_alloc(64, sizeof(float) * C * Dv);
        dkl = aligned_alloc(64, sizeof(float) * C * D);
        dvl = aligned_alloc(64, sizeof(float) * C * Dv);
    }
    Slot *slots = malloc(sizeof(Slot) * (nslots > 0 ? nslots : 1));
    const vf pen = vsplat(p->penalty), vscale = vsplat(scale);
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const float *qb = q + b * cf[CF_Q_SB] + h * cf[CF_Q_SH];
        const float *kb = k + b * cf[CF_K_SB] + h * cf[CF_K_SH];
        const float *vb = v + b * cf[CF_V_SB] + h * cf[CF_V_SH];
        const float *dob = dout + b * cf[CF_O_SB] + h * cf[CF_O_SH];
        float *dqb = dq + b * cf[CF_DQ_SB] + h * cf[CF_DQ_SH];
        float *dkb = dk + b * cf[CF_DK_SB] + h * cf[CF_DK_SH];
        float *dvb = dv + b * cf[CF_DV_SB] + h * cf[CF_DV_SH];
        const int64_t *kp = p->kp + b * p->kp_sb + h * p->kp_sh;
        const uint8_t *kv = p->kv ? p->kv + b * p->kv_sb + h * p->kv_sh : NULL;
        for (int64_t g = 0; g < nqb; g++) {
            const int64_t n = slots_of(p, b, h, g, slots, qp32);
            transpose_scaled(p, qb, g * C, D, C, D, qscale, qt);
            transpose_scaled(p, dob, g * C, Dv, C, Dv, 1.0f, dot);
            float *qr = (float *)block_rows(p, qb, g * C, C, D, qbuf);
            float *dor = (float *)block_rows(p, dob, g * C, C, Dv, dobuf);
            for (int64_t i = 0; i < C; i++) { /* a padding slot: no weight, no gradient */
                int64_t r = row_of(p, g * C + i);
                l2[i] = r >= 0 ? lse2[bh * nstat + r] : INFINITY;
                de[i] = r >= 0 ? delta[bh * nstat + r] : 0.0f;
            }
            memset(dqa, 0, sizeof(float) * C * D);
            for (int64_t s = 0; s < n; s++) {
                const int64_t blk = slots[s].block;
                float *kr = (float *)block_rows(p, kb, blk * C, C, D, kbuf);
                const float *V = block_rows(p, vb, blk * C, C, Dv, vbuf);
                slot_scores(p, slots + s, kr, &qt, C, D, kp, kv, qp32, pen, pt);
                for (int64_t j = 0; j < C; j += 4) /* dP^T = V dO^T */
                    mm_rows4(1, (int)Dv, V + j * Dv, (int)Dv, 1, &dot, (int)C, C / VW, ds + j * C,
                             (int)C, 0);
                for (int64_t j = 0; j < C; j++) /* P^T, then dS^T = P^T (dP^T - delta) scale */
                    for (int64_t i = 0; i < C; i += VW) {
                        vf w = vexp2(vload(pt + j * C + i) - vload(l2 + i));
                        vstore(pt + j * C + i, w);
                        vstore(ds + j * C + i, w * (vload(ds + j * C + i) - vload(de + i)) * vscale);
                    }
                /* dV += P^T dO, dK += dS^T Q: into this key block's rows, or (rows given)
                 * into dkl, dvl first */
                float *dvo = p->rows ? dvl : dvb + blk * C * Dv, *dko = p->rows ? dkl : dkb + blk * C * D;
                for (int64_t j = 0; j < C; j += 4) {
                    mm_rows4(1, (int)C, pt + j * C, (int)C, 1, &dor, (int)Dv, Dv / VW, dvo + j * Dv,
                             (int)Dv, !p->rows);
                    mm_rows4(1, (int)C, ds + j * C, (int)C, 1, &qr, (int)D, D / VW, dko + j * D,
                             (int)D, !p->rows);
                }
                if (p->rows) {
                    put_block_rows(p, dvb, blk * C, C, Dv, dvl, 1);
                    put_block_rows(p, dkb, blk * C, C, D, dkl, 1);
                }
                for (int64_t i = 0; i < C; i += 4) /* dQ += dS K (dS read transposed) */
                    mm_rows4(1, (int)C, ds + i, 1, (int)C, &kr, (int)D, D / VW, dqa + i * D, (int)D, 1);
            }
            put_block_rows(p, dqb, g * C, C, D, dqa, add_dq);
        }
    }
    free(qt);
    free(dot);
    free(pt);
    free(ds);
    free(dqa);
    free(l2);
    free(de);
    free(qp32);
    free(qbuf);
    free(dobuf);
    free(kbuf);
    free(vbuf);
    free(dkl);
    free(dvl);
    free(slots);
}

/* The engine's backward, the gradients added to the rows of dk, dv and (add_dq) added to
 * or (else) written into those of dq (rows, strides and the row map as the forward's q, k,
 * v take them; dout's like out's).  lse2 [B*H, nstat]: the log-sum-exp in base-2 units (0
 * where a row has no key); delta [B*H, nstat]: rowsum(dout * out) - dlse; scale: the
 * softmax scale.  One thread per (batch, head). */
void effattn_block_sparse_backward_f32(const int64_t *cf, const float *q, const float *k,
                                       const float *v, const int64_t *lay, const uint8_t *full,
                                       const int64_t *qp, const int64_t *kp, const uint8_t *kv,
                                       const int64_t *rows, const float *lse2, const float *delta,
                                       const float *dout, float qscale, float scale, float penalty,
                                       float *dq, float *dk, float *dv, int add_dq, int nthreads) {
    const Pattern p = pattern_of(cf, lay, full, qp, kp, kv, rows, penalty);
    const int64_t BH = p.B * p.H;
#pragma omp parallel num_threads(nthreads) if (BH > 1)
    {
        int64_t lo, hi;
        thread_share(BH, &lo, &hi);
        if (p.C == 64 && p.D == 64 && p.Dv == 64)
            backward_range(&p, q, k, v, cf, lse2, delta, dout, 64, 64, 64, qscale, scale, dq, dk,
                           dv, add_dq, lo, hi);
        else
            backward_range(&p, q, k, v, cf, lse2, delta, dout, p.C, p.D, p.Dv, qscale, scale, dq,
                           dk, dv, add_dq, lo, hi);
    }
}
