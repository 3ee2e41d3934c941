// nnc_vec.h - vectorized elementwise kernels, row softmax / log-softmax, normalizations and
// reductions over a contiguous axis. All loops are AVX2 with masked tails, and run OpenMP-parallel
// over rows (or chunks) when the work is large enough and no enclosing parallel region exists.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "nnc_math.h"
#include "nnc_math512.h"
#include "nnc_threads.h"

namespace nnc {

namespace detail {

// Elements of work below which a kernel stays on one thread.
constexpr long kParallelElems = 1L << 15;

inline int threads_for(long elems) { return elems >= kParallelElems ? usable_threads() : 1; }

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

// y = fn(x) for n elements, 8 at a time; the tail goes through fn with masked load / store.
template <typename VecFn>
inline void map_unary_range(const float* x, float* y, long begin, long end, VecFn fn) {
    long i = begin;
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(y + i, fn(_mm256_loadu_ps(x + i)));
    if (i < end) {
        const __m256i m = tail_mask(static_cast<int>(end - i));
        _mm256_maskstore_ps(y + i, m, fn(_mm256_maskload_ps(x + i, m)));
    }
}

template <typename VecFn>
inline void map_unary(const float* x, float* y, long n, VecFn fn) {
    const int threads = detail::threads_for(n);
    if (threads <= 1) {
        map_unary_range(x, y, 0, n, fn);  // no parallel region: small arrays are common
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        long begin, end;
        split_range(n, threads, thread_id(), 64, &begin, &end);
        map_unary_range(x, y, begin, end, fn);
    }
}

template <typename VecFn>
inline void map_binary_range(const float* a, const float* b, float* y, long begin, long end, VecFn fn) {
    long i = begin;
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(y + i, fn(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    if (i < end) {
        const __m256i m = tail_mask(static_cast<int>(end - i));
        _mm256_maskstore_ps(y + i, m, fn(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m)));
    }
}

template <typename VecFn>
inline void map_binary(const float* a, const float* b, float* y, long n, VecFn fn) {
    const int threads = detail::threads_for(n);
    if (threads <= 1) {
        map_binary_range(a, b, y, 0, n, fn);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        long begin, end;
        split_range(n, threads, thread_id(), 64, &begin, &end);
        map_binary_range(a, b, y, begin, end, fn);
    }
}

// y = act(x); the activation is dispatched once, outside the loop.
inline void activate(const float* x, float* y, long n, int act) {
    switch (act) {
        case ACT_RELU: map_unary(x, y, n, [](__m256 v) { return _mm256_max_ps(v, _mm256_setzero_ps()); }); break;
        case ACT_GELU_ERF: map_unary(x, y, n, [](__m256 v) { return gelu_erf_ps(v); }); break;
        case ACT_GELU_TANH: map_unary(x, y, n, [](__m256 v) { return gelu_tanh_ps(v); }); break;
        case ACT_TANH: map_unary(x, y, n, [](__m256 v) { return tanh_ps(v); }); break;
        case ACT_SIGMOID: map_unary(x, y, n, [](__m256 v) { return sigmoid_ps(v); }); break;
        case ACT_SILU: map_unary(x, y, n, [](__m256 v) { return _mm256_mul_ps(v, sigmoid_ps(v)); }); break;
        default: map_unary(x, y, n, [](__m256 v) { return v; }); break;
    }
}
inline void vexp(const float* x, float* y, long n) { map_unary(x, y, n, [](__m256 v) { return exp_ps(v); }); }
inline void vlog(const float* x, float* y, long n) { map_unary(x, y, n, [](__m256 v) { return log_ps(v); }); }
inline void vtanh(const float* x, float* y, long n) { map_unary(x, y, n, [](__m256 v) { return tanh_ps(v); }); }
inline void verf(const float* x, float* y, long n) { map_unary(x, y, n, [](__m256 v) { return erf_ps(v); }); }
inline void vsigmoid(const float* x, float* y, long n) { map_unary(x, y, n, [](__m256 v) { return sigmoid_ps(v); }); }

// y = scale * x + shift
inline void vaffine(const float* x, float* y, long n, float scale, float shift) {
    const __m256 s = _mm256_set1_ps(scale), t = _mm256_set1_ps(shift);
    map_unary(x, y, n, [s, t](__m256 v) { return _mm256_fmadd_ps(v, s, t); });
}
inline void vadd(const float* a, const float* b, float* y, long n) { map_binary(a, b, y, n, [](__m256 u, __m256 v) { return _mm256_add_ps(u, v); }); }
inline void vsub(const float* a, const float* b, float* y, long n) { map_binary(a, b, y, n, [](__m256 u, __m256 v) { return _mm256_sub_ps(u, v); }); }
inline void vmul(const float* a, const float* b, float* y, long n) { map_binary(a, b, y, n, [](__m256 u, __m256 v) { return _mm256_mul_ps(u, v); }); }
inline void vdiv(const float* a, const float* b, float* y, long n) { map_binary(a, b, y, n, [](__m256 u, __m256 v) { return _mm256_div_ps(u, v); }); }

// ---------------------------------------------------------------------------------------------
// Row primitives (one contiguous row of n floats)
// ---------------------------------------------------------------------------------------------

inline float row_max(const float* x, long n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    float m = hmax_ps(_mm256_max_ps(m0, m1));
    for (; i < n; ++i) m = std::max(m, x[i]);
    return m;
}

inline float row_sum(const float* x, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + i + 24));
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
    if (i < n) s1 = _mm256_add_ps(s1, _mm256_maskload_ps(x + i, tail_mask(static_cast<int>(n - i))));
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// y = exp(x - shift), returns sum(y). y may alias x.
inline float row_exp_shift_sum(const float* x, float* y, long n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 s = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(y + i, e);
        s = _mm256_add_ps(s, e);
    }
    if (i < n) {
        const __m256i m = tail_mask(static_cast<int>(n - i));
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), sh));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(y + i, m, e);
        s = _mm256_add_ps(s, e);
    }
    return hsum_ps(s);
}

