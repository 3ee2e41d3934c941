// nnc_gemm.cuh - the tiled fp32 GEMM of the CUDA target, and the implicit-GEMM convolutions built on it.
//
//   C[z](m, n) = epilogue(alpha * sum_k A[z](m, k) * B[z](k, n) + beta * C[z](m, n))
//   epilogue:  (+ col_bias[n] | + row_bias[m]) -> activation -> + residual (same index as C)
//
// One kernel template, parameterized by the tile shape and by three functors: the A and B loaders
// (element (row, col) of batch z, zero outside) and the store. Plain strided matrices use ``Strided``;
// the convolutions (forward, input gradient, weight gradient) use loaders that compute the im2col
// element on the fly (implicit GEMM), so no column buffer is ever written.
//
// Tiling: a block of 256 threads computes a BM x BN tile of C, staging BK-deep slices of A and B in
// shared memory (stored k-major, padded against bank conflicts); each thread keeps a TM x TN register
// tile (rows ty + 16 i, columns tx + 16 j) and does TM*TN FMAs per shared-memory load pair.
// 128x128 tiles (8x8 per thread) for large problems, 64x64 (4x4) for small ones.
//
// NNC_CUDA_TF32 (compile flag) switches the inner product of large tiles to TF32 tensor cores
// through WMMA (sm_80+); the default is exact fp32 FMA.
#pragma once

#include "nnc_cuda.cuh"
#if defined(NNC_CUDA_TF32) && !defined(NNC_CUDA_HOST_EMULATION)
#include <mma.h>
#endif

namespace nnc {
namespace cuda {

enum Act { ACT_NONE = 0, ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_SILU, ACT_GELU_ERF, ACT_GELU_TANH };

struct Epilogue {
    float alpha = 1.0f;
    float beta = 0.0f;
    const float* col_bias = nullptr;   // [N], added to every row
    const float* row_bias = nullptr;   // [M] (per batch z: row_bias + z * row_bias_stride)
    long long row_bias_stride = 0;
    const float* residual = nullptr;   // read at the same index as C
    int act = ACT_NONE;

    NNC_HD float apply(float acc, float old, int z, int m, int n, long long index) const {
        float v = alpha * acc;
        if (beta != 0.0f) v += beta * old;
        if (col_bias) v += col_bias[n];
        if (row_bias) v += row_bias[z * row_bias_stride + m];
        switch (act) {
            case ACT_RELU: v = v > 0.0f ? v : 0.0f; break;
            case ACT_TANH: v = tanhf(v); break;
            case ACT_SIGMOID: v = sigmoid(v); break;
            case ACT_SILU: v = v * sigmoid(v); break;
            case ACT_GELU_ERF: v = gelu_erf(v); break;
            case ACT_GELU_TANH: v = gelu_tanh(v); break;
            default: break;
        }
        if (residual) v += residual[index];
        return v;
    }
};

// A plain (optionally transposed) matrix per batch: element (r, c) of the logical matrix.
struct Strided {
    const float* p;
    long long ld;          // leading dimension of the stored matrix
    long long batch;       // elements between batches (0: shared)
    bool trans;            // stored as the transpose of the logical matrix
    NNC_HD float operator()(int z, int r, int c) const {
        const float* q = p + z * batch;
        return trans ? q[(long long)c * ld + r] : q[(long long)r * ld + c];
    }
    // true when consecutive logical columns are adjacent in memory (load order for coalescing)
    NNC_HD bool col_fast() const { return !trans; }
};

struct StoreC {
    float* c;
    long long ldc;
    long long batch;
    Epilogue e;
    NNC_HD void operator()(int z, int m, int n, float acc) const {
        const long long index = z * batch + (long long)m * ldc + n;
        c[index] = e.apply(acc, e.beta != 0.0f ? c[index] : 0.0f, z, m, n, index);
    }
};

// The fp32 tiled kernel in three per-thread phases (load a BK slice of A and B into the tile, multiply
// the slice into the thread's TM x TN registers, store): the GPU kernel runs them with __syncthreads()
// in between; gemm_tiled_host runs them thread after thread, so the tiling itself is testable on a CPU.
template <int BM, int BN, int BK>
struct GemmTile {
    float As[BK][BM + 4];   // k-major, padded against bank conflicts
    float Bs[BK][BN + 4];
};

template <int BM, int BN, int BK, class LA, class LB>
NNC_HD void gemm_load(GemmTile<BM, BN, BK>& t, int tid, int z, int m0, int n0, int k0, int M, int N, int K,
                      const LA& la, const LB& lb) {
    const bool a_k_fast = la.col_fast();    // A(m, k): consecutive threads walk k when k is contiguous
    const bool b_n_fast = lb.col_fast();    // B(k, n): ... walk n when n is contiguous
#pragma unroll
    for (int i = 0; i < (BM * BK) / 256; ++i) {
        const int idx = tid + i * 256;
        const int mm = a_k_fast ? idx / BK : idx % BM;
        const int kk = a_k_fast ? idx % BK : idx / BM;
        const int m = m0 + mm, k = k0 + kk;
        t.As[kk][mm] = (m < M && k < K) ? la(z, m, k) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < (BN * BK) / 256; ++i) {
        const int idx = tid + i * 256;
        const int nn = b_n_fast ? idx % BN : idx / BK;
        const int kk = b_n_fast ? idx / BN : idx % BK;
        const int n = n0 + nn, k = k0 + kk;
        t.Bs[kk][nn] = (n < N && k < K) ? lb(z, k, n) : 0.0f;
    }
}

template <int BM, int BN, int BK, int TM, int TN>
NNC_HD void gemm_multiply(const GemmTile<BM, BN, BK>& t, int tid, float (&acc)[TM][TN]) {
    const int tx = tid % 16, ty = tid / 16;   // rows ty + 16 i, columns tx + 16 j
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = t.As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = t.Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

template <int TM, int TN, class ST>
NNC_HD void gemm_store(int tid, int z, int m0, int n0, int M, int N, const float (&acc)[TM][TN], const ST& st) {
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n < N) st(z, m, n, acc[i][j]);
        }
    }
}

