// nnc_host_emulation.h - compile a generated kernels.cu as plain C++ on the CPU (tests, no GPU).
//
// With -DNNC_CUDA_HOST_EMULATION (g++ -x c++), every kernel runs as ONE thread of ONE block: the
// grid-stride and block-per-row loops then visit every element in turn, block reductions return the
// thread's own value, GEMMs run as plain loops over the same loaders and epilogue, and the CUDA API
// calls the host function makes become memset / memcpy. This checks the generated index math and
// arithmetic of every kernel against the interpreter (tests/cuda/test_cuda_emulated.py); it says
// nothing about races, synchronization or the tiling of the GPU GEMM.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct nnc_emu_dim3 { unsigned x, y, z; };
static const nnc_emu_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
inline void __syncthreads() {}

typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t = nullptr) { std::memset(p, value, n); return 0; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
    std::memmove(d, s, n);
    return 0;
}
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t dpitch, const void* s, size_t spitch, size_t width, size_t height,
                                     cudaMemcpyKind, cudaStream_t = nullptr) {
    for (size_t r = 0; r < height; ++r) std::memmove((char*)d + r * dpitch, (const char*)s + r * spitch, width);
    return 0;
}
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return 0; }
inline float atomicAdd(float* p, float v) { const float old = *p; *p += v; return old; }
using std::max;
using std::min;

// dynamic shared memory of the one running block
static float nnc_emu_shared[1 << 16];