// sum(exp(x - shift)) over one row, two vectors per step (the exp polynomials of both overlap).
inline float row_sum_exp_shift(const float* x, long n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_ps(s0, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
        s1 = _mm256_add_ps(s1, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sh)));
    }
    if (i + 8 <= n) {
        s0 = _mm256_add_ps(s0, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
        i += 8;
    }
    if (i < n) {
        const __m256i m = tail_mask(static_cast<int>(n - i));
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), sh));
        s1 = _mm256_add_ps(s1, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
    }
    return hsum_ps(_mm256_add_ps(s0, s1));
}

// y = x * scale + shift over one row (y may alias x).
inline void row_affine(const float* x, float* y, long n, float scale, float shift) {
    const __m256 s = _mm256_set1_ps(scale), t = _mm256_set1_ps(shift);
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), s, t));
    if (i < n) {
        const __m256i m = tail_mask(static_cast<int>(n - i));
        _mm256_maskstore_ps(y + i, m, _mm256_fmadd_ps(_mm256_maskload_ps(x + i, m), s, t));
    }
}

// Numerically stable softmax of one row (y may alias x). A row of all -inf gives NaN, like torch.
inline void softmax_row(const float* x, float* y, long n) {
    const float m = row_max(x, n);
    const float s = row_exp_shift_sum(x, y, n, m);
    row_affine(y, y, n, 1.0f / s, 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Row-wise kernels over [rows, n] (contiguous rows)
// ---------------------------------------------------------------------------------------------

inline void softmax_rows(const float* x, float* y, long rows, long n) {
    const int threads = detail::threads_for(rows * n);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long r = 0; r < rows; ++r) softmax_row(x + r * n, y + r * n, n);
}

// log_softmax(x) = x - max - log(sum(exp(x - max))).
inline void log_softmax_rows(const float* x, float* y, long rows, long n) {
    const int threads = detail::threads_for(rows * n);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* tmp = thread_scratch(SCRATCH_ROW, static_cast<size_t>(n) + 8);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const float* xr = x + r * n;
            const float m = row_max(xr, n);
            const float s = row_exp_shift_sum(xr, tmp, n, m);
            row_affine(xr, y + r * n, n, 1.0f, -(m + std::log(s)));
        }
    }
}

// Layer norm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta
// (biased variance, two-pass). gamma / beta may be null (no affine). mean_out / rstd_out, when
// given, receive the per-row statistics for the backward pass.
inline void layer_norm(const float* x, float* y, long rows, long n, const float* gamma, const float* beta, float eps,
                       float* mean_out = nullptr, float* rstd_out = nullptr) {
    const int threads = detail::threads_for(rows * n);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float* yr = y + r * n;
        const float mean = row_sum(xr, n) / static_cast<float>(n);
        const __m256 mv = _mm256_set1_ps(mean);
        __m256 acc = _mm256_setzero_ps();
        long i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), mv);
            acc = _mm256_fmadd_ps(d, d, acc);
        }
        float var = hsum_ps(acc);
        for (; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
        var /= static_cast<float>(n);
        const float rstd = 1.0f / std::sqrt(var + eps);
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = rstd;
        const __m256 rs = _mm256_set1_ps(rstd);
        i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv), rs);
            if (gamma) v = _mm256_mul_ps(v, _mm256_loadu_ps(gamma + i));
            if (beta) v = _mm256_add_ps(v, _mm256_loadu_ps(beta + i));
            _mm256_storeu_ps(yr + i, v);
        }
        for (; i < n; ++i) {
            float v = (xr[i] - mean) * rstd;
            if (gamma) v *= gamma[i];
            if (beta) v += beta[i];
            yr[i] = v;
        }
    }
}

