/* effattn native kernel: the landmarks' own part of Nystromformer, forward and backward for
 * float32 on the CPU (C99 + GCC vector extensions, optionally OpenMP), loaded with ctypes
 * by effattn/native/__init__.py; effattn.mechanisms.lowrank.nystrom_core is the torch twin.
 *
 * Per (batch, head), from the landmarks ql, kl [L][D], the landmarks' attention over the
 * keys k3v [L][Dv] (landmarks.c), the key landmarks' validity kc [L] and the query
 * landmarks' qr [L] (0: an empty segment):
 *   K  = softmax along rows of (scale ql kl^T, columns with kc = 0 left out), rows with
 *        qr = 0 zeroed;
 *   Z  = Nystromformer's Moore-Penrose iteration from Z0 = K^T / (max column sum of |K| *
 *        max row sum of |K|) (1 in place of a zero product), `iters` times
 *        Z <- Z (13 I - K Z (15 I - K Z (7 I - K Z))) / 4;
 *   w  = Z (k3v, rows with qr = 0 zeroed).
 * Every matrix is L x L (or L x D, L x Dv) with L = 64 typically: in torch that is ~30
 * small operations forward and ~100 in autograd's backward, each costing more in dispatch
 * than in arithmetic.  Here one call per direction; the backward runs the forward again,
 * keeping each iteration's products, then the chain rule through the iterations (8 products
 * each), the normalizer (the maxima's gradient shared evenly among tied columns / rows, as
 * torch's amax) and the softmax. */
#include "rowblocks.h"

/* xt [m][n] = x [n][m] */
static void transpose(const float *x, int64_t n, int64_t m, float *xt) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++) xt[j * n + i] = x[i * m + j];
}

/* O [n][m] = A [n][kk] B [kk][m] (n a multiple of 4, m of VW) */
static inline void mm(const float *A, const float *B, float *O, int64_t n, int64_t kk, int64_t m) {
    rows_times(A, n, kk, kk, (float *)B, m, O, m);
}

/* O [n][m] = A [n][kk] B^T for B [m][kk], through tr [kk][m] */
static inline void mm_bt(const float *A, const float *B, float *O, int64_t n, int64_t kk, int64_t m,
                         float *tr) {
    transpose(B, m, kk, tr);
    mm(A, tr, O, n, kk, m);
}

/* O [n][m] = A^T B for A [kk][n], B [kk][m], through tr [n][kk] */
static inline void mm_at(const float *A, const float *B, float *O, int64_t n, int64_t kk, int64_t m,
                         float *tr) {
    transpose(A, kk, n, tr);
    mm(tr, B, O, n, kk, m);
}

/* O = c I - X for X [L][L] */
static void diag_minus(float c, const float *X, int64_t L, float *O) {
    for (int64_t i = 0; i < L * L; i++) O[i] = -X[i];
    for (int64_t i = 0; i < L; i++) O[i * L + i] += c;
}

/* One (batch, head)'s pieces: the scratch layout of both directions. */
typedef struct {
    float *klt, *Ksm, *K, *Z, *KZ, *T2, *T3, *W3; /* Z: iters + 1 matrices, KZ, T2, T3: iters */
    float *a, *b, *c, *d, *e, *f, *tr;           /* work, [L][max(L, D, Dv)] each (tr: two) */
    int32_t *cval;
    float norm, colmax, rowmax;
    int norm_zero;
} core_t;

static int64_t core_floats(int64_t L, int64_t D, int64_t Dv, int64_t iters) {
    const int64_t W = L * (L > D ? (L > Dv ? L : Dv) : (D > Dv ? D : Dv));
    return D * L + 2 * L * L + (4 * iters + 1) * L * L + L * Dv + 8 * W;
}

