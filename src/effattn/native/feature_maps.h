/* effattn native kernels: the feature maps of feature-map (kernel) attention and the
 * row-block helpers their kernels share (feature_attention.c: non-causal;
 * causal_features.c: causal).  Static inline, like rowblocks.h.  The kinds:
 *
 *   FA_FAVOR (Performer's positive features): with Wr the projection [M][D] times r (r^2 the
 *     attention scale) and the logits u(x) = Wr x - h |x|^2 (h = r^2 / 2), keys exp(u(k_j)
 *     - shift) and queries softmax(u(q_i)) over the features (a factor per query row, which
 *     cancels in the normalized output, so the query's norm term is left out too);
 *   FA_ELU (linear attention): phi = psi = elu(x) + 1, M = D;
 *   FA_TAYLOR (first-order Taylor): phi = psi = [x / max(|x|, eps), 1, 0, ...], M = D + VW
 *     (the twin's [1, x̂] with its columns reordered and zero columns up to the vector
 *     width, which add nothing). */
#ifndef EFFATTN_FEATURE_MAPS_H
#define EFFATTN_FEATURE_MAPS_H
#include "rowblocks.h"

enum { FA_FAVOR = 0, FA_ELU = 1, FA_TAYLOR = 2 };

/* F.normalize's eps (effattn.mechanisms.kernel.NORMALIZE_EPS) */
static const float NORMALIZE_EPS = 1e-12f;

static inline __attribute__((always_inline)) float squared_norm(const float *x, const int64_t D) {
    vf s = vsplat(0.0f);
    for (int64_t d = 0; d < D; d += VW) s += vload(x + d) * vload(x + d);
    return hsum(s);
}

/* F [r4][M] from rows a .. a + r - 1 of x [n][D] (r4 = r rounded up to a multiple of 4; rows
 * past r zero or, for FA_FAVOR, the logits of zero rows): FA_FAVOR the logits u(x) (the norm
 * term where h != 0), the other kinds their features.  Returns the r4 rows of x it read
 * (x's own or xbuf's copy). */
static inline __attribute__((always_inline)) const float *raw_features(
    const int kind, const float *x, int64_t a, int64_t r, const int64_t D, const float *WrT,
    const int64_t M, float h, float *F, float *xbuf) {
    const float *X = rows4(x, a, r, D, xbuf);
    const int64_t r4 = (r + 3) & ~(int64_t)3;
    if (kind == FA_FAVOR) {
        rows_times(X, r4, D, D, (float *)WrT, M, F, M);
        if (h != 0.0f)
            for (int64_t j = 0; j < r; j++) {
                const vf n = vsplat(h * squared_norm(X + j * D, D));
                for (int64_t c = 0; c < M; c += VW) vstore(F + j * M + c, vload(F + j * M + c) - n);
            }
        return X;
    }
    const vf zero = vsplat(0.0f);
    for (int64_t j = 0; j < r4; j++) {
        float *f = F + j * M;
        if (j >= r) {
            memset(f, 0, sizeof(float) * M);
            continue;
        }
        const float *xr = X + j * D;
        if (kind == FA_ELU) { /* exp(min(x, 0)) + max(x, 0); NaN stays NaN */
            for (int64_t d = 0; d < D; d += VW) {
                const vf xv = vload(xr + d);
                const vf y = vexp2(vselect(xv < zero, xv, zero) * LOG2E) + vselect(xv > zero, xv, zero);
                vstore(f + d, vselect(xv == xv, y, xv));
            }
        } else {
            const float n = sqrtf(squared_norm(xr, D));
            const vf inv = vsplat(1.0f / (n > NORMALIZE_EPS ? n : NORMALIZE_EPS));
            for (int64_t d = 0; d < D; d += VW) vstore(f + d, vload(xr + d) * inv);
            memset(f + D, 0, sizeof(float) * (M - D));
            f[D] = 1.0f;
        }
    }
    return X;
}

/* Rows of F [r4][M] zeroed where valid marks a key invalid (valid NULL: none). */
static inline __attribute__((always_inline)) void zero_invalid(float *F, int64_t r, const int64_t M,
                                                              const uint8_t *valid) {
    if (valid != NULL)
        for (int64_t j = 0; j < r; j++)
            if (!valid[j]) memset(F + j * M, 0, sizeof(float) * M);
}

