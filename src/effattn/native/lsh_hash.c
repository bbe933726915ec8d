/* effattn native kernels of LSH hashing (C99 + GCC vector extensions, optionally OpenMP),
 * loaded with ctypes by effattn/native/__init__.py.  Every function has a pure-torch twin:
 * the argmax kernels give its result exactly and only take fewer passes over memory; the
 * fused hash (effattn_lsh_hash_f32) also computes the projections, so it gives that
 * result up to the projections' float rounding. */
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

/* argmax(concat[x, -x]) of one row x[0..h-1]: the first maximum wins (an entry of the
 * positive half beats an equal one of the negative half).  One vectorized pass for the
 * row's max and min, one for the first position of the winning value (the row is in L1
 * by then; a min-reduction of positions, not an early exit, so it vectorizes too).  A row holding NaN gives some index in [0, 2h). */
#define ROW_ARGMAX(NAME, T)                                                    \
    static inline int64_t NAME(const T *x, int64_t h) {                        \
        T mx = x[0], mn = x[0];                                                \
        _Pragma("omp simd reduction(max:mx) reduction(min:mn)")                \
        for (int64_t i = 1; i < h; i++) {                                      \
            mx = x[i] > mx ? x[i] : mx;                                        \
            mn = x[i] < mn ? x[i] : mn;                                        \
        }                                                                      \
        int neg = mx < -mn;                                                    \
        T v = neg ? mn : mx;                                                   \
        int32_t first = (int32_t)h - 1; /* NaN rows: no match, kept in range */ \
        _Pragma("omp simd reduction(min:first)")                               \
        for (int32_t i = 0; i < (int32_t)h; i++) {                             \
            int32_t at = x[i] == v ? (int32_t)i : (int32_t)h - 1;              \
            first = at < first ? at : first;                                   \
        }                                                                      \
        return neg ? h + first : first;                                        \
    }

ROW_ARGMAX(row_argmax_f32, float)
ROW_ARGMAX(row_argmax_f64, double)

/* out[r] = argmax(concat[x[r], -x[r]]) for the rows of a contiguous x [rows, h], on
 * nthreads threads (rows split evenly). */
#define CONCAT_ARGMAX(NAME, ROW, T)                                            \
    void NAME(const T *x, int64_t rows, int64_t h, int64_t *out, int nthreads) { \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * h >= 65536)") \
        for (int64_t r = 0; r < rows; r++) out[r] = ROW(x + r * h, h);         \
    }

CONCAT_ARGMAX(effattn_concat_argmax_f32, row_argmax_f32, float)
CONCAT_ARGMAX(effattn_concat_argmax_f64, row_argmax_f64, double)

/* LSH buckets straight from a slice of projections: x [BH, n, R, h] (contiguous) ->
 * out[bh * out_bh + r * out_r + t] = argmax(concat[x[bh, t, r], -x[bh, t, r]]) + r * per_round
 * (the round's offset added; out strided, e.g. columns t0 .. t0 + n of [BH, R, N]). */
#define HASH_BUCKETS(NAME, ROW, T)                                             \
    void NAME(const T *x, int64_t BH, int64_t n, int64_t R, int64_t h, int64_t *out, \
              int64_t out_bh, int64_t out_r, int64_t per_round, int nthreads) { \
        int64_t rows = BH * n * R;                                             \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * h >= 65536)") \
        for (int64_t i = 0; i < rows; i++) {                                   \
            int64_t r = i % R, t = (i / R) % n, bh = i / (R * n);              \
            out[bh * out_bh + r * out_r + t] = ROW(x + i * h, h) + r * per_round; \
        }                                                                      \
    }

HASH_BUCKETS(effattn_hash_buckets_f32, row_argmax_f32, float)
HASH_BUCKETS(effattn_hash_buckets_f64, row_argmax_f64, double)

/* LSH buckets straight from the tokens, projections fused: x [BH, N, D] (float32,
 * contiguous), rot [G, D, R * h] (G = 1: one set for every bh; else bh % G picks the set,
 * e.g. per head with bh = b * H + head) -> out[bh * R * N + r * N + t] =
 * argmax(concat[x_t R_r, -x_t R_r]) + r * per_round, R_r the columns r*h .. r*h + h - 1.
 * Each thread takes blocks of rb tokens (rb a multiple of VW), transposed once into
 * a [D][rb]; a round's projections, transposed too (projT [h][rb]: a row per column, a lane
 * per token), come from 4-column products against it, and the argmax runs down the
 * columns with a token in each lane: no reduction across lanes (rows of 128 reduced along
 * the row took ~10 of a 23 ms hash at N = 16,384, B=1, H=4, 4 rounds).  Requires h a
 * multiple of 4.  Projections are summed in another order than a BLAS product's, so
 * near-ties may resolve differently (as they do between BLAS builds). */

