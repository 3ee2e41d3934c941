// nnc_optim.h - optimizer updates over a contiguous range of fp32 parameters, in place.
//
// Semantics follow torch.optim exactly (same operation order, so results agree to fp32 rounding;
// the products are fused multiply-adds; both sweeps vectorized with AVX2 intrinsics):
//   sgd:  g += wd*p; buf = first ? g : momentum*buf + (1-dampening)*g; g = nesterov ? g + momentum*buf : buf;
//         p -= lr*g                                     (momentum == 0: p -= lr*g with no buffer)
//   adam: g += wd*p (adam) | p *= 1 - lr*wd (adamw); m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
//         p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace nnc {

namespace optim_detail {

// One range of the SGD sweep, the flags fixed at compile time: AVX2 vectors of 8, then a scalar
// tail with the same fused multiply-adds (so every element rounds the same way).
template <bool kDecay, bool kMomentum, bool kNesterov, bool kFirst>
inline void sgd_range(float* p, const float* g, float* buf, int64_t begin, int64_t end, float lr, float momentum,
                      float dampening, float weight_decay) {
    const float keep = 1.0f - dampening;
    const __m256 v_lr = _mm256_set1_ps(lr), v_mom = _mm256_set1_ps(momentum);
    const __m256 v_keep = _mm256_set1_ps(keep), v_wd = _mm256_set1_ps(weight_decay);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 w = _mm256_loadu_ps(p + i);
        __m256 d = _mm256_loadu_ps(g + i);
        if (kDecay) d = _mm256_fmadd_ps(v_wd, w, d);
        if (kMomentum) {
            const __m256 b = kFirst ? d : _mm256_fmadd_ps(v_mom, _mm256_loadu_ps(buf + i), _mm256_mul_ps(v_keep, d));
            _mm256_storeu_ps(buf + i, b);
            d = kNesterov ? _mm256_fmadd_ps(v_mom, b, d) : b;
        }
        _mm256_storeu_ps(p + i, _mm256_fnmadd_ps(v_lr, d, w));
    }
    for (; i < end; ++i) {
        const float w = p[i];
        float d = g[i];
        if (kDecay) d = std::fma(weight_decay, w, d);
        if (kMomentum) {
            const float b = kFirst ? d : std::fma(momentum, buf[i], keep * d);
            buf[i] = b;
            d = kNesterov ? std::fma(momentum, b, d) : b;
        }
        p[i] = std::fma(-lr, d, w);
    }
}

// range(begin, end) over [0, n) in chunks of 16384 floats (64 KiB of each array), on the threads when n is large
template <class Range>
inline void chunked_sweep(int64_t n, const Range& range) {
    constexpr int64_t kChunk = 16384;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t c = 0; c < chunks; ++c) range(c * kChunk, c * kChunk + kChunk < n ? c * kChunk + kChunk : n);
}

template <bool kDecay, bool kMomentum, bool kNesterov, bool kFirst>
inline void sgd_sweep(float* p, const float* g, float* buf, int64_t n, float lr, float momentum, float dampening,
                      float weight_decay) {
    chunked_sweep(n, [&](int64_t begin, int64_t end) {
        sgd_range<kDecay, kMomentum, kNesterov, kFirst>(p, g, buf, begin, end, lr, momentum, dampening, weight_decay);
    });
}

}  // namespace optim_detail

inline void sgd_update(float* p, const float* g, float* buf, int64_t n, float lr, float momentum, float dampening,
                       float weight_decay, bool nesterov, bool first) {
    using namespace optim_detail;
    const bool decay = weight_decay != 0.0f;
    if (momentum == 0.0f) {
        if (decay) sgd_sweep<true, false, false, false>(p, g, buf, n, lr, momentum, dampening, weight_decay);
        else sgd_sweep<false, false, false, false>(p, g, buf, n, lr, momentum, dampening, weight_decay);
        return;
    }
    // the 8 momentum variants: (decay, nesterov, first)
    using Sweep = void (*)(float*, const float*, float*, int64_t, float, float, float, float);
    static constexpr Sweep kSweeps[8] = {
        sgd_sweep<false, true, false, false>, sgd_sweep<false, true, false, true>,
        sgd_sweep<false, true, true, false>,  sgd_sweep<false, true, true, true>,
        sgd_sweep<true, true, false, false>,  sgd_sweep<true, true, false, true>,
        sgd_sweep<true, true, true, false>,   sgd_sweep<true, true, true, true>};
    kSweeps[(decay ? 4 : 0) + (nesterov ? 2 : 0) + (first ? 1 : 0)](p, g, buf, n, lr, momentum, dampening,
                                                                      weight_decay);
}

