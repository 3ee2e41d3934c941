// nnc_sparse.h - linear layers whose weight has a fixed sparsity pattern (AVX2 + FMA; AVX-512 at run time).
//
//   y[M, N] = x[M, K] @ W[N, K]^T (+ epilogue: column bias, activation, residual)
//
// W stays in its dense [N, K] storage (zeros off the pattern); the pattern is a CSR structure over
// W's rows (rowptr[N + 1], cols[nnz], int32), usually baked into the generated code as static arrays.
// Only the weights on the pattern are read, so values may change between calls (training).
//
// The kernels are vectorized over the batch dimension: a chunk of up to 64 rows of x is transposed
// into xT[K][ld] (8x8 AVX transposes), every nonzero W[n, c] becomes one broadcast and ld/16 zmm FMAs
// (AVX-512 CPUs) or ld/8 ymm FMAs (AVX2) against xT[c], and the result yT[rows][ld] of each tile of
// about 128 rows is transposed back into y with the epilogue applied on the way. Each FMA reads its xT
// vector from L1/L2 (no reuse across unstructured rows), so the kernel is bound by load bandwidth: 256
// bytes per nonzero at 64 lanes.
// Groups of consecutive rows with the same column pattern (block sparsity: a block row) run together,
// sharing each xT load across the rows of the group (register blocking); N:M patterns are CSR rows
// with a fixed count. Also here: the backward pieces for training with a fixed pattern
// (sampled dW = dY^T X on the pattern only, and dX = dY @ W through the same pattern).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include <sys/mman.h>

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
    int kb = 0;             // columns per K block (0: one block); rowptr has n_kblocks() * rows + 1 entries,
                            // entry b * rows + n starting row n's nonzeros in columns [b * kb, (b + 1) * kb)
    const float* values = nullptr;  // [nnz] W's values packed in the cols order (the module's persistent
                                    // packed region, or baked frozen values), or nullptr: read W
    int n_kblocks() const { return kb > 0 ? (k + kb - 1) / kb : 1; }
    int block_cols() const { return kb > 0 ? kb : k; }
};

