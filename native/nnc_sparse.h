// nnc_sparse.h - linear layers whose weight has a fixed sparsity pattern (AVX2 + FMA).
//
//   y[M, N] = x[M, K] @ W[N, K]^T (+ epilogue: column bias, activation, residual)
//
// W stays in its dense [N, K] storage (zeros off the pattern); the pattern is a CSR structure over
// W's rows (rowptr[N + 1], cols[nnz], int32), usually baked into the generated code as static arrays.
// Only the weights on the pattern are read, so values may change between calls (training).
//
// The kernels are vectorized over the batch dimension: a chunk of up to 64 rows of x is transposed
// into xT[K][ld] (8x8 AVX transposes), every nonzero W[n, c] becomes one broadcast and ceil(mb/8) FMAs
// against xT[c], and the result yT[N][ld] is transposed back with the epilogue applied on the way.
// Groups of consecutive rows with the same column pattern (block sparsity: a block row) run together,
// sharing each xT load across the rows of the group (register blocking); N:M patterns are CSR rows
// with a fixed count. Also here: the backward pieces for training with a fixed pattern
// (sampled dW = dY^T X on the pattern only, and dX = dY @ W through the same pattern).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "nnc_gemm.h"
#include "nnc_math.h"
#include "nnc_threads.h"

namespace nnc {
namespace sparse {

struct Pattern {
    int rows;               // N
    int k;                  // K
    const int32_t* rowptr;  // [rows + 1]
    const int32_t* cols;    // [nnz]
    int n_groups;           // row groups: rows [gstart[g], gstart[g + 1]) share row gstart[g]'s columns
    const int32_t* gstart;  // [n_groups + 1], or nullptr: every row its own group
};

namespace detail {

struct Buffer {
    float* data = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(data); }
    float* get(size_t count) {
        if (capacity < count) {
            std::free(data);
            size_t bytes = ((count + 64) * sizeof(float) + 63) / 64 * 64;
            data = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (data == nullptr) throw std::bad_alloc();
            capacity = count + 64;
        }
        return data;
    }
};

inline float* scratch(int slot, size_t count) {
    thread_local Buffer buffers[3];
    return buffers[slot].get(count);
}

// xT[k * ld + i] = x[(i) * ldx + k] for i < mb; lanes mb..ld-1 are zero.
inline void transpose_in(const float* x, long ldx, int mb, int K, float* xT, int ld) {
    int i0 = 0;
    for (; i0 + 8 <= mb; i0 += 8) {
        int k0 = 0;
        for (; k0 + 8 <= K; k0 += 8) {
            __m256 r[8];
            for (int r_ = 0; r_ < 8; ++r_) r[r_] = _mm256_loadu_ps(x + (long)(i0 + r_) * ldx + k0);
            gemm::transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
            for (int r_ = 0; r_ < 8; ++r_) _mm256_storeu_ps(xT + (long)(k0 + r_) * ld + i0, r[r_]);
        }
        for (; k0 < K; ++k0)
            for (int i = i0; i < i0 + 8; ++i) xT[(long)k0 * ld + i] = x[(long)i * ldx + k0];
    }
    if (i0 < ld) {
        for (int k = 0; k < K; ++k) {
            float* dst = xT + (long)k * ld;
            for (int i = i0; i < ld; ++i) dst[i] = i < mb ? x[(long)i * ldx + k] : 0.0f;
        }
    }
}

// y[i, n] (+epilogue) = yT[n * ld + i] for i < mb, n < N.
inline void transpose_out(const float* yT, int ld, int mb, int N, float* y, long ldy, const Epilogue& ep, long row0) {
    int n0 = 0;
    for (; n0 + 8 <= N; n0 += 8) {
        int i0 = 0;
        __m256 bias = ep.col_bias ? _mm256_loadu_ps(ep.col_bias + n0) : _mm256_setzero_ps();
        for (; i0 + 8 <= mb; i0 += 8) {
            __m256 r[8];
            for (int r_ = 0; r_ < 8; ++r_) r[r_] = _mm256_loadu_ps(yT + (long)(n0 + r_) * ld + i0);
            gemm::transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
            for (int r_ = 0; r_ < 8; ++r_) {
                __m256 v = _mm256_add_ps(r[r_], bias);
                if (ep.act != ACT_NONE) v = activate_ps(v, ep.act);
                if (ep.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.residual + (row0 + i0 + r_) * ep.ldr + n0));
                _mm256_storeu_ps(y + (long)(i0 + r_) * ldy + n0, v);
            }
        }
        for (; i0 < mb; ++i0) {
            alignas(32) float tmp[8];
            for (int j = 0; j < 8; ++j) tmp[j] = yT[(long)(n0 + j) * ld + i0];
            __m256 v = _mm256_add_ps(_mm256_load_ps(tmp), bias);
            if (ep.act != ACT_NONE) v = activate_ps(v, ep.act);
            if (ep.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.residual + (row0 + i0) * ep.ldr + n0));
            _mm256_storeu_ps(y + (long)i0 * ldy + n0, v);
        }
    }
    for (; n0 < N; ++n0) {
        for (int i = 0; i < mb; ++i) {
            float v = yT[(long)n0 * ld + i] + (ep.col_bias ? ep.col_bias[n0] : 0.0f);
            if (ep.act != ACT_NONE) v = activate_scalar(v, ep.act);
            if (ep.residual) v += ep.residual[(row0 + i) * ep.ldr + n0];
            y[(long)i * ldy + n0] = v;
        }
    }
}