/* A thread's scratch for (batch, head)s of these sizes (core_free releases it). */
static core_t core_alloc(int64_t L, int64_t D, int64_t Dv, int64_t iters) {
    const int64_t LL = L * L, W = L * (L > D ? (L > Dv ? L : Dv) : (D > Dv ? D : Dv));
    core_t s;
    s.klt = aligned_alloc(64, sizeof(float) * core_floats(L, D, Dv, iters));
    s.Ksm = s.klt + D * L;
    s.K = s.Ksm + LL;
    s.Z = s.K + LL;
    s.KZ = s.Z + (iters + 1) * LL;
    s.T2 = s.KZ + iters * LL;
    s.T3 = s.T2 + iters * LL;
    s.W3 = s.T3 + iters * LL;
    s.a = s.W3 + L * Dv;
    s.b = s.a + W;
    s.c = s.b + W;
    s.d = s.c + W;
    s.e = s.d + W;
    s.f = s.e + W;
    s.tr = s.f + W;
    s.cval = aligned_alloc(64, sizeof(int32_t) * ((L + 15) & ~(int64_t)15));
    return s;
}

static void core_free(core_t *s) {
    free(s->klt);
    free(s->cval);
}

/* The forward of one (batch, head), every iteration's Z, K Z, 15 I - K Z (7 I - K Z) and
 * 13 I - K Z (...) kept in s; w [L][Dv] written. */
static void core_forward(const float *ql, const float *kl, const float *k3v, const uint8_t *kc,
                         const uint8_t *qr, int64_t L, int64_t D, int64_t Dv, float scale,
                         int64_t iters, core_t *s, float *w) {
    const int64_t LL = L * L;
    /* K: scores in base-2 units (scale log2 e folded into kl^T), row softmax, empty rows */
    for (int64_t l = 0; l < L; l++) {
        s->cval[l] = kc == NULL || kc[l] ? -1 : 0;
        for (int64_t x = 0; x < D; x++) s->klt[x * L + l] = scale * LOG2E * kl[l * D + x];
    }
    mm(ql, s->klt, s->a, L, D, L);
    row_softmax(s->a, L, L, 1.0f, s->cval, s->Ksm);
    for (int64_t i = 0; i < L; i++) {
        const float keep = qr == NULL || qr[i] ? 1.0f : 0.0f;
        for (int64_t j = 0; j < L; j++) s->K[i * L + j] = keep * s->Ksm[i * L + j];
    }
    /* the normalizer: max column sum times max row sum of |K| */
    float cm = 0.0f, rm = 0.0f;
    for (int64_t j = 0; j < L; j++) {
        float cs = 0.0f;
        for (int64_t i = 0; i < L; i++) cs += fabsf(s->K[i * L + j]);
        cm = cs > cm ? cs : cm;
    }
    for (int64_t i = 0; i < L; i++) {
        float rs = 0.0f;
        for (int64_t j = 0; j < L; j++) rs += fabsf(s->K[i * L + j]);
        rm = rs > rm ? rs : rm;
    }
    s->colmax = cm;
    s->rowmax = rm;
    s->norm_zero = cm * rm == 0.0f;
    s->norm = s->norm_zero ? 1.0f : cm * rm;
    transpose(s->K, L, L, s->Z);
    for (int64_t i = 0; i < LL; i++) s->Z[i] /= s->norm;
    for (int64_t it = 0; it < iters; it++) {
        const float *Z = s->Z + it * LL;
        float *KZ = s->KZ + it * LL, *T2 = s->T2 + it * LL, *T3 = s->T3 + it * LL;
        mm(s->K, Z, KZ, L, L, L);
        diag_minus(7.0f, KZ, L, s->b);  /* T1 */
        mm(KZ, s->b, s->c, L, L, L);    /* KZ T1 */
        diag_minus(15.0f, s->c, L, T2); /* T2 */
        mm(KZ, T2, s->c, L, L, L);      /* KZ T2 */
        diag_minus(13.0f, s->c, L, T3); /* T3 */
        float *Zn = s->Z + (it + 1) * LL;
        mm(Z, T3, Zn, L, L, L);
        for (int64_t i = 0; i < LL; i++) Zn[i] *= 0.25f;
    }
    for (int64_t i = 0; i < L; i++) {
        const float keep = qr == NULL || qr[i] ? 1.0f : 0.0f;
        for (int64_t x = 0; x < Dv; x++) s->W3[i * Dv + x] = keep * k3v[i * Dv + x];
    }
    if (w != NULL) mm(s->Z + iters * LL, s->W3, w, L, L, Dv);
}

