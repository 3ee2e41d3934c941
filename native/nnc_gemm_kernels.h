// nnc_gemm_kernels.h - building blocks of nnc::sgemm: the fused store path (epilogue),
// panel packing, and the AVX2/FMA register-blocked micro-kernels.
//
// Layout of the packed panels (BLIS / GotoBLAS style):
//   A sliver (MR rows x kc): Ap[k * MR + i], rows past the matrix edge are zero.
//   B sliver (kc x NR cols): Bp[k * NR + j], columns past the matrix edge are zero.
// The micro-kernel always computes a full MR x NR tile at full speed; only the store is masked
// at the matrix edges.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "nnc_math.h"

namespace nnc {

// What happens to C after the product (fused into the GEMM store path):
//   C[i,j] = act(alpha * sum_k op(A)[i,k] op(B)[k,j] + beta * C[i,j] + col_bias[j] + row_bias[i])
//            + residual[i * ldr + j]
// beta == 0 never reads C (it may hold garbage / NaN). Null pointers mean "absent". The epilogue
// inputs (biases, residual) must not overlap C: C holds partial sums between K blocks. For an
// in-place "C += A @ B" use beta = 1 instead of a residual.
struct Epilogue {
    const float* col_bias = nullptr;  // [N]
    const float* row_bias = nullptr;  // [M]
    int act = ACT_NONE;               // nnc::ACT_*
    const float* residual = nullptr;  // [M, ldr], added after the activation
    int ldr = 0;
    float alpha = 1.f;
    long long residual_batch_stride = 0;  // sgemm_batched only: residual offset per batch item
};

namespace gemm {

constexpr int MR = 6;
constexpr int NR = 16;

// How one tile store treats what is already in C.
struct StoreMode {
    float alpha;
    float beta;
    bool load_c;    // add beta * C (first K block with beta != 0, or any later K block)
    bool finalize;  // last K block: apply bias, activation, residual

