/* effattn native kernels: shared float32 vector helpers (GCC vector extensions) of the
 * LSH chunk kernels (lsh_chunks.c forward, lsh_chunks_backward.c backward) and the
 * block-sparse engine's (block_sparse.c).  Everything
 * here is static inline: each kernel file compiles its own copy into its loops. */
#ifndef EFFATTN_VEC_H
#define EFFATTN_VEC_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf vload(const float *p) { vf r; memcpy(&r, p, sizeof r); return r; }
static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vi viload(const int32_t *p) { vi r; memcpy(&r, p, sizeof r); return r; }
static inline vf vsplat(float a) { return (vf){0} + a; }

/* *p in every lane.  On x86 with AVX, one broadcast straight from memory (a load-port
 * instruction): GCC otherwise loads the scalar and broadcasts it from a register, on the
 * port the FMAs need; the matmul blocks below then ran at 117 instead of 176 GFLOP/s on
 * one core of the 2-core Xeon the performance figures come from. */
static inline __attribute__((always_inline)) vf vbcast(const float *p) {
#if defined(__x86_64__) && defined(__AVX__)
    vf r;
    __asm__("vbroadcastss %1, %0" : "=v"(r) : "m"(*p));
    return r;
#else
    return vsplat(*p);
#endif
}
static inline vf vselect(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* a > b ? a : b lane-wise (b where either is NaN): one max instruction on x86, where GCC
 * turns the select into a compare, a mask move and bit operations. */
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && VW == 8
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return vselect(a > b, a, b);
#endif
}

/* 2^x for x <= 0 (scores minus their row maximum; -inf gives 0): x = n + f with n the
 * integer part (toward zero, so f in (-1, 0]), 2^f = 2^-0.5 * 2^(f + 0.5) by a degree-6
 * Taylor polynomial on |f + 0.5| <= 0.5 (relative error ~1e-7), 2^n built in the
 * exponent bits; x <= -127 gives exactly 0. */
static inline vf vexp2(vf x) {
    const vf lo = vsplat(-127.0f);
    vf xc = vselect(x < lo, lo, x);
    vi n = __builtin_convertvector(xc, vi);
    vf t = (xc - __builtin_convertvector(n, vf) + 0.5f) * 0.69314718055994531f;
    vf p = vsplat(1.0f / 720.0f);
    p = p * t + 1.0f / 120.0f;
    p = p * t + 1.0f / 24.0f;
    p = p * t + 1.0f / 6.0f;
    p = p * t + 0.5f;
    p = p * t + 1.0f;
    p = p * t + 1.0f;
    vf two_n = (vf)((n + 127) << 23);
    return p * two_n * 0.70710678118654752f;
}

/* log2 x for finite x > 0 (normal): the exponent bits plus log2 of the mantissa scaled
 * into [sqrt(1/2), sqrt(2)), by 2 atanh(z), z = (m - 1) / (m + 1), |z| < 0.172, to z^9
 * (relative error ~1e-9 before rounding). */
static inline vf vlog2(vf x) {
    vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 127;
    vf m = (vf)((bits & 0x7fffff) | 0x3f800000);
    vi big = m > 1.41421356237f;
    m = vselect(big, m * 0.5f, m);
    e -= big; /* big is -1 where true */
    vf z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
    vf p = z2 * (1.0f / 9.0f) + 1.0f / 7.0f;
    p = p * z2 + 1.0f / 5.0f;
    p = p * z2 + 1.0f / 3.0f;
    p = p * z2 + 1.0f;
    return __builtin_convertvector(e, vf) + z * p * 2.88539008177792681f; /* 2 log2 e */
}

/* The share lo .. hi - 1 of items 0 .. items - 1 that the calling thread of an OpenMP
 * parallel region takes (all of them without OpenMP). */
static inline void thread_share(int64_t items, int64_t *lo, int64_t *hi) {
    int nt = 1, tid = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    *lo = items * tid / nt;
    *hi = items * (tid + 1) / nt;
}

