/* effattn native kernels (C99, optionally OpenMP), loaded with ctypes by
 * effattn/native/__init__.py.  Every function has a pure-torch twin that gives the same
 * result; these only take fewer passes over memory. */
#include <stdint.h>

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
