// nnc_optim.cuh - optimizer updates on the device, fp32, in place: the semantics and operation order
// of native/nnc_optim.h (torch.optim), one thread per parameter element.
#pragma once

#include "nnc_cuda.cuh"

namespace nnc {
namespace cuda {

__global__ void sgd_kernel(float* p, const float* g, float* buf, long long n, float lr, float momentum,
                           float dampening, float weight_decay, bool nesterov, bool first) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
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

__global__ void adam_kernel(float* p, const float* g, float* m, float* v, long long n, float step_size, float bc2_sqrt,
                            float beta1, float beta2, float eps, float weight_decay, float decay, bool decoupled) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float d = g[i];
        float w = p[i];
        if (decoupled) w = w * decay;
        else if (weight_decay != 0.0f) d = d + weight_decay * w;
        const float mi = beta1 * m[i] + (1.0f - beta1) * d;
        const float vi = beta2 * v[i] + (1.0f - beta2) * d * d;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = w - step_size * (mi / denom);
    }
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