/* The backward of one (batch, head) after core_forward: dql, dkl [L][D], dk3v [L][Dv]. */
static void core_backward(const float *ql, const float *kl, const uint8_t *qr, int64_t L,
                          int64_t D, int64_t Dv, float scale, int64_t iters, core_t *s,
                          const float *dw, float *dql, float *dkl, float *dk3v) {
    const int64_t LL = L * L;
    float *dZ = s->a, *dK = s->b, *dKZ = s->c, *dT = s->d, *dZn = s->e, *t = s->f;
    /* w = Z W3: dZ = dw W3^T, dW3 = Z^T dw */
    mm_bt(dw, s->W3, dZ, L, Dv, L, s->tr);
    mm_at(s->Z + iters * LL, dw, dk3v, L, L, Dv, s->tr);
    for (int64_t i = 0; i < L; i++)
        if (qr != NULL && !qr[i]) memset(dk3v + i * Dv, 0, sizeof(float) * Dv);
    memset(dK, 0, sizeof(float) * LL);
    for (int64_t it = iters - 1; it >= 0; it--) {
        const float *Z = s->Z + it * LL, *KZ = s->KZ + it * LL, *T2 = s->T2 + it * LL,
                    *T3 = s->T3 + it * LL;
        /* Zn = Z T3 / 4, T3 = 13 I - KZ T2, T2 = 15 I - KZ T1, T1 = 7 I - KZ */
        mm_bt(dZ, T3, dZn, L, L, L, s->tr);       /* 4 dZ_prev (from Z) */
        mm_at(Z, dZ, dT, L, L, L, s->tr);         /* 4 dT3 = -4 d(KZ T2) */
        for (int64_t i = 0; i < LL; i++) {
            dZn[i] *= 0.25f;
            dT[i] *= -0.25f; /* d(KZ T2) */
        }
        mm_bt(dT, T2, dKZ, L, L, L, s->tr);       /* dKZ from KZ T2 */
        mm_at(KZ, dT, t, L, L, L, s->tr);         /* dT2 = -d(KZ T1) */
        for (int64_t i = 0; i < LL; i++) dT[i] = -t[i]; /* d(KZ T1) */
        diag_minus(7.0f, KZ, L, t);               /* T1 */
        mm_bt(dT, t, s->tr + LL, L, L, L, s->tr); /* dKZ from KZ T1 */
        for (int64_t i = 0; i < LL; i++) dKZ[i] += s->tr[LL + i];
        mm_at(KZ, dT, t, L, L, L, s->tr);         /* dT1 */
        for (int64_t i = 0; i < LL; i++) dKZ[i] -= t[i];
        /* KZ = K Z: dK += dKZ Z^T, dZ_prev += K^T dKZ */
        mm_bt(dKZ, Z, t, L, L, L, s->tr);
        for (int64_t i = 0; i < LL; i++) dK[i] += t[i];
        mm_at(s->K, dKZ, t, L, L, L, s->tr);
        for (int64_t i = 0; i < LL; i++) dZ[i] = dZn[i] + t[i];
    }
    /* Z0 = K^T / norm */
    const float *Z0 = s->Z;
    float dnorm = 0.0f;
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            dK[i * L + j] += dZ[j * L + i] / s->norm;
            dnorm -= dZ[j * L + i] * Z0[j * L + i];
        }
    if (!s->norm_zero) {
        dnorm /= s->norm;
        /* norm = colmax rowmax: each maximum's gradient shared among the columns (rows) at it */
        const float dcm = dnorm * s->rowmax, drm = dnorm * s->colmax;
        float *cs = t, *rs = t + L;
        int64_t ncm = 0, nrm = 0;
        for (int64_t j = 0; j < L; j++) {
            float x = 0.0f;
            for (int64_t i = 0; i < L; i++) x += fabsf(s->K[i * L + j]);
            cs[j] = x;
            ncm += x == s->colmax;
        }
        for (int64_t i = 0; i < L; i++) {
            float x = 0.0f;
            for (int64_t j = 0; j < L; j++) x += fabsf(s->K[i * L + j]);
            rs[i] = x;
            nrm += x == s->rowmax;
        }
        for (int64_t i = 0; i < L; i++)
            for (int64_t j = 0; j < L; j++) {
                const float k = s->K[i * L + j];
                const float g = (cs[j] == s->colmax ? dcm / ncm : 0.0f) + (rs[i] == s->rowmax ? drm / nrm : 0.0f);
                dK[i * L + j] += k > 0.0f ? g : (k < 0.0f ? -g : 0.0f);
            }
    }
    /* K = Ksm (rows with qr = 0 zeroed); Ksm = softmax(scale ql kl^T) */
    for (int64_t i = 0; i < L; i++)
        if (qr != NULL && !qr[i]) memset(dK + i * L, 0, sizeof(float) * L);
    row_softmax_grad(s->Ksm, dK, L, L, scale, dK, L); /* scale dS */
    mm(dK, kl, dql, L, L, D);
    mm_at(dK, ql, dkl, L, L, D, s->tr);
}

