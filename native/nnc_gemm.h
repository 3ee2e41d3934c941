// nnc_gemm.h - single-precision GEMM for generated code.
//
//   nnc::sgemm(transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, epi)
//     row-major; C[M, N] = epilogue(alpha * op(A)[M, K] @ op(B)[K, N] + beta * C)
//     (see nnc::Epilogue in nnc_gemm_kernels.h for the exact formula).
//   nnc::sgemm_batched(batch, transA, transB, M, N, K, A, lda, strideA, B, ldb, strideB,
//                      C, ldc, strideC, beta, epi)   (strides in floats; 0 broadcasts an operand)
//
// Paths, chosen per call (gemm::serial):
//   - packed: GotoBLAS loop nest (jc: NC, pc: KC, ic: MC, jr: NR, ir: MR) over packed panels and a
//     register-blocked micro-kernel: AVX2/FMA 6x16, or AVX-512 12x32 when the CPU has it
//     (nnc_gemm_avx512.h); the epilogue runs in the store of the last K block. With the AVX-512
//     kernel and M <= MC, B is packed one sliver at a time (packed_slivers); each kernel call
//     prefetches lines a later step needs (the next sliver's source, the next tile of C), so cold
//     operands (a training step's weights and gradients) cost about what warm ones do.
//   - rows: up to kSkinnyRows rows with B not transposed (batch-1 / small-batch inference):
//     B streamed row by row into L1-resident accumulator strips.
//   - dot: up to 4 rows with B transposed (x @ W^T): dot products along K.
//   - direct: tiny problems (packing would not pay off): unpacked 6x16 kernel.
// Threads: the output is split into a tm x tn grid of blocks cut at multiples of the kernel's
// tile, one per thread (or, for large problems, kBlocksPerThread per thread handed out
// dynamically), each running the serial algorithm with its own packing buffers (thread_scratch).
// Inside an enclosing parallel region the call is serial.
#pragma once

#include <algorithm>

#include "nnc_gemm_avx512.h"
#include "nnc_gemm_kernels.h"
#include "nnc_threads.h"