// Per-channel affine on NCHW-like data [outer, channels, inner]: y = act(x * scale[c] + shift[c]).
inline void channel_affine(const float* x, float* y, long outer, long channels, long inner, const float* scale,
                           const float* shift, int act = ACT_NONE) {
    const long planes = outer * channels;
    const int threads = detail::threads_for(planes * inner);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long p = 0; p < planes; ++p) {
        const long c = p % channels;
        const __m256 s = _mm256_set1_ps(scale ? scale[c] : 1.0f);
        const __m256 t = _mm256_set1_ps(shift ? shift[c] : 0.0f);
        const float* xp = x + p * inner;
        float* yp = y + p * inner;
        long i = 0;
        for (; i + 8 <= inner; i += 8) {
            _mm256_storeu_ps(yp + i, activate_ps(_mm256_fmadd_ps(_mm256_loadu_ps(xp + i), s, t), act));
        }
        if (i < inner) {
            const __m256i m = tail_mask(static_cast<int>(inner - i));
            _mm256_maskstore_ps(yp + i, m, activate_ps(_mm256_fmadd_ps(_mm256_maskload_ps(xp + i, m), s, t), act));
        }
    }
}

// Batch norm with running statistics (inference): y = (x - mean[c]) / sqrt(var[c] + eps) * gamma[c]
// + beta[c] on [N, C, inner], folded into one scale/shift per channel; optional fused activation.
inline void batch_norm_inference(const float* x, float* y, long N, long C, long inner, const float* mean,
                                 const float* var, const float* gamma, const float* beta, float eps,
                                 int act = ACT_NONE) {
    float* scale = thread_scratch(SCRATCH_MISC, static_cast<size_t>(2 * C) + 8);
    float* shift = scale + C;
    for (long c = 0; c < C; ++c) {
        const float s = (gamma ? gamma[c] : 1.0f) / std::sqrt(var[c] + eps);
        scale[c] = s;
        shift[c] = (beta ? beta[c] : 0.0f) - mean[c] * s;
    }
    channel_affine(x, y, N, C, inner, scale, shift, act);
}

// ---------------------------------------------------------------------------------------------
// Reductions over one axis of a [outer, n, inner] array (inner == 1: the last, contiguous axis)
// ---------------------------------------------------------------------------------------------

enum Reduce : int { REDUCE_SUM = 0, REDUCE_MEAN = 1, REDUCE_MAX = 2 };

inline void reduce_axis(const float* x, float* y, long outer, long n, long inner, int op) {
    const int threads = detail::threads_for(outer * n * inner);
    const float mean_scale = 1.0f / static_cast<float>(std::max(n, 1L));
    if (inner == 1) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (long o = 0; o < outer; ++o) {
            const float* xr = x + o * n;
            float v = op == REDUCE_MAX ? row_max(xr, n) : row_sum(xr, n);
            y[o] = op == REDUCE_MEAN ? v * mean_scale : v;
        }
        return;
    }
    // Strided axis: accumulate whole inner rows (vectorized over inner), one output row per outer.
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long o = 0; o < outer; ++o) {
        const float* xo = x + o * n * inner;
        float* yo = y + o * inner;
        long i = 0;
        for (; i < inner; i += 32) {
            const int width = static_cast<int>(std::min(32L, inner - i));
            __m256i masks[4];
            for (int v = 0; v < 4; ++v) masks[v] = tail_mask(std::max(0, std::min(8, width - 8 * v)));
            const __m256 init = op == REDUCE_MAX ? _mm256_set1_ps(-INFINITY) : _mm256_setzero_ps();
            __m256 acc[4] = {init, init, init, init};
            for (long k = 0; k < n; ++k) {
                const float* row = xo + k * inner + i;
                for (int v = 0; v < 4; ++v) {
                    if (8 * v >= width) break;
                    const __m256 val = _mm256_maskload_ps(row + 8 * v, masks[v]);
                    acc[v] = op == REDUCE_MAX ? _mm256_max_ps(acc[v], val) : _mm256_add_ps(acc[v], val);
                }
            }
            for (int v = 0; v < 4; ++v) {
                if (8 * v >= width) break;
                __m256 out = op == REDUCE_MEAN ? _mm256_mul_ps(acc[v], _mm256_set1_ps(mean_scale)) : acc[v];
                _mm256_maskstore_ps(yo + i + 8 * v, masks[v], out);
            }
        }
    }
}

}  // namespace nnc