// One row of W against V vectors (8V batch lanes) of xT; U independent accumulator sets hide FMA latency.
template <int V, int U>
inline void row_kernel(const float* __restrict wr, const int32_t* __restrict cols, int begin, int end,
                       const float* __restrict xT, int ld, float* __restrict out) {
    __m256 acc[U][V];
    for (int u = 0; u < U; ++u)
        for (int v = 0; v < V; ++v) acc[u][v] = _mm256_setzero_ps();
    int j = begin;
    for (; j + U <= end; j += U) {
        for (int u = 0; u < U; ++u) {
            const int c = cols[j + u];
            const __m256 wv = _mm256_broadcast_ss(wr + c);
            const float* xr = xT + (long)c * ld;
            for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(wv, _mm256_load_ps(xr + 8 * v), acc[u][v]);
        }
    }
    for (; j < end; ++j) {
        const int c = cols[j];
        const __m256 wv = _mm256_broadcast_ss(wr + c);
        const float* xr = xT + (long)c * ld;
        for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(wv, _mm256_load_ps(xr + 8 * v), acc[0][v]);
    }
    for (int u = 1; u < U; ++u)
        for (int v = 0; v < V; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], acc[u][v]);
    for (int v = 0; v < V; ++v) _mm256_store_ps(out + 8 * v, acc[0][v]);
}

// R rows sharing one column list, against VB vectors of xT at a time: each xT load feeds R FMAs.
template <int R, int VB>
inline void group_kernel(const float* __restrict w0, long ldw, const int32_t* __restrict cols, int begin, int end,
                         const float* __restrict xT, int ld, int nvec, float* __restrict out) {
    for (int v0 = 0; v0 < nvec; v0 += VB) {
        __m256 acc[R][VB];
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < VB; ++v) acc[r][v] = _mm256_setzero_ps();
        for (int j = begin; j < end; ++j) {
            const int c = cols[j];
            __m256 xv[VB];
            const float* xr = xT + (long)c * ld + 8 * v0;
            for (int v = 0; v < VB; ++v) xv[v] = _mm256_load_ps(xr + 8 * v);
            for (int r = 0; r < R; ++r) {
                const __m256 wv = _mm256_broadcast_ss(w0 + r * ldw + c);
                for (int v = 0; v < VB; ++v) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < VB; ++v) _mm256_store_ps(out + (long)r * ld + 8 * (v0 + v), acc[r][v]);
    }
}

template <int V>
inline void rows_chunk(const Pattern& p, int g0, int g1, const float* w, long ldw, const float* xT, int ld, float* yT) {
    constexpr int U = V >= 4 ? 1 : (V == 2 ? 2 : 4);
    for (int g = g0; g < g1; ++g) {
        const int n0 = p.gstart ? p.gstart[g] : g;
        const int n1 = p.gstart ? p.gstart[g + 1] : g + 1;
        const int b = p.rowptr[n0], e = p.rowptr[n0 + 1];
        int n = n0;
        // register-blocked: 4 (then 2) rows of the group at a time, 16 lanes per pass
        if (V % 2 == 0) {
            for (; n + 4 <= n1; n += 4)
                group_kernel<4, 2>(w + (long)n * ldw, ldw, p.cols, b, e, xT, ld, V, yT + (long)n * ld);
            for (; n + 2 <= n1; n += 2)
                group_kernel<2, 2>(w + (long)n * ldw, ldw, p.cols, b, e, xT, ld, V, yT + (long)n * ld);
        } else {
            for (; n + 4 <= n1; n += 4)
                group_kernel<4, 1>(w + (long)n * ldw, ldw, p.cols, b, e, xT, ld, V, yT + (long)n * ld);
        }
        for (; n < n1; ++n) row_kernel<V, U>(w + (long)n * ldw, p.cols, b, e, xT, ld, yT + (long)n * ld);
    }
}