/* Horizontal maximum and sum of a vector: halves combined lane-wise (16 -> 8 -> 4 -> 2 ->
 * 1 lanes), in registers with shuffles where the compiler has __builtin_shufflevector (GCC
 * 12, clang); else the same tree through memory (GCC 11 and older compile that to stack
 * stores and scalar reloads, ~2x slower per row of the kernels' row softmaxes).  Both give
 * the same result, bit for bit. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float vf8_ __attribute__((vector_size(32)));
typedef float vf4_ __attribute__((vector_size(16)));
typedef int32_t vi8_ __attribute__((vector_size(32)));
typedef int32_t vi4_ __attribute__((vector_size(16)));
#define HALVES_MAX_(a, b, VF, VI) ((VF)(((VI)(a) & (VI)((a) > (b))) | ((VI)(b) & ~(VI)((a) > (b)))))

static inline float hsum(vf x) {
#if VW == 16
    vf8_ a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
             + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8_ a = x;
#endif
    vf4_ b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float hmax(vf x) {
#if VW == 16
    vf8_ lo8 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
    vf8_ hi8 = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    vf8_ a = HALVES_MAX_(hi8, lo8, vf8_, vi8_);
#else
    vf8_ a = x;
#endif
    vf4_ lo4 = __builtin_shufflevector(a, a, 0, 1, 2, 3), hi4 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
    vf4_ b = HALVES_MAX_(hi4, lo4, vf4_, vi4_);
    float m0 = b[2] > b[0] ? b[2] : b[0], m1 = b[3] > b[1] ? b[3] : b[1];
    return m1 > m0 ? m1 : m0;
}

/* VW horizontal sums (maxima) at once: lane i of the result = hsum(x[i]) (hmax), by a
 * butterfly of VW - 1 lane-wise steps on pairs of vectors (a row of 64 floats: 4 of them)
 * instead of a dependent shuffle chain and a scalar per vector.  The butterfly leaves row
 * bitrev(j) in lane j, so the rows are read in that order. */
#if VW == 16
static const int BITREV_[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
#define LANES_TREE_(OP)                                                                        \
    vf u[8], w[4], y[2];                                                                       \
    for (int i = 0; i < 8; i++) {                                                              \
        const vf a = x[BITREV_[2 * i]], b = x[BITREV_[2 * i + 1]];                             \
        u[i] = OP(__builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23), \
                  __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)); \
    }                                                                                          \
    for (int i = 0; i < 4; i++)                                                                \
        w[i] = OP(__builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27), \
                  __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31)); \
    for (int i = 0; i < 2; i++)                                                                \
        y[i] = OP(__builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29), \
                  __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31)); \
    return OP(__builtin_shufflevector(y[0], y[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30), \
              __builtin_shufflevector(y[0], y[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31));
#else
static const int BITREV_[8] = {0, 4, 2, 6, 1, 5, 3, 7};
#define LANES_TREE_(OP)                                                                        \
    vf u[4], w[2];                                                                             \
    for (int i = 0; i < 4; i++) {                                                              \
        const vf a = x[BITREV_[2 * i]], b = x[BITREV_[2 * i + 1]];                             \
        u[i] = OP(__builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11),                     \
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15));                  \
    }                                                                                          \
    for (int i = 0; i < 2; i++)                                                                \
        w[i] = OP(__builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13),   \
                  __builtin_shufflevector(u[2 * i], u[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15)); \
    return OP(__builtin_shufflevector(w[0], w[1], 0, 8, 2, 10, 4, 12, 6, 14),                  \
              __builtin_shufflevector(w[0], w[1], 1, 9, 3, 11, 5, 13, 7, 15));
#endif
#define LANES_ADD_(a, b) ((a) + (b))
static inline __attribute__((always_inline)) vf hsum_lanes(const vf *x) { LANES_TREE_(LANES_ADD_) }
static inline __attribute__((always_inline)) vf hmax_lanes(const vf *x) { LANES_TREE_(vmax) }
#else
static inline float hmax(vf x) {
    float h[VW];
    memcpy(h, &x, sizeof h);
    for (int w = VW / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) h[i] = h[i + w] > h[i] ? h[i + w] : h[i];
    return h[0];
}

static inline float hsum(vf x) {
    float h[VW];
    memcpy(h, &x, sizeof h);
    for (int w = VW / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) h[i] += h[i + w];
    return h[0];
}

static inline vf hsum_lanes(const vf *x) {
    float h[VW];
    for (int i = 0; i < VW; i++) h[i] = hsum(x[i]);
    return vload(h);
}

