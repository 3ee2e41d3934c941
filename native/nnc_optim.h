// nnc_optim.h - optimizer updates over a contiguous range of fp32 parameters, in place.
//
// Semantics follow torch.optim exactly (same operation order, so results agree to fp32 rounding;
// the products are fused multiply-adds, SGD vectorized with AVX2 intrinsics):
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

template <bool kDecay, bool kMomentum, bool kNesterov, bool kFirst>
inline void sgd_sweep(float* p, const float* g, float* buf, int64_t n, float lr, float momentum, float dampening,
                      float weight_decay) {
    constexpr int64_t kChunk = 16384;  // floats per work item (64 KiB of each array)
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * kChunk;
        const int64_t end = begin + kChunk < n ? begin + kChunk : n;
        sgd_range<kDecay, kMomentum, kNesterov, kFirst>(p, g, buf, begin, end, lr, momentum, dampening, weight_decay);
    }
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

inline void adam_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                        float eps, float weight_decay, bool decoupled, int64_t step) {
    const float bc1 = 1.0f - std::pow(beta1, (float)step);
    const float bc2_sqrt = std::sqrt(1.0f - std::pow(beta2, (float)step));
    const float step_size = lr / bc1;
    const float decay = decoupled ? 1.0f - lr * weight_decay : 1.0f;
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        float d = g[i];
        float w = p[i];
        if (decoupled) w = w * decay;
        else if (weight_decay != 0.0f) d = d + weight_decay * w;
        const float mi = beta1 * m[i] + (1.0f - beta1) * d;
        const float vi = beta2 * v[i] + (1.0f - beta2) * d * d;
        m[i] = mi;
        v[i] = vi;
        const float denom = std::sqrt(vi) / bc2_sqrt + eps;
        p[i] = w - step_size * (mi / denom);
    }
}

}  // namespace nnc