/* First argmax of concat[x, -x] down the h rows of projT [h][ld] for the VW tokens of
 * columns t .. t + VW - 1, each lane on its own (strict comparisons keep a lane's first
 * maximum; the positive half wins a tie with the negative; a NaN never wins). */
static inline void lane_argmax(const float *projT, int64_t h, int64_t ld, int32_t *best) {
    vf mx = vload(projT), mn = mx;
    vi imx = (vi){0}, imn = (vi){0};
    for (int64_t c = 1; c < h; c++) {
        vf x = vload(projT + c * ld);
        vi gt = x > mx, lt = x < mn, cv = (vi){0} + (int32_t)c;
        mx = vselect(gt, x, mx);
        imx = (gt & cv) | (~gt & imx);
        mn = vselect(lt, x, mn);
        imn = (lt & cv) | (~lt & imn);
    }
    vi neg = mx < -mn;
    vi pick = (neg & (imn + (int32_t)h)) | (~neg & imx);
    memcpy(best, &pick, sizeof pick);
}

/* One block of rows (<= rb) of x: a [D][rb] and projT [h][rb] the thread's buffers, rot one
 * set of packed panels. */
static inline __attribute__((always_inline)) void hash_block(
    const float *xb, const float *rot, int64_t rows, int64_t D, int64_t R, int64_t h,
    int64_t per_round, int64_t N, int64_t *ob, float *a, float *projT, int64_t rb) {
    for (int64_t i = 0; i < rb; i++)
        for (int64_t d = 0; d < D; d++) a[d * rb + i] = i < rows ? xb[i * D + d] : 0.0f;
    float *as[1] = {a};
    int32_t best[VW];
    for (int64_t r = 0; r < R; r++) {
        for (int64_t c0 = 0; c0 < h; c0 += 4 * VW) {
            int64_t pw = h - c0 < 4 * VW ? h - c0 : 4 * VW;
            const float *panel = rot + r * D * h + c0 * D;
            for (int64_t c = 0; c < pw; c += 4)
                mm_rows4(1, (int)D, panel + c, 1, (int)pw, as, (int)rb, rb / VW,
                         projT + (c0 + c) * rb, (int)rb, 0);
        }
        for (int64_t t = 0; t < rows; t += VW) {
            lane_argmax(projT + t, h, rb, best);
            for (int64_t l = 0; l < VW && t + l < rows; l++) ob[r * N + t + l] = best[l] + r * per_round;
        }
    }
}

void effattn_lsh_hash_f32(const float *x, const float *rot, int64_t BH, int64_t N, int64_t D,
                          int64_t R, int64_t h, int64_t G, int64_t per_round, int64_t rb,
                          int64_t *out, int nthreads) {
    const int64_t blocks = (N + rb - 1) / rb, items = BH * blocks;
    /* the rotations in panels: [G][R][h / (4 VW) panels][D][up to 4 VW columns], each panel
     * contiguous (read in place, a panel's D rows lie R*h floats apart: at 2,048 columns 8 KB,
     * the same L1 sets for every row) */
    float *packed = aligned_alloc(64, sizeof(float) * G * D * R * h);
    for (int64_t g = 0; g < G; g++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t c0 = 0; c0 < h; c0 += 4 * VW) {
                int64_t pw = h - c0 < 4 * VW ? h - c0 : 4 * VW;
                float *dst = packed + (g * R + r) * D * h + c0 * D;
                for (int64_t d = 0; d < D; d++)
                    memcpy(dst + d * pw, rot + (g * D + d) * R * h + r * h + c0, sizeof(float) * pw);
            }
#pragma omp parallel num_threads(nthreads) if (items > 1)
    {
        float *a = aligned_alloc(64, sizeof(float) * rb * D);
        float *projT = aligned_alloc(64, sizeof(float) * h * rb);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t bh = it / blocks, t0 = (it % blocks) * rb;
            int64_t rows = N - t0 < rb ? N - t0 : rb;
            const float *rb_rot = packed + (G == 1 ? 0 : bh % G) * D * R * h;
            if (D == 64)
                hash_block(x + (bh * N + t0) * 64, rb_rot, rows, 64, R, h, per_round, N,
                           out + bh * R * N + t0, a, projT, rb);
            else
                hash_block(x + (bh * N + t0) * D, rb_rot, rows, D, R, h, per_round, N,
                           out + bh * R * N + t0, a, projT, rb);
        }
        free(a);
        free(projT);
    }
    free(packed);
}