namespace detail {

// Scratch of 128 KB and more is 2 MB-aligned and advised as huge pages: the kernels read xT at random
// rows, and with 4 KB pages its TLB misses cost ~6% (1024x1024, 90%, batch 64).
struct Buffer {
    float* data = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(data); }
    float* get(size_t count) {
        if (capacity < count) {
            std::free(data);
            size_t bytes = ((count + 64) * sizeof(float) + 63) / 64 * 64;
            constexpr size_t huge = size_t(2) << 20;
            if (bytes >= (size_t(128) << 10)) {
                bytes = (bytes + huge - 1) / huge * huge;
                data = static_cast<float*>(std::aligned_alloc(huge, bytes));
#ifdef MADV_HUGEPAGE
                if (data != nullptr) madvise(data, bytes, MADV_HUGEPAGE);
#endif
            } else {
                data = static_cast<float*>(std::aligned_alloc(64, bytes));
            }
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
__attribute__((noinline)) inline void transpose_in(const float* x, long ldx, int mb, int K, float* xT, int ld) {
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
    for (int k = 0; k < K && i0 < ld; ++k) {
        float* dst = xT + (long)k * ld;
        for (int i = i0; i < mb; ++i) dst[i] = x[(long)i * ldx + k];
        for (int i = mb; i < ld; ++i) dst[i] = 0.0f;
    }
}

// y[i, n] (+epilogue) = yT[n * ld + i] for i < mb, n < N. Rows of y are written in order (8 rows at a time,
// sweeping n), so every line of y is filled whole while it is in L1.
__attribute__((noinline)) inline void transpose_out(const float* yT, int ld, int mb, int N, float* y, long ldy, const Epilogue& ep, long row0) {
    const int n8 = N / 8 * 8;
    int i0 = 0;
    for (; i0 + 8 <= mb; i0 += 8) {
        for (int n0 = 0; n0 < n8; n0 += 8) {
            const __m256 bias = ep.col_bias ? _mm256_loadu_ps(ep.col_bias + n0) : _mm256_setzero_ps();
            __m256 r[8];
            for (int r_ = 0; r_ < 8; ++r_) r[r_] = _mm256_load_ps(yT + (long)(n0 + r_) * ld + i0);
            gemm::transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
            for (int r_ = 0; r_ < 8; ++r_) {
                __m256 v = _mm256_add_ps(r[r_], bias);
                if (ep.act != ACT_NONE) v = activate_ps(v, ep.act);
                if (ep.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.residual + (row0 + i0 + r_) * ep.ldr + n0));
                _mm256_storeu_ps(y + (long)(i0 + r_) * ldy + n0, v);
            }
        }
    }
    for (; i0 < mb; ++i0) {
        for (int n0 = 0; n0 < n8; n0 += 8) {
            const __m256 bias = ep.col_bias ? _mm256_loadu_ps(ep.col_bias + n0) : _mm256_setzero_ps();
            alignas(32) float tmp[8];
            for (int j = 0; j < 8; ++j) tmp[j] = yT[(long)(n0 + j) * ld + i0];
            __m256 v = _mm256_add_ps(_mm256_load_ps(tmp), bias);
            if (ep.act != ACT_NONE) v = activate_ps(v, ep.act);
            if (ep.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.residual + (row0 + i0) * ep.ldr + n0));
            _mm256_storeu_ps(y + (long)i0 * ldy + n0, v);
        }
    }
    for (int n0 = n8; n0 < N; ++n0) {
        for (int i = 0; i < mb; ++i) {
            float v = yT[(long)n0 * ld + i] + (ep.col_bias ? ep.col_bias[n0] : 0.0f);
            if (ep.act != ACT_NONE) v = activate_scalar(v, ep.act);
            if (ep.residual) v += ep.residual[(row0 + i) * ep.ldr + n0];
            y[(long)i * ldy + n0] = v;
        }
    }
}

// The batch-lane kernels. xT's rows are LD = W * V floats (W lanes per vector, V vectors); a row of W
// (a CSR range) costs one broadcast and V FMAs per nonzero, each FMA reading one vector of xT. A row
// keeps S sets of V accumulators (nonzeros j, j + S, ... go to one set): for narrow chunks enough
// independent FMA chains to hide the FMA latency; at 64 lanes one set (4 zmm / 8 ymm chains) measured
// fastest, the kernel being bound by the xT loads (Zen 4, in L1: ~5 cycles per nonzero with zmm, the
// 4 FMAs alone ~4). The partial sums of earlier K blocks are added at the end, so their load (often
// from L2) stays off the chains. Two rows interleaved (more chains, one loop exit per pair) measured
// slower. Rows of a group (same columns) share each xT load (register blocking). The AVX2 (ymm) and
// AVX-512 (zmm) versions are the same code, instantiated twice from this macro with the vector type and
// intrinsics as arguments.
#define NNC_SPARSE_KERNELS(VEC, W, TARGET, SUFFIX, LOAD, STORE, ZERO, SET1, FMA, ADD)                          \
    template <int V, int S>                                                                                    \
    TARGET inline void row##SUFFIX(const float* __restrict va, const int32_t* __restrict ca, int la,           \
                                   const float* __restrict xT, float* __restrict out, bool first) {            \
        constexpr long LD = (long)W * V;                                                                       \
        VEC a[S][V];                                                                                           \
        for (int u = 0; u < S; ++u)                                                                            \
            for (int v = 0; v < V; ++v) a[u][v] = ZERO();                                                      \
        int j = 0;                                                                                             \
        for (; j + S <= la; j += S)                                                                            \
            for (int u = 0; u < S; ++u) {                                                                      \
                const VEC wa = SET1(va[j + u]);                                                                \
                const float* xa = xT + ca[j + u] * LD;                                                         \
                for (int v = 0; v < V; ++v) a[u][v] = FMA(wa, LOAD(xa + W * v), a[u][v]);                     \
            }                                                                                                  \
        for (; j < la; ++j) {                                                                                  \
            const VEC wa = SET1(va[j]);                                                                        \
            const float* xa = xT + ca[j] * LD;                                                                 \
            for (int v = 0; v < V; ++v) a[0][v] = FMA(wa, LOAD(xa + W * v), a[0][v]);                         \
        }                                                                                                      \
        for (int u = 1; u < S; ++u)                                                                            \
            for (int v = 0; v < V; ++v) a[0][v] = ADD(a[0][v], a[u][v]);                                       \
        if (!first)                                                                                            \
            for (int v = 0; v < V; ++v) a[0][v] = ADD(a[0][v], LOAD(out + W * v));                             \
        for (int v = 0; v < V; ++v) STORE(out + W * v, a[0][v]);                                               \
    }                                                                                                          \
                                                                                                               \
    /* R rows sharing one column list (a block row), VB vectors at a time: each xT load feeds R FMAs.      */ \
    /* vals[r][j - begin] is row r's weight of cols[j].                                                    */ \
    template <int V, int R, int VB>                                                                            \
    TARGET inline void group##SUFFIX(const float* const* vals, const int32_t* __restrict cols, int begin,      \
                                     int end, const float* __restrict xT, float* __restrict out, bool first) { \
        constexpr long LD = (long)W * V;                                                                       \
        for (int v0 = 0; v0 < V; v0 += VB) {                                                                   \
            VEC acc[R][VB];                                                                                    \
            for (int r = 0; r < R; ++r)                                                                        \
                for (int v = 0; v < VB; ++v) acc[r][v] = ZERO();                                               \
            for (int j = begin; j < end; ++j) {                                                                \
                VEC xv[VB];                                                                                    \
                const float* xr = xT + cols[j] * LD + W * v0;                                                  \
                for (int v = 0; v < VB; ++v) xv[v] = LOAD(xr + W * v);                                         \
                for (int r = 0; r < R; ++r) {                                                                  \
                    const VEC wv = SET1(vals[r][j - begin]);                                                   \
                    for (int v = 0; v < VB; ++v) acc[r][v] = FMA(wv, xv[v], acc[r][v]);                        \
                }                                                                                              \
            }                                                                                                  \
            for (int r = 0; r < R; ++r)                                                                        \
                for (int v = 0; v < VB; ++v) {                                                                 \
                    float* o = out + r * LD + W * (v0 + v);                                                    \
                    STORE(o, first ? acc[r][v] : ADD(acc[r][v], LOAD(o)));                                     \
                }                                                                                              \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    /* Groups [g0, g1) over K block kblk; vals are the packed values (Pattern::values order); yT holds    */ \
    /* rows row0, row0 + 1, ... of the result, W * V floats each.                                          */ \
    template <int V>                                                                                           \
    TARGET __attribute__((noinline)) void rows_chunk##SUFFIX(const Pattern& p, int kblk, int g0, int g1,       \
                                                             const float* vals, const float* xT, float* yT,   \
                                                             int row0) {                                      \
        constexpr long LD = (long)W * V;                                                                       \
        constexpr int S = W * V >= 64 ? 1 : (V >= 3 ? 2 : 4);                                                  \
        constexpr int VG = W == 16 ? V : (V % 2 == 0 ? 2 : 1);                                                 \
        const int32_t* rowptr = p.rowptr + (long)kblk * p.rows;                                                \
        const int32_t* cols = p.cols;                                                                          \
        const bool first = kblk == 0;                                                                          \
        for (int g = g0; g < g1; ++g) {                                                                        \
            const int n0 = p.gstart ? p.gstart[g] : g;                                                         \
            const int n1 = p.gstart ? p.gstart[g + 1] : g + 1;                                                 \
            const int b = rowptr[n0], e = rowptr[n0 + 1];                                                      \
            int n = n0;                                                                                        \
            if (n1 - n0 > 1 && e > b) {                                                                        \
                const float* rv[4];                                                                            \
                for (; n + 4 <= n1; n += 4) {                                                                  \
                    for (int r = 0; r < 4; ++r) rv[r] = vals + rowptr[n + r];                                  \
                    group##SUFFIX<V, 4, VG>(rv, cols, b, e, xT, yT + (n - row0) * LD, first);                \
                }                                                                                              \
                if (n + 2 <= n1) {                                                                             \
                    for (int r = 0; r < 2; ++r) rv[r] = vals + rowptr[n + r];                                  \
                    group##SUFFIX<V, 2, VG>(rv, cols, b, e, xT, yT + (n - row0) * LD, first);                \
                    n += 2;                                                                                    \
                }                                                                                              \
            }                                                                                                  \
            for (; n < n1; ++n) {                                                                              \
                const int rb = rowptr[n], re = rowptr[n + 1];                                                  \
                row##SUFFIX<V, S>(vals + rb, cols + rb, re - rb, xT, yT + (n - row0) * LD, first);           \
            }                                                                                                  \
        }                                                                                                      \
    }

NNC_SPARSE_KERNELS(__m256, 8, , 256, _mm256_load_ps, _mm256_store_ps, _mm256_setzero_ps, _mm256_set1_ps,
                   _mm256_fmadd_ps, _mm256_add_ps)

// GCC 12 warns about _mm512_undefined_ps() inside its own AVX-512 intrinsics (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
NNC_SPARSE_KERNELS(__m512, 16, __attribute__((target("avx512f"))), 512, _mm512_load_ps, _mm512_store_ps,
                   _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps)
#pragma GCC diagnostic pop
#undef NNC_SPARSE_KERNELS

// Whether the batch-lane kernels use zmm registers (AVX-512F CPUs; off with NNC_NO_AVX512, like the GEMM).
inline bool& use_avx512() {
    static bool enabled = gemm_use_avx512();
    return enabled;
}

using ChunkFn = void (*)(const Pattern&, int, int, int, const float*, const float*, float*, int);

// values[j] = W[n, cols[j]] for rows [n0, n1), walking W row by row.
inline void pack_rows(const Pattern& p, const float* w, long ldw, int n0, int n1, float* values) {
    const int nkb = p.n_kblocks(), N = p.rows;
    for (int n = n0; n < n1; ++n) {
        const float* wr = w + (long)n * ldw;
        for (int kblk = 0; kblk < nkb; ++kblk) {
            int j = p.rowptr[(long)kblk * N + n];
            const int e = p.rowptr[(long)kblk * N + n + 1];
            for (; j < e; ++j) values[j] = wr[p.cols[j]];
        }
    }
}

inline int group_row(const Pattern& p, int g) { return p.gstart ? p.gstart[g] : g; }

inline int tile_end(const Pattern& p, int t0, int g1) {
    int t1 = t0;
    const int row0 = group_row(p, t0);
    while (t1 < g1 && group_row(p, t1) - row0 < 128) ++t1;
    return t1;
}

// Where a batch chunk's result goes: rows [row0, row0 + mb) of y (leading dimension ldy), with the epilogue.
struct ChunkOut {
    int mb;
    float* y;
    long ldy;
    const Epilogue* ep;
    long row0;
};

// Rows are tiled (about 128 rows) and, inside a tile, every K block runs over all the tile's rows while
// its slice of xT stays near L1; the tile's rows of the result accumulate in a small per-thread yT (32 KB
// at 64 lanes: it stays in L1/L2) and are then transposed into y's columns. With w (the first batch
// chunk, values not packed yet), each tile packs its rows' values first. (Software-prefetching the next
// tile's W lines during the current tile was measured slower here.)
inline void rows_range(const Pattern& p, ChunkFn chunk, int g0, int g1, const float* w, float* vals,
                       const float* xT, int ld, const ChunkOut& out) {
    const int nkb = p.n_kblocks();
    const int all_groups = p.gstart ? p.n_groups : p.rows;
    int t0 = g0;
    while (t0 < g1) {
        const int t1 = tile_end(p, t0, g1);
        const int r0 = group_row(p, t0), r1 = t1 < all_groups ? group_row(p, t1) : p.rows;
        if (w != nullptr) pack_rows(p, w, p.k, r0, r1, vals);
        float* yT = scratch(1, (size_t)(r1 - r0) * ld);
        for (int kblk = 0; kblk < nkb; ++kblk) chunk(p, kblk, t0, t1, vals, xT, yT, r0);
        Epilogue ep = *out.ep;
        if (ep.col_bias) ep.col_bias += r0;
        if (ep.residual) ep.residual += r0;
        transpose_out(yT, ld, out.mb, r1 - r0, out.y + r0, out.ldy, ep, out.row0);
        t0 = t1;
    }
}

inline int threads_for(long work) { return work > 200000 ? usable_threads() : 1; }

inline void run_chunk(const Pattern& p, ChunkFn chunk, int ld, const float* w, float* vals, const float* xT,
                      const ChunkOut& out) {
    const int groups = p.gstart ? p.n_groups : p.rows;
    const int threads =
        std::min(threads_for((long)p.rowptr[(long)p.n_kblocks() * p.rows] * (ld / 8)), std::max(groups, 1));
    if (threads <= 1) {
        rows_range(p, chunk, 0, groups, w, vals, xT, ld, out);
        return;
    }
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const int g0 = (int)((long)groups * t / threads), g1 = (int)((long)groups * (t + 1) / threads);
        rows_range(p, chunk, g0, g1, w, vals, xT, ld, out);
    }
}