/* The validity row of (batch, head) bh: its batch's, bh / H (NULL: every landmark valid). */
static inline const uint8_t *batch_row(const uint8_t *m, int64_t sb, int64_t bh, int64_t H) {
    return m == NULL ? NULL : m + (bh / H) * sb;
}

/* ql, kl [BH, L, D], k3v [BH, L, Dv] float32 contiguous; kc, qr bytes [.][L] at batch
 * strides kc_sb, qr_sb (0: one row for every batch) or NULL -> w [BH, L, Dv]. */
void effattn_nystrom_core_f32(const float *ql, const float *kl, const float *k3v, const uint8_t *kc,
                              int64_t kc_sb, const uint8_t *qr, int64_t qr_sb, int64_t BH, int64_t H,
                              int64_t L, int64_t D, int64_t Dv, float scale, int64_t iters, float *w,
                              int nthreads) {
#pragma omp parallel num_threads(nthreads) if (BH > 1)
    {
        int64_t lo, hi;
        thread_share(BH, &lo, &hi);
        core_t s = core_alloc(L, D, Dv, iters);
        for (int64_t bh = lo; bh < hi; bh++)
            core_forward(ql + bh * L * D, kl + bh * L * D, k3v + bh * L * Dv, batch_row(kc, kc_sb, bh, H),
                         batch_row(qr, qr_sb, bh, H), L, D, Dv, scale, iters, &s, w + bh * L * Dv);
        core_free(&s);
    }
}

/* The gradients of effattn_nystrom_core_f32 for dw [BH, L, Dv]: dql, dkl [BH, L, D] and
 * dk3v [BH, L, Dv] written. */
void effattn_nystrom_core_backward_f32(const float *ql, const float *kl, const float *k3v,
                                       const uint8_t *kc, int64_t kc_sb, const uint8_t *qr,
                                       int64_t qr_sb, int64_t BH, int64_t H, int64_t L, int64_t D,
                                       int64_t Dv, float scale, int64_t iters, const float *dw,
                                       float *dql, float *dkl, float *dk3v, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (BH > 1)
    {
        int64_t lo, hi;
        thread_share(BH, &lo, &hi);
        core_t s = core_alloc(L, D, Dv, iters);
        for (int64_t bh = lo; bh < hi; bh++) {
            const uint8_t *q = batch_row(qr, qr_sb, bh, H);
            core_forward(ql + bh * L * D, kl + bh * L * D, k3v + bh * L * Dv, batch_row(kc, kc_sb, bh, H), q,
                         L, D, Dv, scale, iters, &s, NULL);
            core_backward(ql + bh * L * D, kl + bh * L * D, q, L, D, Dv, scale, iters, &s, dw + bh * L * Dv,
                          dql + bh * L * D, dkl + bh * L * D, dk3v + bh * L * Dv);
        }
        core_free(&s);
    }
}
