// nnc_optim.h - optimizer updates over a contiguous range of fp32 parameters, in place.
//
// Semantics follow torch.optim exactly (same operation order, so results agree to fp32 rounding):
//   sgd:  g += wd*p; buf = first ? g : momentum*buf + (1-dampening)*g; g = nesterov ? g + momentum*buf : buf;
//         p -= lr*g                                     (momentum == 0: p -= lr*g with no buffer)
//   adam: g += wd*p (adam) | p *= 1 - lr*wd (adamw); m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
//         p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
#pragma once

#include <cmath>
#include <cstdint>

namespace nnc {

inline void sgd_update(float* p, const float* g, float* buf, int64_t n, float lr, float momentum, float dampening,
                       float weight_decay, bool nesterov, bool first) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        float d = g[i];
        if (weight_decay != 0.0f) d = d + weight_decay * p[i];
        if (momentum != 0.0f) {
            const float b = first ? d : momentum * buf[i] + (1.0f - dampening) * d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[i] = p[i] - lr * d;
    }
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