// Few rows of x (M < 8) with W's values not packed, or one row: no batch vectorization, no packing; each
// nonzero is one scalar FMA per row of x with four accumulators, reading W where it lies (or the frozen
// values). (With frozen values and 2..7 rows, the 8-lane batch kernel is faster: one broadcast and one
// FMA per nonzero for all the rows, against one gathered load and FMA per nonzero per row here.)
inline void small_batch(int M, const float* x, const float* w, const Pattern& p, float* y, const Epilogue& ep) {
    const int N = p.rows, K = p.k, nkb = p.n_kblocks();
    const int threads = threads_for((long)p.rowptr[(long)nkb * N] * M);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; ++n) {
        const float* wr = w + (long)n * K;
        for (int m = 0; m < M; ++m) {
            const float* xr = x + (long)m * K;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int kblk = 0; kblk < nkb; ++kblk) {
                int j = p.rowptr[(long)kblk * N + n];
                const int e = p.rowptr[(long)kblk * N + n + 1];
                if (p.values) {   // frozen values: contiguous
                    const float* v = p.values;
                    for (; j + 4 <= e; j += 4) {
                        a0 = std::fma(v[j], xr[p.cols[j]], a0);
                        a1 = std::fma(v[j + 1], xr[p.cols[j + 1]], a1);
                        a2 = std::fma(v[j + 2], xr[p.cols[j + 2]], a2);
                        a3 = std::fma(v[j + 3], xr[p.cols[j + 3]], a3);
                    }
                    for (; j < e; ++j) a0 = std::fma(v[j], xr[p.cols[j]], a0);
                    continue;
                }
                for (; j + 4 <= e; j += 4) {
                    const int c0 = p.cols[j], c1 = p.cols[j + 1], c2 = p.cols[j + 2], c3 = p.cols[j + 3];
                    a0 = std::fma(wr[c0], xr[c0], a0);
                    a1 = std::fma(wr[c1], xr[c1], a1);
                    a2 = std::fma(wr[c2], xr[c2], a2);
                    a3 = std::fma(wr[c3], xr[c3], a3);
                }
                for (; j < e; ++j) a0 = std::fma(wr[p.cols[j]], xr[p.cols[j]], a0);
            }
            float v = (a0 + a1) + (a2 + a3) + (ep.col_bias ? ep.col_bias[n] : 0.0f);
            if (ep.act != ACT_NONE) v = activate_scalar(v, ep.act);
            if (ep.residual) v += ep.residual[(long)m * ep.ldr + n];
            y[(long)m * N + n] = v;
        }
    }
}

}  // namespace detail