static inline vf hmax_lanes(const vf *x) {
    float h[VW];
    for (int i = 0; i < VW; i++) h[i] = hmax(x[i]);
    return vload(h);
}
#endif

/* O[r][v*VW + l] (+)= sum_s sum_j P[r][s*C + j] * Vs[s][j][col + v*VW + l] for 4 rows and
 * NV vectors, P[r][j] read at P[r * ldp + j * ldj] (ldj = 1: rows of weights; ldp = 1,
 * ldj = row length: the weights transposed), the output added to (add) or written: the
 * weights times the values (S window chunks of C keys each); with S = 1 the scores
 * (P = Q [C][D], Vs[0] = the transposed keys Kt [D][C]); transposed, the key gradients. */
#define MM_BLOCK(NAME, NV)                                                              \
    static inline __attribute__((always_inline)) void NAME(int S, int C, const float *P, int ldp, int ldj,              \
                            float *const *Vs, int ldv, int col, float *O, int ldo, int add) { \
        vf acc[4][NV];                                                                  \
        for (int r = 0; r < 4; r++)                                                     \
            for (int v = 0; v < NV; v++)                                                \
                acc[r][v] = add ? vload(O + r * ldo + v * VW) : vsplat(0.0f);           \
        for (int s = 0; s < S; s++) {                                                   \
            const float *V = Vs[s] + col, *Ps = P + (int64_t)s * C * ldj;               \
            for (int j = 0; j < C; j++) {                                               \
                vf b[NV];                                                               \
                for (int v = 0; v < NV; v++) b[v] = vload(V + (int64_t)j * ldv + v * VW); \
                for (int r = 0; r < 4; r++) {                                           \
                    vf a = vbcast(Ps + r * ldp + (int64_t)j * ldj);                      \
                    for (int v = 0; v < NV; v++) acc[r][v] += a * b[v];                 \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (int r = 0; r < 4; r++)                                                     \
            for (int v = 0; v < NV; v++) vstore(O + r * ldo + v * VW, acc[r][v]);       \
    }

MM_BLOCK(mm_4x4, 4)
MM_BLOCK(mm_4x2, 2)
MM_BLOCK(mm_4x1, 1)

/* MM_BLOCK over all nv vectors of the output rows: blocks of 4, then 2, then 1. */
static inline __attribute__((always_inline)) void mm_rows4(int S, int C, const float *P, int ldp, int ldj, float *const *Vs,
                            int ldv, int64_t nv, float *O, int ldo, int add) {
    int64_t v0 = 0;
    for (; nv - v0 >= 4; v0 += 4)
        mm_4x4(S, C, P, ldp, ldj, Vs, ldv, (int)(v0 * VW), O + v0 * VW, ldo, add);
    for (; nv - v0 >= 2; v0 += 2)
        mm_4x2(S, C, P, ldp, ldj, Vs, ldv, (int)(v0 * VW), O + v0 * VW, ldo, add);
    for (; v0 < nv; v0++)
        mm_4x1(S, C, P, ldp, ldj, Vs, ldv, (int)(v0 * VW), O + v0 * VW, ldo, add);
}

static inline void copy_row(float *dst, const float *src, int64_t len) {
    for (int64_t d = 0; d < len; d += VW) vstore(dst + d, vload(src + d));
}

static inline void prefetch_row(const float *row, int64_t len) {
    for (int64_t d = 0; d < len; d += 16) __builtin_prefetch(row + d);
}

/* VW base-2 scores x of one query row (original position qpi in every lane) against keys
 * at positions kp, validity kvalid (-1 valid, 0 not): the self penalty subtracted where
 * kp == qpi (exclude_self), then -inf where the key is invalid or (causal) after the
 * query.  The one masking rule of the chunk and engine kernels (block_sparse.c adds its
 * distance rules on top). */
static inline vf mask_scores(vf x, vi kp, vi kvalid, vi qpi, int exclude_self, vf pen,
                             int causal) {
    if (exclude_self) x -= vselect(kp == qpi, pen, vsplat(0.0f));
    vi drop = ~kvalid;
    if (causal) drop |= kp > qpi;
    return vselect(drop, vsplat(-INFINITY), x);
}

#endif