    // the mode of the K block [pc, pc + kc) of K: beta and the epilogue only where they apply
    static StoreMode for_block(int pc, int kc, int K, float beta, float alpha) {
        StoreMode mode;
        mode.alpha = alpha;
        mode.beta = pc == 0 ? beta : 1.0f;
        mode.load_c = pc > 0 || beta != 0.0f;
        mode.finalize = pc + kc >= K;
        return mode;
    }
};

// Stores NV vectors (8 * NV columns, the first n_valid of them) of one row i of the tile.
// c points at C[i, j0]; ep has already been shifted to the tile's row/column origin of the
// calling block, so col_bias[j], row_bias[i], residual[i * ldr + j] are local.
template <int NV>
inline void store_row(const __m256* acc, float* c, int i, int j0, int n_valid, const StoreMode& mode,
                      const Epilogue& ep) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
        const int rem = n_valid - 8 * v;
        if (rem <= 0) break;
        const bool full = rem >= 8;
        const __m256i mask = tail_mask(full ? 8 : rem);
        float* cp = c + 8 * v;
        const int j = j0 + 8 * v;
        __m256 x = acc[v];
        if (mode.alpha != 1.0f) x = _mm256_mul_ps(x, _mm256_set1_ps(mode.alpha));
        if (mode.load_c) {
            __m256 cv = full ? _mm256_loadu_ps(cp) : _mm256_maskload_ps(cp, mask);
            x = mode.beta == 1.0f ? _mm256_add_ps(x, cv) : _mm256_fmadd_ps(_mm256_set1_ps(mode.beta), cv, x);
        }
        if (mode.finalize) {
            if (ep.col_bias) {
                const float* bp = ep.col_bias + j;
                x = _mm256_add_ps(x, full ? _mm256_loadu_ps(bp) : _mm256_maskload_ps(bp, mask));
            }
            if (ep.row_bias) x = _mm256_add_ps(x, _mm256_set1_ps(ep.row_bias[i]));
            if (ep.act != ACT_NONE) x = activate_ps(x, ep.act);
            if (ep.residual) {
                const float* rp = ep.residual + static_cast<long>(i) * ep.ldr + j;
                x = _mm256_add_ps(x, full ? _mm256_loadu_ps(rp) : _mm256_maskload_ps(rp, mask));
            }
        }
        if (full) {
            _mm256_storeu_ps(cp, x);
        } else {
            _mm256_maskstore_ps(cp, mask, x);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

inline void transpose8x8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                         __m256& r7) {
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
    r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
    r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
    r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
    r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
    r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
    r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
    r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Packs rows [0, mc) x cols [0, kc) of op(A) into MRt-row slivers (MRt = 6 or 12). The buffer
// needs ceil(mc / MRt) * MRt * kc + 16 floats (the 6-row vector path overruns by 2 floats).
// transA == false: element (i, k) at A[i * lda + k]; true: at A[k * lda + i].
template <int MRt>
inline void pack_a(bool transA, int mc, int kc, const float* A, int lda, float* Ap) {
    static_assert(MRt == 6 || MRt == 12, "pack_a supports 6- and 12-row slivers");
    if (transA) {
        // k outermost: each k reads one contiguous run of mc floats and deals it out to the slivers
        // (sliver by sliver, each k read 48 bytes lda floats apart, past the hardware prefetchers'
        // reach). 1 thread: 1024x256x1024 5.5-5.6 -> 5.24-5.34 ms, 1024x1024x128 2.69 -> 2.61 ms.
        const int whole = mc / MRt * MRt;
        for (int k = 0; k < kc; ++k) {
            const float* src = A + static_cast<long>(k) * lda;
            float* d = Ap + k * MRt;
            for (int i0 = 0; i0 < whole; i0 += MRt) std::memcpy(d + static_cast<long>(i0) * kc, src + i0, sizeof(float) * MRt);
            if (whole < mc) {
                float* e = d + static_cast<long>(whole) * kc;
                int i = 0;
                for (; i < mc - whole; ++i) e[i] = src[whole + i];
                for (; i < MRt; ++i) e[i] = 0.0f;
            }
        }
        return;
    }
    for (int i0 = 0; i0 < mc; i0 += MRt) {
        const int rows = std::min(MRt, mc - i0);
        float* dst = Ap + static_cast<long>(i0) * kc;
        if (rows < MRt) {
            for (int k = 0; k < kc; ++k) {
                int i = 0;
                for (; i < rows; ++i) dst[k * MRt + i] = A[static_cast<long>(i0 + i) * lda + k];
                for (; i < MRt; ++i) dst[k * MRt + i] = 0.0f;
            }
            continue;
        }
        const float* a[MRt];
        for (int i = 0; i < MRt; ++i) a[i] = A + static_cast<long>(i0 + i) * lda;
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            float* d = dst + k * MRt;
            if (MRt == 6) {
                __m256 r0 = _mm256_loadu_ps(a[0] + k), r1 = _mm256_loadu_ps(a[1] + k);
                __m256 r2 = _mm256_loadu_ps(a[2] + k), r3 = _mm256_loadu_ps(a[3] + k);
                __m256 r4 = _mm256_loadu_ps(a[4] + k), r5 = _mm256_loadu_ps(a[5] + k);
                __m256 r6 = _mm256_setzero_ps(), r7 = _mm256_setzero_ps();
                transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
                // Each store writes 6 useful floats + 2 that the next store overwrites.
                const __m256 t[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
                for (int q = 0; q < 8; ++q) _mm256_storeu_ps(d + q * MRt, t[q]);
            } else {
                __m256 r0 = _mm256_loadu_ps(a[0] + k), r1 = _mm256_loadu_ps(a[1] + k);
                __m256 r2 = _mm256_loadu_ps(a[2] + k), r3 = _mm256_loadu_ps(a[3] + k);
                __m256 r4 = _mm256_loadu_ps(a[4] + k), r5 = _mm256_loadu_ps(a[5] + k);
                __m256 r6 = _mm256_loadu_ps(a[6] + k), r7 = _mm256_loadu_ps(a[7] + k);
                transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
                const __m256 t[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
                __m256 u0 = _mm256_loadu_ps(a[8] + k), u1 = _mm256_loadu_ps(a[9] + k);
                __m256 u2 = _mm256_loadu_ps(a[10] + k), u3 = _mm256_loadu_ps(a[11] + k);
                __m256 u4 = _mm256_setzero_ps(), u5 = u4, u6 = u4, u7 = u4;
                transpose8x8(u0, u1, u2, u3, u4, u5, u6, u7);
                const __m256 u[8] = {u0, u1, u2, u3, u4, u5, u6, u7};
                for (int q = 0; q < 8; ++q) {
                    _mm256_storeu_ps(d + q * MRt, t[q]);
                    _mm_storeu_ps(d + q * MRt + 8, _mm256_castps256_ps128(u[q]));
                }
            }
        }
        for (; k < kc; ++k) {
            for (int i = 0; i < MRt; ++i) dst[k * MRt + i] = a[i][k];
        }
    }
}

// Packs rows [0, kc) x cols [0, nc) of op(B) into NRt-column slivers (NRt a multiple of 8;
// ceil(nc / NRt) * NRt * kc floats). transB == false: element (k, j) at B[k * ldb + j];
// true: at B[j * ldb + k].
template <int NRt>
inline void pack_b(bool transB, int kc, int nc, const float* B, int ldb, float* Bp) {
    constexpr int groups = NRt / 8;
    int first = 0;
    if (!transB) {
        // Whole slivers, 8 at a time with k outermost: B is read along its rows (8 * NRt floats
        // at a time), which the hardware prefetchers follow far better than one sliver's strip
        // of short rows at stride ldb.
        const int whole = nc / NRt * NRt;
        for (int c0 = 0; c0 < whole; c0 += 8 * NRt) {
            const int c1 = std::min(whole, c0 + 8 * NRt);
            for (int k = 0; k < kc; ++k) {
                const float* src = B + static_cast<long>(k) * ldb;
                for (int j0 = c0; j0 < c1; j0 += NRt) {
                    float* d = Bp + static_cast<long>(j0) * kc + k * NRt;
#pragma GCC unroll 8
                    for (int g = 0; g < groups; ++g) _mm256_store_ps(d + 8 * g, _mm256_loadu_ps(src + j0 + 8 * g));
                }
            }
        }
        first = whole;
    }
    for (int j0 = first; j0 < nc; j0 += NRt) {
        const int cols = std::min(NRt, nc - j0);
        float* dst = Bp + static_cast<long>(j0) * kc;
        if (!transB) {
            if (cols == NRt) {
                for (int k = 0; k < kc; ++k) {
                    const float* src = B + static_cast<long>(k) * ldb + j0;
#pragma GCC unroll 8
                    for (int g = 0; g < groups; ++g) _mm256_store_ps(dst + k * NRt + 8 * g, _mm256_loadu_ps(src + 8 * g));
                }
            } else {
                __m256i masks[groups];
                for (int g = 0; g < groups; ++g) masks[g] = tail_mask(std::max(0, std::min(8, cols - 8 * g)));
                for (int k = 0; k < kc; ++k) {
                    const float* src = B + static_cast<long>(k) * ldb + j0;
                    for (int g = 0; g < groups; ++g) {
                        _mm256_store_ps(dst + k * NRt + 8 * g, _mm256_maskload_ps(src + 8 * g, masks[g]));
                    }
                }
            }
            continue;
        }
        if (cols == NRt) {
            for (int g = 0; g < groups; ++g) {
                const float* b[8];
                for (int j = 0; j < 8; ++j) b[j] = B + static_cast<long>(j0 + 8 * g + j) * ldb;
                int k = 0;
                for (; k + 8 <= kc; k += 8) {
                    __m256 r0 = _mm256_loadu_ps(b[0] + k), r1 = _mm256_loadu_ps(b[1] + k);
                    __m256 r2 = _mm256_loadu_ps(b[2] + k), r3 = _mm256_loadu_ps(b[3] + k);
                    __m256 r4 = _mm256_loadu_ps(b[4] + k), r5 = _mm256_loadu_ps(b[5] + k);
                    __m256 r6 = _mm256_loadu_ps(b[6] + k), r7 = _mm256_loadu_ps(b[7] + k);
                    transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
                    float* d = dst + k * NRt + 8 * g;
                    _mm256_store_ps(d + 0 * NRt, r0);
                    _mm256_store_ps(d + 1 * NRt, r1);
                    _mm256_store_ps(d + 2 * NRt, r2);
                    _mm256_store_ps(d + 3 * NRt, r3);
                    _mm256_store_ps(d + 4 * NRt, r4);
                    _mm256_store_ps(d + 5 * NRt, r5);
                    _mm256_store_ps(d + 6 * NRt, r6);
                    _mm256_store_ps(d + 7 * NRt, r7);
                }
                for (; k < kc; ++k) {
                    for (int j = 0; j < 8; ++j) dst[k * NRt + 8 * g + j] = b[j][k];
                }
            }
        } else {
            for (int k = 0; k < kc; ++k) {
                int j = 0;
                for (; j < cols; ++j) dst[k * NRt + j] = B[static_cast<long>(j0 + j) * ldb + k];
                for (; j < NRt; ++j) dst[k * NRt + j] = 0.0f;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels
// ---------------------------------------------------------------------------------------------

// Packed 6x16 kernel: acc = Ap (6 x kc) * Bp (kc x 16); then the fused store into C.
// m_valid / n_valid < MR / NR at the matrix edges.
inline void kernel_6x16_packed(int kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int ldc,
                               int m_valid, int n_valid, const StoreMode& mode, const Epilogue& ep, int i0,
                               int j0) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int i = 0; i < m_valid; ++i) _mm_prefetch(reinterpret_cast<const char*>(C + static_cast<long>(i) * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int k = 0; k < kc; ++k) {
        const __m256 b0 = _mm256_load_ps(Bp);
        const __m256 b1 = _mm256_load_ps(Bp + 8);
        __m256 a = _mm256_broadcast_ss(Ap + 0);
        c00 = _mm256_fmadd_ps(a, b0, c00);
        c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(Ap + 1);
        c10 = _mm256_fmadd_ps(a, b0, c10);
        c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(Ap + 2);
        c20 = _mm256_fmadd_ps(a, b0, c20);
        c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(Ap + 3);
        c30 = _mm256_fmadd_ps(a, b0, c30);
        c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(Ap + 4);
        c40 = _mm256_fmadd_ps(a, b0, c40);
        c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(Ap + 5);
        c50 = _mm256_fmadd_ps(a, b0, c50);
        c51 = _mm256_fmadd_ps(a, b1, c51);
        Ap += MR;
        Bp += NR;
    }
    const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < m_valid; ++i) {
        store_row<2>(acc[i], C + static_cast<long>(i) * ldc, i0 + i, j0, n_valid, mode, ep);
    }
}

// Unpacked kernel for small problems: R rows x (8 * NV) columns, reading op(A) through strides
// and B (not transposed) row by row; columns past n_valid are masked on load and store.
// A element (i, k) at A[i * a_rs + k * a_cs].
template <int R, int NV>
inline void kernel_direct(int K, const float* A, long a_rs, long a_cs, const float* B, int ldb, float* C, int ldc,
                          int n_valid, const StoreMode& mode, const Epilogue& ep, int i0, int j0) {
    static_assert(R * NV <= 12, "register budget");
    __m256 acc[R][NV];
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
    }
    __m256i masks[NV];
    bool full = n_valid >= 8 * NV;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) masks[v] = tail_mask(std::max(0, std::min(8, n_valid - 8 * v)));
    for (int k = 0; k < K; ++k) {
        const float* brow = B + static_cast<long>(k) * ldb;
        __m256 b[NV];
        if (full) {
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(brow + 8 * v);
        } else {
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) b[v] = _mm256_maskload_ps(brow + 8 * v, masks[v]);
        }
        const float* acol = A + k * a_cs;
#pragma GCC unroll 12
        for (int i = 0; i < R; ++i) {
            const __m256 a = _mm256_broadcast_ss(acol + i * a_rs);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < R; ++i) {
        store_row<NV>(acc[i], C + static_cast<long>(i) * ldc, i0 + i, j0, n_valid, mode, ep);
    }
}

// Dot-product kernel for op(B) = B^T with few rows of A (y = x W^T): one row i of A (contiguous
// over k) against 4 rows of B at a time; results of up to 16 columns are stored through store_row.
inline void row_times_bt(int K, const float* a, const float* B, int ldb, float* c, int n, const StoreMode& mode,
                         const Epilogue& ep, int i) {
    const int k8 = K & ~7;
    const __m256i kmask = tail_mask(K - k8);
    alignas(32) float out[16];
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int cols = std::min(16, n - j0);
        for (int jj = 0; jj < cols; jj += 4) {
            const int q = std::min(4, cols - jj);
            const float* b0 = B + static_cast<long>(j0 + jj) * ldb;
            const float* b1 = q > 1 ? b0 + ldb : b0;
            const float* b2 = q > 2 ? b0 + 2L * ldb : b0;
            const float* b3 = q > 3 ? b0 + 3L * ldb : b0;
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
            int k = 0;
            for (; k < k8; k += 8) {
                const __m256 av = _mm256_loadu_ps(a + k);
                s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + k), s0);
                s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + k), s1);
                s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + k), s2);
                s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + k), s3);
            }
            if (k < K) {
                const __m256 av = _mm256_maskload_ps(a + k, kmask);
                s0 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b0 + k, kmask), s0);
                s1 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b1 + k, kmask), s1);
                s2 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b2 + k, kmask), s2);
                s3 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b3 + k, kmask), s3);
            }
            out[jj + 0] = hsum_ps(s0);
            if (q > 1) out[jj + 1] = hsum_ps(s1);
            if (q > 2) out[jj + 2] = hsum_ps(s2);
            if (q > 3) out[jj + 3] = hsum_ps(s3);
        }
        for (int jj = cols; jj < 16; ++jj) out[jj] = 0.0f;
        const __m256 acc[2] = {_mm256_load_ps(out), _mm256_load_ps(out + 8)};
        store_row<2>(acc, c + j0, i, j0, cols, mode, ep);
    }
}

}  // namespace gemm
}  // namespace nnc