// y[M, N] = x[M, K] @ W^T restricted to the pattern, then the epilogue (col_bias, act, residual).
// Unless the pattern carries frozen values, W's values on the pattern are first packed (one pass over
// W), so the batch chunks read a contiguous nnz-long array instead of scattered lines of W. One row of
// x, or fewer than 8 without frozen values, takes the scalar kernel (small_batch).
__attribute__((noinline)) inline void linear(int M, const float* x, const float* w, const Pattern& p, float* y, const Epilogue& ep) {
    const int N = p.rows, K = p.k;
    if (M <= 0 || N <= 0) return;
    if (M == 1 || (M < 8 && p.values == nullptr)) {
        detail::small_batch(M, x, w, p, y, ep);
        return;
    }
    // values: frozen ones from the pattern, else packed from W by the first chunk (tile by tile)
    float* packed = p.values ? nullptr : detail::scratch(2, (size_t)p.rowptr[(long)p.n_kblocks() * N] + 1);
    float* vals = p.values ? const_cast<float*>(p.values) : packed;
    // batch chunks of 64 rows of x: 4 zmm vectors per row of xT (AVX-512) or 8 ymm vectors (AVX2)
    const bool wide = detail::use_avx512();
    constexpr int CHUNK = 64;
    for (int m0 = 0; m0 < M; m0 += CHUNK) {
        const int mb = std::min(CHUNK, M - m0);
        // zmm unless a chunk of at most 32 rows would need more padding lanes than with ymm
        const bool zmm = wide && (mb > 32 || (mb + 15) / 16 * 16 == (mb + 7) / 8 * 8);
        const int V = zmm ? (mb + 15) / 16 : (mb + 7) / 8;
        const int ld = (zmm ? 16 : 8) * V;
        const float* wp = (packed && m0 == 0) ? w : nullptr;
        float* xT = detail::scratch(0, (size_t)K * ld);
        detail::transpose_in(x + (long)m0 * K, K, mb, K, xT, ld);
        static constexpr detail::ChunkFn k256[] = {detail::rows_chunk256<1>, detail::rows_chunk256<2>,
                                                   detail::rows_chunk256<3>, detail::rows_chunk256<4>,
                                                   detail::rows_chunk256<5>, detail::rows_chunk256<6>,
                                                   detail::rows_chunk256<7>, detail::rows_chunk256<8>};
        static constexpr detail::ChunkFn k512[] = {detail::rows_chunk512<1>, detail::rows_chunk512<2>,
                                                   detail::rows_chunk512<3>, detail::rows_chunk512<4>};
        detail::run_chunk(p, zmm ? k512[V - 1] : k256[V - 1], ld, wp, vals, xT,
                          detail::ChunkOut{mb, y + (long)m0 * N, N, &ep, m0});
    }
}