namespace optim_detail {

// One range of the Adam / AdamW sweep: AVX2 vectors of 8, then a scalar tail with the same fused
// multiply-adds, square root and division (so every element rounds the same way).
template <bool kDecoupled, bool kDecay>
inline void adam_range(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end, float beta1,
                       float beta2, float eps, float weight_decay, float decay, float bc2_sqrt, float step_size) {
    const float k1 = 1.0f - beta1, k2 = 1.0f - beta2;
    const __m256 v_b1 = _mm256_set1_ps(beta1), v_b2 = _mm256_set1_ps(beta2), v_k1 = _mm256_set1_ps(k1);
    const __m256 v_k2 = _mm256_set1_ps(k2), v_eps = _mm256_set1_ps(eps), v_wd = _mm256_set1_ps(weight_decay);
    const __m256 v_decay = _mm256_set1_ps(decay), v_bc2 = _mm256_set1_ps(bc2_sqrt);
    const __m256 v_step = _mm256_set1_ps(step_size);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        __m256 d = _mm256_loadu_ps(g + i);
        __m256 w = _mm256_loadu_ps(p + i);
        if (kDecoupled) w = _mm256_mul_ps(w, v_decay);
        else if (kDecay) d = _mm256_fmadd_ps(v_wd, w, d);
        const __m256 mi = _mm256_fmadd_ps(v_b1, _mm256_loadu_ps(m + i), _mm256_mul_ps(v_k1, d));
        const __m256 vi = _mm256_fmadd_ps(v_b2, _mm256_loadu_ps(v + i), _mm256_mul_ps(_mm256_mul_ps(v_k2, d), d));
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), v_bc2), v_eps);
        _mm256_storeu_ps(p + i, _mm256_fnmadd_ps(v_step, _mm256_div_ps(mi, denom), w));
    }
    for (; i < end; ++i) {
        float d = g[i];
        float w = p[i];
        if (kDecoupled) w = w * decay;
        else if (kDecay) d = std::fma(weight_decay, w, d);
        const float mi = std::fma(beta1, m[i], k1 * d);
        const float vi = std::fma(beta2, v[i], (k2 * d) * d);
        m[i] = mi;
        v[i] = vi;
        const float denom = std::sqrt(vi) / bc2_sqrt + eps;
        p[i] = std::fma(-step_size, mi / denom, w);
    }
}

template <bool kDecoupled, bool kDecay>
inline void adam_sweep(float* p, const float* g, float* m, float* v, int64_t n, float beta1, float beta2, float eps,
                       float weight_decay, float decay, float bc2_sqrt, float step_size) {
    chunked_sweep(n, [&](int64_t begin, int64_t end) {
        adam_range<kDecoupled, kDecay>(p, g, m, v, begin, end, beta1, beta2, eps, weight_decay, decay, bc2_sqrt,
                                       step_size);
    });
}

}  // namespace optim_detail

inline void adam_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                        float eps, float weight_decay, bool decoupled, int64_t step) {
    using namespace optim_detail;
    const float bc1 = 1.0f - std::pow(beta1, (float)step);
    const float bc2_sqrt = std::sqrt(1.0f - std::pow(beta2, (float)step));
    const float step_size = lr / bc1;
    const float decay = decoupled ? 1.0f - lr * weight_decay : 1.0f;
    if (decoupled) {
        adam_sweep<true, false>(p, g, m, v, n, beta1, beta2, eps, weight_decay, decay, bc2_sqrt, step_size);
    } else if (weight_decay != 0.0f) {
        adam_sweep<false, true>(p, g, m, v, n, beta1, beta2, eps, weight_decay, decay, bc2_sqrt, step_size);
    } else {
        adam_sweep<false, false>(p, g, m, v, n, beta1, beta2, eps, weight_decay, decay, bc2_sqrt, step_size);
    }
}

}  // namespace nnc