namespace nnc {

// Cache blocking (floats). Defaults measured on the 2-core AMD EPYC (Zen 5) target, L1d 48 KiB,
// L2 1 MiB (A block MC x KC), L3 32 MiB (B panel KC x NC). KC = 512 beat 256 by 5-8% with the
// AVX-512 kernel at 512..2048^3 (half the C-tile passes) and ties with the AVX2 kernel; MC from
// 96 to 240 and NC from 1024 to 4080 were within noise.
struct GemmBlocking {
    int mc = 144;
    int kc = 512;
    int nc = 4080;
    // Up to this many rows of C (B not transposed, AVX-512 kernel) the packed path reads B in place
    // instead of packing it (gemm::packed_direct_b); 0 turns that off.
    int direct_b_rows = 256;
};

inline GemmBlocking& gemm_blocking() {
    static GemmBlocking blocking;
    return blocking;
}

namespace gemm {

// Below this many multiply-adds a problem runs on one thread.
constexpr long kMinParallelWork = 72L * 72 * 72;
// From this many multiply-adds on, the output is cut into kBlocksPerThread blocks per thread.
constexpr long kDynamicWork = 640L * 640 * 640;
constexpr int kBlocksPerThread = 2;
// Below this many multiply-adds packing does not pay off (measured: the packed path wins from
// about 16^3 up, with either micro-kernel).
constexpr long kDirectWork = 16L * 16 * 16;
// Up to this many rows (B not transposed) C is computed by streaming B (rows_times_b).
constexpr int kSkinnyRows = 8;

inline Epilogue shift_epilogue(const Epilogue& ep, int i0, int j0) {
    Epilogue s = ep;
    if (s.col_bias) s.col_bias += j0;
    if (s.row_bias) s.row_bias += i0;
    if (s.residual) s.residual += static_cast<long>(i0) * s.ldr + j0;
    return s;
}

// The two packed micro-kernels behind one signature. The 6x16 kernel (nnc_gemm_kernels.h) has no
// prefetch walk in its k loop and ignores the lines to prefetch.
inline void kernel_avx2(int kc, const float* Ap, const float* Bp, float* C, int ldc, int m_valid, int n_valid,
                        const StoreMode& mode, const Epilogue& ep, int i0, int j0, const LinePrefetch&) {
    kernel_6x16_packed(kc, Ap, Bp, C, ldc, m_valid, n_valid, mode, ep, i0, j0);
}

// Block size <= limit (a multiple of grain) that splits n into equal-as-possible blocks.
inline int balanced_block(int n, int limit, int grain) {
    if (n <= limit) return limit;
    const int blocks = (n + limit - 1) / limit;
    const int even = (n + blocks - 1) / blocks;
    return std::min(limit, (even + grain - 1) / grain * grain);
}

// Serial GotoBLAS loop nest on an M x N block (pointers already at the block origin) with an
// MRt x NRt micro-kernel.
template <int MRt, int NRt, typename Kernel>
inline void packed_with(Kernel kernel, bool transA, bool transB, int M, int N, int K, const float* A, int lda,
                        const float* B, int ldb, float* C, int ldc, float beta, const Epilogue& ep) {
    const GemmBlocking& blk = gemm_blocking();
    // Balanced blocks: K = 784 with KC = 256 runs as 4 x 196, not 3 x 256 + 16.
    const int MC = balanced_block(M, std::max(MRt, blk.mc / MRt * MRt), MRt);
    const int KC = balanced_block(K, std::max(8, blk.kc), 8);
    const int NC = balanced_block(N, std::max(NRt, blk.nc / NRt * NRt), NRt);
    const int nc_max = std::min(NC, (N + NRt - 1) / NRt * NRt);
    const int mc_max = std::min(MC, (M + MRt - 1) / MRt * MRt);
    const int kc_max = std::min(KC, K);
    float* Bp = thread_scratch(SCRATCH_PACK_B, static_cast<size_t>(nc_max) * kc_max + 64);
    float* Ap = thread_scratch(SCRATCH_PACK_A, static_cast<size_t>(mc_max) * kc_max + 64);
    for (int jc = 0; jc < N; jc += NC) {
        const int nc = std::min(NC, N - jc);
        for (int pc = 0; pc < K; pc += KC) {
            const int kc = std::min(KC, K - pc);
            const float* Bsrc = transB ? B + static_cast<long>(jc) * ldb + pc : B + static_cast<long>(pc) * ldb + jc;
            pack_b<NRt>(transB, kc, nc, Bsrc, ldb, Bp);
            const StoreMode mode = StoreMode::for_block(pc, kc, K, beta, ep.alpha);
            for (int ic = 0; ic < M; ic += MC) {
                const int mc = std::min(MC, M - ic);
                const float* Asrc =
                    transA ? A + static_cast<long>(pc) * lda + ic : A + static_cast<long>(ic) * lda + pc;
                pack_a<MRt>(transA, mc, kc, Asrc, lda, Ap);
                for (int jr = 0; jr < nc; jr += NRt) {
                    const int nv = std::min(NRt, nc - jr);
                    const float* bsl = Bp + static_cast<long>(jr) * kc;
                    for (int ir = 0; ir < mc; ir += MRt) {
                        const int mv = std::min(MRt, mc - ir);
                        const int i = ic + ir;
                        const int j = jc + jr;
                        // The next tile of C (below this one, else the top of the next sliver), prefetched
                        // during this one: the kernel's own prefetch of its C rows comes too late where C is
                        // cold, as the 3-4 MB weight gradients a training step writes once (K = 128). Cold
                        // 1024x1024x128 tA 2.87 -> 2.70 ms, 1024x784x128 tA 2.23 -> 2.13 (prefetchw: same).
                        LinePrefetch next_c;
                        const int ni = ir + MRt < mc ? i + MRt : (jr + NRt < nc ? ic : -1);
                        const int nj = ir + MRt < mc ? j : j + NRt;
                        if (ni >= 0) {
                            next_c.first = reinterpret_cast<const char*>(C + static_cast<long>(ni) * ldc + nj);
                            next_c.stride = static_cast<long>(ldc) * sizeof(float);
                            next_c.rows = std::min(MRt, ic + mc - ni);
                            next_c.row_bytes = std::min(NRt, jc + nc - nj) * static_cast<int>(sizeof(float));
                        }
                        kernel(kc, Ap + static_cast<long>(ir) * kc, bsl, C + static_cast<long>(i) * ldc + j, ldc, mv,
                               nv, mode, ep, i, j, next_c);
                    }
                }
            }
        }
    }
}

// The packed loop nest without packing B (B not transposed, AVX-512 kernel): with few rows of C each
// packed element of B would feed only M / 12 micro-tiles, so packing it (a read and a write of all of
// B, most of it past L2) costs more than the micro-kernel reading the 32 columns of each row in place
// (from L2 for all but the first row sliver). Only the right edge sliver (fewer than 32 columns) is
// packed, so no load runs past the end of B. Not for row strides that are multiples of 1 KiB: rows
// that far apart share few L2 sets, a kc x 32 strip of B no longer stays in L2 and the in-place reads
// lose to packing (measured at ldb = 1024: 96 vs 102 GFLOP/s; at ldb = 784 / 1000: 104-106 vs 94-99).
inline void packed_direct_b(bool transA, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                            float* C, int ldc, float beta, const Epilogue& ep) {
    const GemmBlocking& blk = gemm_blocking();
    const int MC = balanced_block(M, std::max(MR512, blk.mc / MR512 * MR512), MR512);
    const int KC = balanced_block(K, std::max(8, blk.kc), 8);
    const int mc_max = std::min(MC, (M + MR512 - 1) / MR512 * MR512);
    const int kc_max = std::min(KC, K);
    float* Ap = thread_scratch(SCRATCH_PACK_A, static_cast<size_t>(mc_max) * kc_max + 64);
    float* Bedge = thread_scratch(SCRATCH_PACK_B, static_cast<size_t>(NR512) * kc_max + 64);
    const int whole = N / NR512 * NR512;
    for (int pc = 0; pc < K; pc += KC) {
        const int kc = std::min(KC, K - pc);
        if (whole < N) pack_b<NR512>(false, kc, N - whole, B + static_cast<long>(pc) * ldb + whole, ldb, Bedge);
        const StoreMode mode = StoreMode::for_block(pc, kc, K, beta, ep.alpha);
        for (int ic = 0; ic < M; ic += MC) {
            const int mc = std::min(MC, M - ic);
            const float* Asrc = transA ? A + static_cast<long>(pc) * lda + ic : A + static_cast<long>(ic) * lda + pc;
            pack_a<MR512>(transA, mc, kc, Asrc, lda, Ap);
            for (int jr = 0; jr < N; jr += NR512) {
                const int nv = std::min(NR512, N - jr);
                for (int ir = 0; ir < mc; ir += MR512) {
                    const int mv = std::min(MR512, mc - ir);
                    const int i = ic + ir;
                    float* c = C + static_cast<long>(i) * ldc + jr;
                    const float* a = Ap + static_cast<long>(ir) * kc;
                    if (jr < whole) {
                        kernel_12x32_rows<true>(kc, a, B + static_cast<long>(pc) * ldb + jr, c, ldc, mv, nv, mode,
                                                ep, i, jr, ldb);
                    } else {
                        kernel_12x32_avx512(kc, a, Bedge, c, ldc, mv, nv, mode, ep, i, jr);
                    }
                }
            }
        }
    }
}

// The packed loop nest for one MC block of rows (M <= MC, e.g. the batch-128 forward and dX GEMMs
// of a training step) with an MRt x NRt micro-kernel: B is packed one NRt-column sliver at a time
// right before the row tiles that use it, instead of a whole KC x NC panel up front (1.6 MB at
// 128x1024x784: past L2, so the kernels read it back from L3). Each kernel call prefetches its share
// of the next sliver's source lines (a kc x NRt strip of op(B): NRt rows of kc floats when B is
// transposed, kc rows of NRt floats when not), so the weights' DRAM reads, cold inside a training
// step after the optimizer's sweep, overlap the FMAs instead of stalling the packing. AVX-512, cold
// operands (bench/gemm_cold.py): 128x1024x784 tB 2.39 -> 2.08 ms, 128x1024x1024 tB 2.97 -> 2.70,
// 128x1024x1024 2.94 -> 2.61; warm 2-8% faster too.
template <int MRt, int NRt, typename Kernel>
inline void packed_slivers(Kernel kernel, bool transA, bool transB, int M, int N, int K, const float* A, int lda,
                           const float* B, int ldb, float* C, int ldc, float beta, const Epilogue& ep) {
    // K blocks twice KC deep: the packed A block (at most MC x 2 KC, 576 KB) still fits L2, and C is
    // stored and reloaded half as often. Three interleaved runs of bench/gemm_cold.py: 128x1024x784 tB
    // (one K block instead of two) 1.5-5% faster warm and cold, 128x1024x1024 tB 0-2%, 128x1024x1024
    // not transposed within noise.
    const int KC = balanced_block(K, std::max(8, 2 * gemm_blocking().kc), 8);
    const int kc_max = std::min(KC, K);
    const int tiles = (M + MRt - 1) / MRt;
    float* Ap = thread_scratch(SCRATCH_PACK_A, static_cast<size_t>(tiles) * MRt * kc_max + 64);
    float* Bs = thread_scratch(SCRATCH_PACK_B, static_cast<size_t>(NRt) * kc_max + 64);
    // the source of the sliver at columns j, K block [p, p + kc) of op(B), as rows of lines
    auto sliver_lines = [&](int j, int p) {
        LinePrefetch lines;
        if (p >= K) return lines;
        const int kc = std::min(KC, K - p);
        const int nv = std::min(NRt, N - j);
        lines.stride = static_cast<long>(ldb) * sizeof(float);
        if (transB) {
            lines.first = reinterpret_cast<const char*>(B + static_cast<long>(j) * ldb + p);
            lines.rows = nv;
            lines.row_bytes = kc * static_cast<int>(sizeof(float));
        } else {
            lines.first = reinterpret_cast<const char*>(B + static_cast<long>(p) * ldb + j);
            lines.rows = kc;
            lines.row_bytes = nv * static_cast<int>(sizeof(float));
        }
        return lines;
    };
    for (int pc = 0; pc < K; pc += KC) {
        const int kc = std::min(KC, K - pc);
        pack_a<MRt>(transA, M, kc, transA ? A + static_cast<long>(pc) * lda : A + pc, lda, Ap);
        const StoreMode mode = StoreMode::for_block(pc, kc, K, beta, ep.alpha);
        for (int jr = 0; jr < N; jr += NRt) {
            const int nv = std::min(NRt, N - jr);
            const float* Bsrc = transB ? B + static_cast<long>(jr) * ldb + pc : B + static_cast<long>(pc) * ldb + jr;
            pack_b<NRt>(transB, kc, nv, Bsrc, ldb, Bs);
            // the next sliver: this K block's next columns, else the next K block's first
            const LinePrefetch next = jr + NRt < N ? sliver_lines(jr + NRt, pc) : sliver_lines(0, pc + KC);
            for (int t = 0; t < tiles; ++t) {
                LinePrefetch share = next;
                const int r0 = next.rows * t / tiles;
                share.rows = next.rows * (t + 1) / tiles - r0;
                share.first = next.first + r0 * next.stride;
                const int ir = t * MRt;
                kernel(kc, Ap + static_cast<long>(ir) * kc, Bs, C + static_cast<long>(ir) * ldc + jr, ldc,
                       std::min(MRt, M - ir), nv, mode, ep, ir, jr, share);
            }
        }
    }
}

// N <= 16 (e.g. a classifier's 10 logits) runs the 6x16 AVX2 kernel: the 12x32 tile would waste
// two thirds of its FMAs on padding (the 1-thread FMA peak of both is the same on Zen 4). The AVX2
// kernel keeps the whole-panel loop nest at any M: packed_slivers with it (the lines prefetched in a
// burst before each call, or not at all) measured no better cold (sum of the MLP step's GEMMs 13.1-13.4
// vs 13.4 ms).
inline void packed(bool transA, bool transB, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                   float* C, int ldc, float beta, const Epilogue& ep) {
    if (gemm_use_avx512() && !transB && M <= gemm_blocking().direct_b_rows && N >= NR512 && ldb % 256 != 0) {
        packed_direct_b(transA, M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
    } else if (gemm_use_avx512() && N > NR) {
        if (M <= gemm_blocking().mc) {
            packed_slivers<MR512, NR512>(kernel_12x32_avx512, transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta,
                                         ep);
        } else {
            packed_with<MR512, NR512>(kernel_12x32_avx512, transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
        }
    } else {
        packed_with<MR, NR>(kernel_avx2, transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
    }
}

// R rows of C (row r at c + r * ldc, columns [0, n)) = R rows of op(A) (element (r, k) at
// a[r * a_rs + k * a_cs]) @ B (K x n, rows at stride ldb). Streams B 4 rows at a time through an
// L1-resident accumulator strip per row, so each loaded B vector feeds R FMAs and the hardware
// prefetchers see sequential streams; the epilogue runs on the finished strips.
template <int R>
inline void rows_times_b(int K, const float* a, long a_rs, long a_cs, const float* B, int ldb, float* c, int ldc,
                         int n, const StoreMode& mode, const Epilogue& ep, int i) {
    constexpr int kStrip = 1024;
    float* acc = thread_scratch(SCRATCH_GEMV, static_cast<size_t>(R) * kStrip + 16);
    for (int j0 = 0; j0 < n; j0 += kStrip) {
        const int width = std::min(kStrip, n - j0);
        const int full = width & ~7;
        const __m256i tail = tail_mask(width - full);
        for (int r = 0; r < R; ++r) {
            for (int j = 0; j < width; j += 8) _mm256_store_ps(acc + r * kStrip + j, _mm256_setzero_ps());
        }
        int k = 0;
        for (; k + 4 <= K; k += 4) {
            __m256 av[R][4];
            for (int r = 0; r < R; ++r) {
                for (int q = 0; q < 4; ++q) av[r][q] = _mm256_set1_ps(a[r * a_rs + (k + q) * a_cs]);
            }
            const float* b0 = B + static_cast<long>(k) * ldb + j0;
            const float* b1 = b0 + ldb;
            const float* b2 = b1 + ldb;
            const float* b3 = b2 + ldb;
            for (int j = 0; j < width; j += 8) {
                const bool whole = j < full;
                const __m256 v0 = whole ? _mm256_loadu_ps(b0 + j) : _mm256_maskload_ps(b0 + j, tail);
                const __m256 v1 = whole ? _mm256_loadu_ps(b1 + j) : _mm256_maskload_ps(b1 + j, tail);
                const __m256 v2 = whole ? _mm256_loadu_ps(b2 + j) : _mm256_maskload_ps(b2 + j, tail);
                const __m256 v3 = whole ? _mm256_loadu_ps(b3 + j) : _mm256_maskload_ps(b3 + j, tail);
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r) {
                    float* s = acc + r * kStrip + j;
                    __m256 x = _mm256_fmadd_ps(av[r][0], v0, _mm256_load_ps(s));
                    x = _mm256_fmadd_ps(av[r][1], v1, x);
                    x = _mm256_fmadd_ps(av[r][2], v2, x);
                    x = _mm256_fmadd_ps(av[r][3], v3, x);
                    _mm256_store_ps(s, x);
                }
            }
        }
        for (; k < K; ++k) {
            const float* b0 = B + static_cast<long>(k) * ldb + j0;
            for (int j = 0; j < width; j += 8) {
                const __m256 v0 = j < full ? _mm256_loadu_ps(b0 + j) : _mm256_maskload_ps(b0 + j, tail);
                for (int r = 0; r < R; ++r) {
                    float* s = acc + r * kStrip + j;
                    _mm256_store_ps(s, _mm256_fmadd_ps(_mm256_set1_ps(a[r * a_rs + k * a_cs]), v0, _mm256_load_ps(s)));
                }
            }
        }
        for (int r = 0; r < R; ++r) {
            for (int j = 0; j < width; j += 16) {
                const __m256 v[2] = {_mm256_load_ps(acc + r * kStrip + j), _mm256_load_ps(acc + r * kStrip + j + 8)};
                store_row<2>(v, c + static_cast<long>(r) * ldc + j0 + j, i + r, j0 + j, std::min(16, width - j), mode,
                             ep);
            }
        }
    }
}

// Serial direct GEMM (B not transposed, no packing).
inline void direct(bool transA, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                   int ldc, float beta, const Epilogue& ep) {
    StoreMode mode{ep.alpha, beta, beta != 0.0f, true};
    const long a_rs = transA ? 1 : lda;
    const long a_cs = transA ? lda : 1;
    int i = 0;
    if (M <= kSkinnyRows) {
        for (; i < M; i += 4) {
            const float* a = A + i * a_rs;
            float* c = C + static_cast<long>(i) * ldc;
            switch (std::min(4, M - i)) {
                case 4: rows_times_b<4>(K, a, a_rs, a_cs, B, ldb, c, ldc, N, mode, ep, i); break;
                case 3: rows_times_b<3>(K, a, a_rs, a_cs, B, ldb, c, ldc, N, mode, ep, i); break;
                case 2: rows_times_b<2>(K, a, a_rs, a_cs, B, ldb, c, ldc, N, mode, ep, i); break;
                default: rows_times_b<1>(K, a, a_rs, a_cs, B, ldb, c, ldc, N, mode, ep, i); break;
            }
        }
        return;
    }
    for (; i < M; i += MR) {
        const int rows = std::min(MR, M - i);
        const float* a = A + i * a_rs;
        float* c = C + static_cast<long>(i) * ldc;
        for (int j = 0; j < N; j += 16) {
            const int nv = std::min(16, N - j);
            switch (rows) {
                case 6: kernel_direct<6, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
                case 5: kernel_direct<5, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
                case 4: kernel_direct<4, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
                case 3: kernel_direct<3, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
                case 2: kernel_direct<2, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
                default: kernel_direct<1, 2>(K, a, a_rs, a_cs, B + j, ldb, c + j, ldc, nv, mode, ep, i, j); break;
            }
        }
    }
}

// Serial dot-product GEMM (A not transposed, B transposed).
inline void dot(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, float beta,
                const Epilogue& ep) {
    StoreMode mode{ep.alpha, beta, beta != 0.0f, true};
    for (int i = 0; i < M; ++i) {
        row_times_bt(K, A + static_cast<long>(i) * lda, B, ldb, C + static_cast<long>(i) * ldc, N, mode, ep, i);
    }
}

// Serial GEMM on one block: picks the path.
inline void serial(bool transA, bool transB, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                   float* C, int ldc, float beta, const Epilogue& ep) {
    if (M <= 0 || N <= 0) return;
    const long work = static_cast<long>(M) * N * std::max(K, 1);
    if (K == 0) {
        direct(false, M, N, 0, A, lda, B, ldb, C, ldc, beta, ep);
    } else if (transB && !transA && M <= 4) {
        dot(M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
    } else if (!transB && (M <= kSkinnyRows || work <= kDirectWork)) {
        direct(transA, M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
    } else {
        packed(transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, ep);
    }
}

// Grid of tm x tn thread blocks for an M x N output (tm * tn <= threads), balancing the largest
// block's area and its operand panels.
inline void thread_grid(int M, int N, int threads, int mr, int nr, int* tm, int* tn) {
    double best = 1e300;
    *tm = 1;
    *tn = 1;
    for (int a = 1; a <= threads; ++a) {
        const int b = threads / a;
        if (a * b != threads) continue;
        const long rows = ((static_cast<long>(M) + mr - 1) / mr + a - 1) / a * mr;
        const long cols = ((static_cast<long>(N) + nr - 1) / nr + b - 1) / b * nr;
        if ((M + mr - 1) / mr < a || (N + nr - 1) / nr < b) continue;
        const double cost = static_cast<double>(std::min<long>(rows, M)) * std::min<long>(cols, N) * 4.0 +
                            (std::min<long>(rows, M) + std::min<long>(cols, N)) * 64.0;
        if (cost < best) {
            best = cost;
            *tm = a;
            *tn = b;
        }
    }
}

inline void run_block(bool transA, bool transB, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                      float* C, int ldc, float beta, const Epilogue& ep, int tm, int tn, int mr, int nr, int tid) {
    const int bi = tid / tn;
    const int bj = tid % tn;
    long i0, i1, j0, j1;
    split_range(M, tm, bi, mr, &i0, &i1);
    split_range(N, tn, bj, nr, &j0, &j1);
    if (i0 >= i1 || j0 >= j1) return;
    const float* Ab = transA ? A + i0 : A + i0 * lda;
    const float* Bb = transB ? B + j0 * ldb : B + j0;
    const Epilogue eb = shift_epilogue(ep, static_cast<int>(i0), static_cast<int>(j0));
    serial(transA, transB, static_cast<int>(i1 - i0), static_cast<int>(j1 - j0), K, Ab, lda, Bb, ldb,
           C + i0 * ldc + j0, ldc, beta, eb);
}

}  // namespace gemm

// C = epilogue(alpha * op(A) @ op(B) + beta * C), row-major; see the file comment.
inline void sgemm(bool transA, bool transB, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                  float* C, int ldc, float beta, const Epilogue& epi = Epilogue()) {
    if (M <= 0 || N <= 0) return;
    const long work = static_cast<long>(M) * N * std::max(K, 1);
    int threads = usable_threads();
    threads = static_cast<int>(std::min<long>(threads, std::max<long>(1, work / gemm::kMinParallelWork)));
    if (threads <= 1) {
        gemm::serial(transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, epi);
        return;
    }
    // Blocks are cut at multiples of the packed micro-kernel's tile. Large problems get
    // kBlocksPerThread blocks per thread, handed out dynamically, so a thread slowed down by
    // another process on its core does not hold the others up (the extra packing costs ~1%).
    const int mr = gemm_use_avx512() ? gemm::MR512 : gemm::MR;
    const int nr = gemm_use_avx512() ? gemm::NR512 : gemm::NR;
    int tm = 1, tn = 1;
    if (work >= gemm::kDynamicWork) gemm::thread_grid(M, N, threads * gemm::kBlocksPerThread, mr, nr, &tm, &tn);
    if (tm * tn <= threads) {
        gemm::thread_grid(M, N, threads, mr, nr, &tm, &tn);
#pragma omp parallel num_threads(tm * tn)
        gemm::run_block(transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, epi, tm, tn, mr, nr, thread_id());
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int block = 0; block < tm * tn; ++block) {
        gemm::run_block(transA, transB, M, N, K, A, lda, B, ldb, C, ldc, beta, epi, tm, tn, mr, nr, block);
    }
}

// A batch of independent GEMMs with operands at fixed strides (floats; a zero stride shares the
// operand across the batch). epi.residual advances by epi.residual_batch_stride per item; biases
// are shared. Parallel over batch items when there are enough of them, else inside each GEMM.
inline void sgemm_batched(int batch, bool transA, bool transB, int M, int N, int K, const float* A, int lda,
                          long long strideA, const float* B, int ldb, long long strideB, float* C, int ldc,
                          long long strideC, float beta, const Epilogue& epi = Epilogue()) {
    if (batch <= 0 || M <= 0 || N <= 0) return;
    const int threads = usable_threads();
    const long work = static_cast<long>(M) * N * std::max(K, 1);
    auto item = [&](int b) {
        Epilogue eb = epi;
        if (eb.residual) eb.residual += b * epi.residual_batch_stride;
        return eb;
    };
    const bool over_batch = threads > 1 && (batch >= 4 * threads || (batch >= threads && batch % threads == 0) ||
                                            work < gemm::kMinParallelWork * 8);
    if (!over_batch) {
        for (int b = 0; b < batch; ++b) {
            sgemm(transA, transB, M, N, K, A + b * strideA, lda, B + b * strideB, ldb, C + b * strideC, ldc, beta,
                  item(b));
        }
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int b = 0; b < batch; ++b) {
        gemm::serial(transA, transB, M, N, K, A + b * strideA, lda, B + b * strideB, ldb, C + b * strideC, ldc, beta,
                     item(b));
    }
}

// out[b, j, i] = x[b, i, j] for batch matrices of rows x cols: 32 x 32 tiles of 8 x 8 register
// transposes (a strided copy reads a column at a time: a cache line per element once rows are 4 KiB
// apart); on the threads when the tensor is large.
inline void transpose_last_two(const float* x, int64_t batch, int64_t rows, int64_t cols, float* out) {
    const int64_t row_tiles = (rows + 31) / 32;
    const int threads = batch * rows * cols >= (1 << 15) ? usable_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < batch * row_tiles; ++t) {
        const int64_t i1 = t % row_tiles * 32;
        const float* s = x + t / row_tiles * rows * cols;
        float* d = out + t / row_tiles * rows * cols;
        for (int64_t j1 = 0; j1 < cols; j1 += 32)
            for (int64_t i0 = i1; i0 < i1 + 32 && i0 < rows; i0 += 8)
                for (int64_t j0 = j1; j0 < j1 + 32 && j0 < cols; j0 += 8) {
                    if (i0 + 8 <= rows && j0 + 8 <= cols) {
                        __m256 r[8];
                        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(s + (i0 + q) * cols + j0);
                        gemm::transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
                        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(d + (j0 + q) * rows + i0, r[q]);
                    } else {
                        for (int64_t i = i0; i < i0 + 8 && i < rows; ++i)
                            for (int64_t j = j0; j < j0 + 8 && j < cols; ++j) d[j * rows + i] = s[i * cols + j];
                    }
                }
    }
}

}  // namespace nnc