// Training: dW[n, c] = sum_m dY[m, n] * X[m, c] on the pattern only (sampled dense-dense product);
// entries off the pattern are set to zero, so the optimizer never moves them.
__attribute__((noinline)) inline void weight_grad(int M, const float* dy, const float* x, const Pattern& p, float* dw) {
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
        const int threads = (long)p.rowptr[(long)p.n_kblocks() * N] * ld > 400000 ? usable_threads() : 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
        for (int n = 0; n < N; ++n) {
            const float* g = gT + (long)n * ld;
            float* dst = dw + (long)n * K;
            for (int kblk = 0; kblk < p.n_kblocks(); ++kblk)
            for (int j = p.rowptr[(long)kblk * N + n]; j < p.rowptr[(long)kblk * N + n + 1]; ++j) {
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

namespace detail {

template <int V>
inline void input_grad_chunk(const Pattern& p, const float* vals, const float* gT, float* dxT) {
    constexpr int ld = 8 * V;
    const int N = p.rows, nkb = p.n_kblocks();
    for (int n = 0; n < N; ++n) {
        __m256 g[V];
        for (int v = 0; v < V; ++v) g[v] = _mm256_load_ps(gT + (long)n * ld + 8 * v);
        for (int kblk = 0; kblk < nkb; ++kblk)
            for (int j = p.rowptr[(long)kblk * N + n]; j < p.rowptr[(long)kblk * N + n + 1]; ++j) {
                const __m256 wv = _mm256_broadcast_ss(vals + j);
                float* dst = dxT + (long)p.cols[j] * ld;
                for (int v = 0; v < V; ++v) _mm256_store_ps(dst + 8 * v, _mm256_fmadd_ps(wv, g[v], _mm256_load_ps(dst + 8 * v)));
            }
    }
}

}  // namespace detail

// Training: dX[M, K] = dY[M, N] @ W restricted to the pattern (each nonzero scatters one FMA per batch
// lane into dX^T, vectorized over the batch).
__attribute__((noinline)) inline void input_grad(int M, const float* dy, const float* w, const Pattern& p, float* dx) {
    const int N = p.rows, K = p.k;
    if (M <= 0 || K <= 0) return;
    float* vals = const_cast<float*>(p.values);
    if (vals == nullptr) {
        vals = detail::scratch(2, (size_t)p.rowptr[(long)p.n_kblocks() * N] + 1);
        detail::pack_rows(p, w, K, 0, N, vals);
    }
    constexpr int CHUNK = 64;
    for (int m0 = 0; m0 < M; m0 += CHUNK) {
        const int mb = std::min(CHUNK, M - m0);
        const int V = (mb + 7) / 8;
        const int ld = 8 * V;
        float* gT = detail::scratch(0, (size_t)N * ld);
        float* dxT = detail::scratch(1, (size_t)K * ld);
        detail::transpose_in(dy + (long)m0 * N, N, mb, N, gT, ld);
        std::memset(dxT, 0, sizeof(float) * (size_t)K * ld);
        switch (V) {
            case 1: detail::input_grad_chunk<1>(p, vals, gT, dxT); break;
            case 2: detail::input_grad_chunk<2>(p, vals, gT, dxT); break;
            case 3: detail::input_grad_chunk<3>(p, vals, gT, dxT); break;
            case 4: detail::input_grad_chunk<4>(p, vals, gT, dxT); break;
            case 5: detail::input_grad_chunk<5>(p, vals, gT, dxT); break;
            case 6: detail::input_grad_chunk<6>(p, vals, gT, dxT); break;
            case 7: detail::input_grad_chunk<7>(p, vals, gT, dxT); break;
            default: detail::input_grad_chunk<8>(p, vals, gT, dxT); break;
        }
        detail::transpose_out(dxT, ld, mb, K, dx + (long)m0 * K, K, Epilogue(), m0);
    }
}

// A plain CSR loop (one row of x at a time, no batch vectorization): the bench's hand-written baseline.
inline void linear_naive(int M, const float* x, const float* w, const Pattern& p, float* y) {
    const int N = p.rows, K = p.k;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float s = 0.0f;
            const float* wr = w + (long)n * K;
            for (int kblk = 0; kblk < p.n_kblocks(); ++kblk)
                for (int j = p.rowptr[(long)kblk * N + n]; j < p.rowptr[(long)kblk * N + n + 1]; ++j)
                    s += wr[p.cols[j]] * x[(long)m * K + p.cols[j]];
            y[(long)m * N + n] = s;
        }
}

}  // namespace sparse
}  // namespace nnc
