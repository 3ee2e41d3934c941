// nnc_optim.cuh - optimizer updates on the device, fp32, in place: the semantics and operation order
// of native/nnc_optim.h (torch.optim), one thread per parameter element.
#pragma once

#include "nnc_cuda.cuh"

namespace nnc {
namespace cuda {

// one element of the sgd update (p, buf in place)
NNC_HD void sgd_element(float& p, float g, float* buf, float lr, float momentum, float dampening, float weight_decay,
                        bool nesterov, bool first) {
    float d = g;
    if (weight_decay != 0.0f) d = d + weight_decay * p;
    if (momentum != 0.0f) {
        const float b = first ? d : momentum * *buf + (1.0f - dampening) * d;
        *buf = b;
        d = nesterov ? d + momentum * b : b;
    }
    p = p - lr * d;
}

// one element of the adam / adamw update (step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t))
NNC_HD void adam_element(float& p, float g, float& m, float& v, float step_size, float bc2_sqrt, float beta1, float beta2,
                         float eps, float weight_decay, float decay, bool decoupled) {
    float d = g;
    float w = p;
    if (decoupled) w = w * decay;
    else if (weight_decay != 0.0f) d = d + weight_decay * w;
    const float mi = beta1 * m + (1.0f - beta1) * d;
    const float vi = beta2 * v + (1.0f - beta2) * d * d;
    m = mi;
    v = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p = w - step_size * (mi / denom);
}

// the per-step scalars of adam / adamw (as native/nnc_optim.h computes them)
struct AdamScalars {
    float step_size, bc2_sqrt, decay;
};
inline AdamScalars adam_scalars(float lr, float beta1, float beta2, float weight_decay, bool decoupled, long long step) {
    const float bc1 = 1.0f - powf(beta1, (float)step);
    return AdamScalars{lr / bc1, sqrtf(1.0f - powf(beta2, (float)step)), decoupled ? 1.0f - lr * weight_decay : 1.0f};
}

__global__ void sgd_kernel(float* p, const float* g, float* buf, long long n, float lr, float momentum,
                           float dampening, float weight_decay, bool nesterov, bool first) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        sgd_element(p[i], g[i], momentum != 0.0f ? buf + i : nullptr, lr, momentum, dampening, weight_decay, nesterov, first);
}

__global__ void adam_kernel(float* p, const float* g, float* m, float* v, long long n, float step_size, float bc2_sqrt,
                            float beta1, float beta2, float eps, float weight_decay, float decay, bool decoupled) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        adam_element(p[i], g[i], m[i], v[i], step_size, bc2_sqrt, beta1, beta2, eps, weight_decay, decay, decoupled);
}

// gradient accumulation: acc = g0 + g1 + ..., then the mean (acc / parts, as the CPU trainer divides)
__global__ void accumulate_kernel(float* acc, const float* g, long long n, bool first) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        acc[i] = first ? g[i] : acc[i] + g[i];
}

__global__ void divide_kernel(float* dst, const float* src, long long n, float divisor) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i] / divisor;
}

}  // namespace cuda
}  // namespace nnc
