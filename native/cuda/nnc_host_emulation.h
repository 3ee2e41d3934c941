// nnc_host_emulation.h - compile a generated kernels.cu as plain C++ on the CPU (tests, no GPU).
//
// With -DNNC_CUDA_HOST_EMULATION (g++ -x c++ -pthread), every kernel launch runs on CPU threads: one
// or two blocks of blockDim real threads each (see nnc_emu_launch), with barriers for __syncthreads
// and an exchange buffer for warp shuffles; GEMMs run gemm_tiled_host (the GPU kernel's phases,
// thread after thread, over the same loaders and epilogue); the CUDA API calls of the host function
// become memset / memcpy. tests/cuda/test_cuda_emulated.py checks generated modules against the
// interpreter this way. Not modelled: warp-synchronous timing, memory-ordering races that real
// threads happen not to show, the TF32 kernel.
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
#define __syncwarp()

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// Each launch runs its blocks one after another (at most 2 of them, of at most 64 threads: every
// kernel loops over its work with gridDim / blockDim strides), each block as real threads: __syncthreads is a barrier, __shared__
// variables are shared by the block's threads, warp shuffles go through a block-wide exchange buffer
// (every kernel calls them with all threads of the block, as the hardware requires).
struct nnc_emu_dim3 { unsigned x, y, z; };
inline thread_local nnc_emu_dim3 threadIdx = {0, 0, 0};
inline thread_local nnc_emu_dim3 blockIdx = {0, 0, 0};
inline nnc_emu_dim3 blockDim = {1, 1, 1};
inline nnc_emu_dim3 gridDim = {1, 1, 1};

struct nnc_emu_barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned count, waiting = 0, generation = 0;
    explicit nnc_emu_barrier(unsigned n) : count(n) {}
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        const unsigned g = generation;
        if (++waiting == count) {
            waiting = 0;
            ++generation;
            cv.notify_all();
        } else {
            cv.wait(lock, [&] { return g != generation; });
        }
    }
};
inline nnc_emu_barrier* nnc_emu_block_barrier = nullptr;
inline void __syncthreads() { nnc_emu_block_barrier->wait(); }

inline double nnc_emu_exchange[1024];
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const unsigned t = threadIdx.x;
    nnc_emu_exchange[t] = (double)v;
    __syncthreads();
    const T r = (T)nnc_emu_exchange[t ^ (unsigned)lane_mask];
    __syncthreads();
    return r;
}

template <class F>
struct nnc_emu_launch {
    F* kernel;
    unsigned grid, block;
    template <class... A>
    void operator()(A... args) const {
        // kernels stride over their work with gridDim and blockDim, so a smaller launch computes the
        // same: at most 2 blocks of at most 64 threads (two warps) keep the emulation quick
        gridDim = {grid < 2 ? grid : 2, 1, 1};
        blockDim = {block < 64 ? block : 64, 1, 1};
        const unsigned block = blockDim.x;
        for (unsigned b = 0; b < gridDim.x; ++b) {
            nnc_emu_barrier barrier(block);
            nnc_emu_block_barrier = &barrier;
            std::vector<std::thread> threads;
            threads.reserve(block);
            for (unsigned t = 0; t < block; ++t)
                threads.emplace_back([=] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {b, 0, 0};
                    kernel(args...);
                });
            for (auto& th : threads) th.join();
        }
    }
};
template <class F>
inline nnc_emu_launch<F> nnc_emu_make_launch(F* kernel, long long grid, long long block) {
    return nnc_emu_launch<F>{kernel, (unsigned)grid, (unsigned)block};
}

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
