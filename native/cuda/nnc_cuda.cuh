// nnc_cuda.cuh - device helpers shared by the generated CUDA kernels (nncompile --target cuda).
//
// Scalar math (the same formulas as the NumPy reference: erf-GELU, tanh-GELU, sigmoid), the dropout
// hash (bit-identical to the C++ backend and the interpreter), block reductions, and the launch
// geometry of grid-stride loops. Everything here is header-only; the generated kernels.cu includes it.
#pragma once

#if defined(NNC_CUDA_HOST_EMULATION)
#include "nnc_host_emulation.h"
#define NNC_LAUNCH(kernel, grid, block, shared, stream) nnc_emu_make_launch(kernel, grid, block)
#define NNC_DYNAMIC_SHARED(type, name) type* name = (type*)nnc_emu_shared
#else
#include <cuda_runtime.h>
#define NNC_LAUNCH(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#define NNC_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
#include <cstdint>
#include <cmath>

namespace nnc {
namespace cuda {

constexpr int kBlock = 256;

// Helpers and functors that are also host code: tests/cuda/host_check.cu runs them on the CPU
// (the index math of the implicit GEMMs, the dropout hash, the optimizer updates).
#if defined(NNC_CUDA_HOST_EMULATION)
#define NNC_HD inline
#else
#define NNC_HD __host__ __device__ __forceinline__
#endif

// Blocks for a grid-stride loop over n elements (capped: each thread loops).
inline unsigned grid_for(int64_t n, int block = kBlock) {
    int64_t blocks = (n + block - 1) / block;
    if (blocks < 1) blocks = 1;
    if (blocks > 65535LL * 8) blocks = 65535LL * 8;
    return static_cast<unsigned>(blocks);
}

NNC_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
NNC_HD float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
NNC_HD float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
NNC_HD float fmax_nan(float a, float b) { return (b > a || b != b) ? b : a; }

NNC_HD uint32_t dropout_hash(uint32_t seed, uint32_t i) {
    uint32_t h = i * 0x9E3779B1u + seed * 0x85EBCA77u + 0x165667B1u;
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

// Block-wide reductions (blockDim.x a multiple of 32, <= 1024). Every thread gets the result.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <class T>
__device__ T block_sum(T v) {
    __shared__ T part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    T total = lane < warps ? part[lane] : T(0);
    return warp_sum(total);
}

__device__ inline float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float total = lane < warps ? part[lane] : -INFINITY;
    return warp_max(total);
}


}  // namespace cuda
}  // namespace nnc