template <int V>
inline void run_chunk(const Pattern& p, const float* w, long ldw, const float* xT, int ld, float* yT) {
    const int groups = p.gstart ? p.n_groups : p.rows;
    const long work = (long)p.rowptr[p.rows] * V;
    const int threads = work > 200000 ? usable_threads() : 1;
    if (threads <= 1) {
        rows_chunk<V>(p, 0, groups, w, ldw, xT, ld, yT);
        return;
    }
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
    for (int g = 0; g < groups; g += 16) rows_chunk<V>(p, g, std::min(groups, g + 16), w, ldw, xT, ld, yT);
}

}  // namespace detail

// y[M, N] = x[M, K] @ W^T restricted to the pattern, then the epilogue (col_bias, act, residual).
inline void linear(int M, const float* x, const float* w, const Pattern& p, float* y, const Epilogue& ep) {
    const int N = p.rows, K = p.k;
    constexpr int CHUNK = 64;
    for (int m0 = 0; m0 < M; m0 += CHUNK) {
        const int mb = std::min(CHUNK, M - m0);
        const int V = (mb + 7) / 8;
        const int ld = 8 * V;
        float* xT = detail::scratch(0, (size_t)K * ld);
        float* yT = detail::scratch(1, (size_t)N * ld);
        detail::transpose_in(x + (long)m0 * K, K, mb, K, xT, ld);
        switch (V) {
            case 1: detail::run_chunk<1>(p, w, K, xT, ld, yT); break;
            case 2: detail::run_chunk<2>(p, w, K, xT, ld, yT); break;
            case 3: detail::run_chunk<3>(p, w, K, xT, ld, yT); break;
            case 4: detail::run_chunk<4>(p, w, K, xT, ld, yT); break;
            case 5: detail::run_chunk<5>(p, w, K, xT, ld, yT); break;
            case 6: detail::run_chunk<6>(p, w, K, xT, ld, yT); break;
            case 7: detail::run_chunk<7>(p, w, K, xT, ld, yT); break;
            default: detail::run_chunk<8>(p, w, K, xT, ld, yT); break;
        }
        detail::transpose_out(yT, ld, mb, N, y + (long)m0 * N, N, ep, m0);
    }
}

// Training: dW[n, c] = sum_m dY[m, n] * X[m, c] on the pattern only (sampled dense-dense product);
// entries off the pattern are set to zero, so the optimizer never moves them.
inline void weight_grad(int M, const float* dy, const float* x, const Pattern& p, float* dw) {
    const int N = p.rows, K = p.k;
    std::memset(dw, 0, sizeof(float) * (size_t)N * K);
    constexpr int CHUNK = 256;
    for (int m0 = 0; m0 < M; m0 += CHUNK) {
        const int mb = std::min(CHUNK, M - m0);
        const int ld = (mb + 7) / 8 * 8;
        float* xT = detail::scratch(0, (size_t)K * ld);
        float* gT = detail::scratch(1, (size_t)N * ld);
        detail::transpose_in(x + (long)m0 * K, K, mb, K, xT, ld);
        detail::transpose_in(dy + (long)m0 * N, N, mb, N, gT, ld);
        const int threads = (long)p.rowptr[N] * ld > 400000 ? usable_threads() : 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
        for (int n = 0; n < N; ++n) {
            const float* g = gT + (long)n * ld;
            float* dst = dw + (long)n * K;
            for (int j = p.rowptr[n]; j < p.rowptr[n + 1]; ++j) {
                const int c = p.cols[j];
                const float* xr = xT + (long)c * ld;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int i = 0;
                for (; i + 16 <= ld; i += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_load_ps(g + i), _mm256_load_ps(xr + i), a0);
                    a1 = _mm256_fmadd_ps(_mm256_load_ps(g + i + 8), _mm256_load_ps(xr + i + 8), a1);
                }
                for (; i < ld; i += 8) a0 = _mm256_fmadd_ps(_mm256_load_ps(g + i), _mm256_load_ps(xr + i), a0);
                dst[c] += hsum_ps(_mm256_add_ps(a0, a1));
            }
        }
    }
}

// A plain CSR loop (one row of x at a time, no batch vectorization): the bench's hand-written baseline.
inline void linear_naive(int M, const float* x, const float* w, const Pattern& p, float* y) {
    const int N = p.rows, K = p.k;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float s = 0.0f;
            const float* wr = w + (long)n * K;
            for (int j = p.rowptr[n]; j < p.rowptr[n + 1]; ++j) s += wr[p.cols[j]] * x[(long)m * K + p.cols[j]];
            y[(long)m * N + n] = s;
        }
}

}  // namespace sparse
}  // namespace nnc