// the tile shape gemm_launch picks: 128x128 (8x8 per thread) when there are enough such tiles
NNC_HD bool gemm_big_tiles(int M, int N, int batches) {
    return (long long)((M + 127) / 128) * ((N + 127) / 128) * batches >= 64;
}

// The GPU kernel's arithmetic on the CPU: every block, thread after thread per phase.
template <int BM, int BN, int BK, int TM, int TN, class LA, class LB, class ST>
inline void gemm_tiled_host(int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) {
    static_assert(BM == 16 * TM && BN == 16 * TN, "16 x 16 threads, TM x TN each");
    static GemmTile<BM, BN, BK> tile;
    static float acc[256][TM][TN];
    for (int z = 0; z < batches; ++z)
        for (int m0 = 0; m0 < M; m0 += BM)
            for (int n0 = 0; n0 < N; n0 += BN) {
                for (int tid = 0; tid < 256; ++tid)
                    for (int i = 0; i < TM; ++i)
                        for (int j = 0; j < TN; ++j) acc[tid][i][j] = 0.0f;
                for (int k0 = 0; k0 < K; k0 += BK) {
                    for (int tid = 0; tid < 256; ++tid) gemm_load(tile, tid, z, m0, n0, k0, M, N, K, la, lb);
                    for (int tid = 0; tid < 256; ++tid) gemm_multiply(tile, tid, acc[tid]);
                }
                for (int tid = 0; tid < 256; ++tid) gemm_store(tid, z, m0, n0, M, N, acc[tid], st);
            }
}

template <class LA, class LB, class ST>
inline void gemm_host(int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) {
    if (M <= 0 || N <= 0 || batches <= 0) return;
    if (gemm_big_tiles(M, N, batches)) gemm_tiled_host<128, 128, 8, 8, 8>(M, N, K, batches, la, lb, st);
    else gemm_tiled_host<64, 64, 16, 4, 4>(M, N, K, batches, la, lb, st);
}

#if defined(NNC_CUDA_HOST_EMULATION)
template <class LA, class LB, class ST>
inline void gemm_launch(cudaStream_t, int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) {
    gemm_host(M, N, K, batches, la, lb, st);   // (the TF32 variant is not emulated)
}
#else
template <int BM, int BN, int BK, int TM, int TN, class LA, class LB, class ST>
__global__ void __launch_bounds__(256) gemm_kernel(int M, int N, int K, LA la, LB lb, ST st) {
    static_assert(BM == 16 * TM && BN == 16 * TN, "16 x 16 threads, TM x TN each");
    __shared__ GemmTile<BM, BN, BK> tile;
    const int z = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, tid = threadIdx.x;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += BK) {
        gemm_load(tile, tid, z, m0, n0, k0, M, N, K, la, lb);
        __syncthreads();
        gemm_multiply(tile, tid, acc);
        __syncthreads();
    }
    gemm_store(tid, z, m0, n0, M, N, acc, st);
}