/* FA_FAVOR's key features psi [r4][M] = exp(U - c) in place, rows invalid or past r zero. */
static inline __attribute__((always_inline)) void favor_key_features(float *U, int64_t r, const int64_t M,
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

/* The query features phi [r4][M] of rows a .. a + r - 1 (rows past r zero); returns the
 * query rows read (as raw_features). */
static inline __attribute__((always_inline)) const float *query_features(
    const int kind, const float *qb, int64_t a, int64_t r, const int64_t D, const float *WrT,
    const int64_t M, float *p, float *xbuf) {
    const float *X = raw_features(kind, qb, a, r, D, WrT, M, 0.0f, p, xbuf);
    if (kind == FA_FAVOR) {
        row_softmax(p, r, M, LOG2E, NULL, p); /* in place: each element read before it is written */
        memset(p + r * M, 0, sizeof(float) * ((((r + 3) & ~(int64_t)3) - r) * M));
    }
    return X;
}

/* The key features psi [r4][M] of rows a .. a + r - 1 against the shift c (FA_FAVOR), rows
 * invalid or past r zero; returns the key rows read. */
static inline __attribute__((always_inline)) const float *key_features(
    const int kind, const float *kb, int64_t a, int64_t r, const int64_t D, const float *WrT,
    const int64_t M, float h, float c, const uint8_t *valid, float *psi, float *xbuf) {
    const float *X = raw_features(kind, kb, a, r, D, WrT, M, h, psi, xbuf);
    if (kind == FA_FAVOR)
        favor_key_features(psi, r, M, c, valid);
    else
        zero_invalid(psi, r, M, valid);
    return X;
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

/* dx [r][D] (rows of ldo) from the features' gradient dF [r][M] for FA_ELU and FA_TAYLOR
 * (F the features, X the input rows). */
static inline __attribute__((always_inline)) void map_backward(
    const int kind, const float *X, const float *F, const float *dF, int64_t r, const int64_t D,
    const int64_t M, float *dx, int64_t ldo) {
    const vf one = vsplat(1.0f);
    for (int64_t j = 0; j < r; j++) {
        const float *f = F + j * M, *g = dF + j * M;
        float *o = dx + j * ldo;
        if (kind == FA_ELU) {
            for (int64_t d = 0; d < D; d += VW) {
                const vf fv = vload(f + d);
                vstore(o + d, vload(g + d) * vselect(fv < one, fv, one));
            }
            continue;
        }
        const float n = sqrtf(squared_norm(X + j * D, D));
        vf s = vsplat(0.0f);
        for (int64_t d = 0; d < D; d += VW) s += vload(f + d) * vload(g + d);
        const vf proj = vsplat(n <= NORMALIZE_EPS ? 0.0f : hsum(s));
        const vf inv = vsplat(1.0f / (n > NORMALIZE_EPS ? n : NORMALIZE_EPS));
        for (int64_t d = 0; d < D; d += VW)
            vstore(o + d, (vload(g + d) - vload(f + d) * proj) * inv);
    }
}

/* o [r][Dv] (rows of Dv) divided row by row by den [r]: 0 where den is 0; by the
 * reciprocal where it is finite, else by a division (a tiny den). */
static inline __attribute__((always_inline)) void divide_rows(float *o, int64_t r, const int64_t Dv,
                                                             const float *den) {
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
}

/* The key sums of rows lo .. hi - 1 of one (batch, head) (kb [Nk][D], vb [Nk][Dv], kv its
 * validity bytes or NULL): the shift *m (FA_FAVOR: the largest logit of their valid keys,
 * -inf where they have none; else 0) and z [M], A [M][Dv] against it, for FA_FAVOR kept as
 * an online softmax (the sums so far rescaled when a block raises the maximum).  U [RB][M],
 * xbuf [RB][D]: scratch. */
static inline __attribute__((always_inline)) void key_sums_rows(
    const int kind, const int64_t D, const int64_t Dv, const int64_t M, const float *kb, const float *vb,
    const uint8_t *kv, int64_t lo, int64_t hi, const float *WrT, float h, float *U, float *xbuf, float *m,
    float *z, float *A) {
    float mx = kind == FA_FAVOR ? -INFINITY : 0.0f;
    memset(z, 0, sizeof(float) * M);
    memset(A, 0, sizeof(float) * M * Dv);
    for (int64_t a = lo; a < hi; a += RB) {
        const int64_t r = hi - a < RB ? hi - a : RB;
        const uint8_t *valid = kv ? kv + a : NULL;
        if (kind == FA_FAVOR) {
            raw_features(kind, kb, a, r, D, WrT, M, h, U, xbuf);
            const float bm = block_max(U, r, M, valid);
            if (bm == -INFINITY) continue; /* no valid key in the block */
            if (bm > mx) {
                const float s = mx == -INFINITY ? 0.0f : expf(mx - bm);
                for (int64_t c = 0; c < M; c++) z[c] *= s;
                for (int64_t i = 0; i < M * Dv; i++) A[i] *= s;
                mx = bm;
            }
            favor_key_features(U, r, M, mx, valid);
        } else {
            key_features(kind, kb, a, r, D, WrT, M, h, 0.0f, valid, U, xbuf);
        }
        for (int64_t c = 0; c < M; c += VW) {
            vf s = vload(z + c);
            for (int64_t j = 0; j < r; j++) s += vload(U + j * M + c);
            vstore(z + c, s);
        }
        add_transposed_times(U, r, M, (float *)(vb + a * Dv), Dv, A);
    }
    *m = mx;
}

/* The gradients through out = num / den of a block's r rows (r4 = r rounded up to 4):
 * gn [r4][Dv] = g / den (rows past r zero) and gd [r4] = -<g, out> / den (0 past r), both
 * 0 where den is 0; g, o the block's rows of dout and out (rows of Dv), den [r]. */
static inline __attribute__((always_inline)) void normalizer_grads(
    const float *g, const float *o, const float *den, int64_t r, int64_t r4, const int64_t Dv, float *gn,
    float *gd) {
    for (int64_t i = 0; i < r4; i++) {
        float *gi = gn + i * Dv;
        if (i >= r) {
            memset(gi, 0, sizeof(float) * Dv);
            gd[i] = 0.0f;
            continue;
        }
        const float inv = den[i] == 0.0f ? 0.0f : 1.0f / den[i];
        const vf iv = vsplat(inv);
        vf s = vsplat(0.0f);
        for (int64_t x = 0; x < Dv; x += VW) {
            const vf gx = vload(g + i * Dv + x);
            s += gx * vload(o + i * Dv + x);
            vstore(gi + x, gx * iv);
        }
        gd[i] = -hsum(s) * inv;
    }
}

/* FN(kind, D, Dv, M, ...) with the kind, and the widths where they are the common ones
 * (D = Dv = 64; FA_FAVOR's 256 features), as constants the compiler folds in. */
#define BY_KIND(FN, ...)                                                                      \
    do {                                                                                      \
        const int wide = D == 64 && Dv == 64;                                                 \
        if (kind == FA_FAVOR) {                                                               \
            if (wide && M == 256) FN(FA_FAVOR, 64, 64, 256, __VA_ARGS__);                     \
            else FN(FA_FAVOR, D, Dv, M, __VA_ARGS__);                                         \
        } else if (kind == FA_ELU) {                                                          \
            if (wide) FN(FA_ELU, 64, 64, 64, __VA_ARGS__);                                    \
            else FN(FA_ELU, D, Dv, M, __VA_ARGS__);                                           \
        } else {                                                                              \
            if (wide && M == 64 + VW) FN(FA_TAYLOR, 64, 64, 64 + VW, __VA_ARGS__);            \
            else FN(FA_TAYLOR, D, Dv, M, __VA_ARGS__);                                        \
        }                                                                                     \
    } while (0)

/* WrT [D][M] = Wr^T (NULL for the kinds without a projection). */
static inline float *transposed(const float *Wr, int64_t M, int64_t D) {
    if (Wr == NULL) return NULL;
    float *t = aligned_alloc(64, sizeof(float) * D * M);
    transpose_each(Wr, 1, M, D, t);
    return t;
}

/* A thread's n scratch blocks of RB rows, block i of widths[i] floats a row. */
static inline void alloc_blocks(int n, const int64_t *widths, float **blocks) {
    for (int i = 0; i < n; i++) blocks[i] = aligned_alloc(64, sizeof(float) * RB * widths[i]);
}

static inline void free_blocks(int n, float **blocks) {
    for (int i = 0; i < n; i++) free(blocks[i]);
}

#endif