#if defined(NNC_CUDA_TF32)
// TF32 tensor-core variant: 128x128 tile, 8 warps each computing 32x64 with 16x16x8 WMMA fragments.
template <class LA, class LB, class ST>
__global__ void __launch_bounds__(256) gemm_kernel_tf32(int M, int N, int K, LA la, LB lb, ST st) {
    using namespace nvcuda;
    constexpr int BM = 128, BN = 128, BK = 16;
    // WMMA loads and stores need 256-bit aligned pointers: every fragment origin below is a multiple of 32 bytes
    __shared__ __align__(32) float As[BM][BK + 4];   // row-major A tile
    __shared__ __align__(32) float Bs[BK][BN + 4];   // row-major B tile
    __shared__ __align__(32) float Cs[8][16][16 + 4];
    const int z = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 64;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> c[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::fill_fragment(c[i][j], 0.0f);
    const bool a_k_fast = la.col_fast(), b_n_fast = lb.col_fast();
    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int idx = tid; idx < BM * BK; idx += 256) {
            const int mm = a_k_fast ? idx / BK : idx % BM, kk = a_k_fast ? idx % BK : idx / BM;
            const int m = m0 + mm, k = k0 + kk;
            As[mm][kk] = (m < M && k < K) ? la(z, m, k) : 0.0f;
        }
        for (int idx = tid; idx < BN * BK; idx += 256) {
            const int nn = b_n_fast ? idx % BN : idx / BK, kk = b_n_fast ? idx / BN : idx % BK;
            const int n = n0 + nn, k = k0 + kk;
            Bs[kk][nn] = (n < N && k < K) ? lb(z, k, n) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b[4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], BK + 4);
#pragma unroll
                for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                wmma::load_matrix_sync(b[j], &Bs[kk][wn + 16 * j], BN + 4);
#pragma unroll
                for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
        }
        __syncthreads();
    }
    // through shared memory, one 16x16 fragment at a time per warp, so the store functor sees (m, n)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wmma::store_matrix_sync(&Cs[warp][0][0], c[i][j], 16 + 4, wmma::mem_row_major);
            __syncwarp();
            for (int t = lane; t < 256; t += 32) {
                const int m = m0 + wm + 16 * i + t / 16, n = n0 + wn + 16 * j + t % 16;
                if (m < M && n < N) st(z, m, n, Cs[warp][t / 16][t % 16]);
            }
            __syncwarp();
        }
}
#endif

// Launch C = A B over `batches` batches with the given loaders and store.
template <class LA, class LB, class ST>
inline void gemm_launch(cudaStream_t stream, int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) {
    if (M <= 0 || N <= 0 || batches <= 0) return;
    const dim3 block(256);
    if (gemm_big_tiles(M, N, batches)) {
        const dim3 grid((N + 127) / 128, (M + 127) / 128, batches);
#if defined(NNC_CUDA_TF32)
        gemm_kernel_tf32<LA, LB, ST><<<grid, block, 0, stream>>>(M, N, K, la, lb, st);
#else
        gemm_kernel<128, 128, 8, 8, 8, LA, LB, ST><<<grid, block, 0, stream>>>(M, N, K, la, lb, st);
#endif
    } else {
        const dim3 grid((N + 63) / 64, (M + 63) / 64, batches);
        gemm_kernel<64, 64, 16, 4, 4, LA, LB, ST><<<grid, block, 0, stream>>>(M, N, K, la, lb, st);
    }
}

#endif  // NNC_CUDA_HOST_EMULATION

// Row-major SGEMM in the BLAS shape: C = epi(op(A) op(B)), batched with element strides.
// (A template so that modules without a GEMM compile no GEMM kernel.)
template <int Unused = 0>
inline void sgemm(cudaStream_t stream, bool ta, bool tb, int M, int N, int K, const float* A, long long lda,
                  const float* B, long long ldb, float* C, long long ldc, const Epilogue& e, int batches = 1,
                  long long sa = 0, long long sb = 0, long long sc = 0) {
    gemm_launch(stream, M, N, K, batches, Strided{A, lda, sa, ta}, Strided{B, ldb, sb, tb}, StoreC{C, ldc, sc, e});
}

}  // namespace cuda
}  // namespace nnc
