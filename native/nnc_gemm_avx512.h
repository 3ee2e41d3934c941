// nnc_gemm_avx512.h - optional AVX-512 micro-kernel for the packed GEMM path, chosen at run time.
//
// Generated code is compiled for x86-64-v3 (AVX2 + FMA). On CPUs that also have AVX-512F (e.g.
// AMD Zen 4 / Zen 5, Intel Skylake-SP and later) a 12x32 micro-kernel on zmm registers doubles the
// FMA width; it is compiled for that one function through a target attribute and only called when
// the CPU reports AVX-512F (and NNC_NO_AVX512 is not set in the environment). Everything else
// (packing, the fused epilogue store) is the shared AVX2 code.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "nnc_gemm_kernels.h"

namespace nnc {

// Whether the packed GEMM may use the AVX-512 kernel (settable, e.g. to test both paths).
inline bool& gemm_use_avx512() {
    static bool enabled = __builtin_cpu_supports("avx512f") && std::getenv("NNC_NO_AVX512") == nullptr;
    return enabled;
}

namespace gemm {

constexpr int MR512 = 12;
constexpr int NR512 = 32;

// Cache lines for a micro-kernel call to prefetch: `rows` rows of row_bytes bytes each, `stride`
// bytes apart, from `first` on (none when rows == 0).
struct LinePrefetch {
    const char* first = nullptr;
    long stride = 0;
    int rows = 0;
    int row_bytes = 0;
};

// GCC 12 warns about _mm512_undefined_ps() inside its own AVX-512 intrinsics (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Packed 12x32 kernel: acc = Ap (12 x kc, Ap[k * 12 + i]) * Bp (kc x 32, Bp[k * 32 + j]), then
// the fused store of the valid m_valid x n_valid part.
// ROWS = 12, or 6 / 8 for an edge sliver with at most that many valid rows (same packed layout,
// fewer FMAs).
// kDirectB: Bp is op(B) itself, not transposed, rows b_step floats apart (the unpacked path of
// packed_direct_b below); its 32 columns are read in place, the rows 8 ahead prefetched.
// pf: lines a later step will read or write (the next B sliver's source, the next tile of C),
// prefetched one per k step, so their DRAM reads overlap this tile's FMAs (see gemm::packed_slivers
// and gemm::packed_with).
template <int ROWS, bool kDirectB = false>
__attribute__((target("avx512f"), noinline)) inline void kernel_avx512(
    int kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int ldc, int m_valid, int n_valid,
    const StoreMode& mode, const Epilogue& ep, int i0, int j0, long b_step = NR512,
    const LinePrefetch& pf = LinePrefetch()) {
    __m512 c0a = _mm512_setzero_ps(), c0b = _mm512_setzero_ps();
    __m512 c1a = _mm512_setzero_ps(), c1b = _mm512_setzero_ps();
    __m512 c2a = _mm512_setzero_ps(), c2b = _mm512_setzero_ps();
    __m512 c3a = _mm512_setzero_ps(), c3b = _mm512_setzero_ps();
    __m512 c4a = _mm512_setzero_ps(), c4b = _mm512_setzero_ps();
    __m512 c5a = _mm512_setzero_ps(), c5b = _mm512_setzero_ps();
    __m512 c6a = _mm512_setzero_ps(), c6b = _mm512_setzero_ps();
    __m512 c7a = _mm512_setzero_ps(), c7b = _mm512_setzero_ps();
    __m512 c8a = _mm512_setzero_ps(), c8b = _mm512_setzero_ps();
    __m512 c9a = _mm512_setzero_ps(), c9b = _mm512_setzero_ps();
    __m512 cAa = _mm512_setzero_ps(), cAb = _mm512_setzero_ps();
    __m512 cBa = _mm512_setzero_ps(), cBb = _mm512_setzero_ps();
    for (int i = 0; i < m_valid; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(C + static_cast<long>(i) * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(C + static_cast<long>(i) * ldc + 16), _MM_HINT_T0);
    }
    // the prefetch walk: line by line along a row, then the next row
    const char* pf_row = pf.first;
    const char* pf_line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(pf_row) & ~uintptr_t(63));
    const char* pf_end = pf_row + pf.row_bytes;
    int pf_rows = pf.rows;
#pragma GCC unroll 4
    for (int k = 0; k < kc; ++k) {
        if (pf_rows > 0) {
            _mm_prefetch(pf_line, _MM_HINT_T0);
            pf_line += 64;
            if (pf_line >= pf_end) {
                pf_row += pf.stride;
                pf_line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(pf_row) & ~uintptr_t(63));
                pf_end = pf_row + pf.row_bytes;
                --pf_rows;
            }
        }
        if (kDirectB) {
            _mm_prefetch(reinterpret_cast<const char*>(Bp + 8 * b_step), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(Bp + 8 * b_step + 16), _MM_HINT_T0);
        }
        const __m512 b0 = kDirectB ? _mm512_loadu_ps(Bp) : _mm512_load_ps(Bp);
        const __m512 b1 = kDirectB ? _mm512_loadu_ps(Bp + 16) : _mm512_load_ps(Bp + 16);
        __m512 a;
#define NNC_ROW(idx, ca, cb)                  \
    a = _mm512_set1_ps(Ap[idx]);              \
    ca = _mm512_fmadd_ps(a, b0, ca);          \
    cb = _mm512_fmadd_ps(a, b1, cb);
        NNC_ROW(0, c0a, c0b)
        NNC_ROW(1, c1a, c1b)
        NNC_ROW(2, c2a, c2b)
        NNC_ROW(3, c3a, c3b)
        NNC_ROW(4, c4a, c4b)
        NNC_ROW(5, c5a, c5b)
        if (ROWS >= 8) {
            NNC_ROW(6, c6a, c6b)
            NNC_ROW(7, c7a, c7b)
        }
        if (ROWS == 12) {
            NNC_ROW(8, c8a, c8b)
            NNC_ROW(9, c9a, c9b)
            NNC_ROW(10, cAa, cAb)
            NNC_ROW(11, cBa, cBb)
        }
#undef NNC_ROW
        Ap += MR512;
        Bp += kDirectB ? b_step : NR512;
    }
    const __m512 acc[MR512][2] = {{c0a, c0b}, {c1a, c1b}, {c2a, c2b}, {c3a, c3b}, {c4a, c4b}, {c5a, c5b},
                                  {c6a, c6b}, {c7a, c7b}, {c8a, c8b}, {c9a, c9b}, {cAa, cAb}, {cBa, cBb}};
    const bool full = m_valid == ROWS && n_valid == NR512;
    const bool simple_act = ep.act == ACT_NONE || ep.act == ACT_RELU;
    if (full && (!mode.finalize || simple_act)) {
        // Whole tile, epilogue expressible in zmm: no spill, no masks.
        const __m512 alpha = _mm512_set1_ps(mode.alpha), beta = _mm512_set1_ps(mode.beta);
        __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
        const bool col_bias = mode.finalize && ep.col_bias;
        if (col_bias) {
            bias0 = _mm512_loadu_ps(ep.col_bias + j0);
            bias1 = _mm512_loadu_ps(ep.col_bias + j0 + 16);
        }
        for (int i = 0; i < ROWS; ++i) {
            float* c = C + static_cast<long>(i) * ldc;
            __m512 x0 = acc[i][0], x1 = acc[i][1];
            if (mode.alpha != 1.0f) {
                x0 = _mm512_mul_ps(x0, alpha);
                x1 = _mm512_mul_ps(x1, alpha);
            }
            if (mode.load_c) {
                x0 = _mm512_fmadd_ps(beta, _mm512_loadu_ps(c), x0);
                x1 = _mm512_fmadd_ps(beta, _mm512_loadu_ps(c + 16), x1);
            }
            if (mode.finalize) {
                if (col_bias) {
                    x0 = _mm512_add_ps(x0, bias0);
                    x1 = _mm512_add_ps(x1, bias1);
                }
                if (ep.row_bias) {
                    const __m512 rb = _mm512_set1_ps(ep.row_bias[i0 + i]);
                    x0 = _mm512_add_ps(x0, rb);
                    x1 = _mm512_add_ps(x1, rb);
                }
                if (ep.act == ACT_RELU) {
                    x0 = _mm512_max_ps(x0, _mm512_setzero_ps());
                    x1 = _mm512_max_ps(x1, _mm512_setzero_ps());
                }
                if (ep.residual) {
                    const float* r = ep.residual + static_cast<long>(i0 + i) * ep.ldr + j0;
                    x0 = _mm512_add_ps(x0, _mm512_loadu_ps(r));
                    x1 = _mm512_add_ps(x1, _mm512_loadu_ps(r + 16));
                }
            }
            _mm512_storeu_ps(c, x0);
            _mm512_storeu_ps(c + 16, x1);
        }
        return;
    }
    // Edge tiles and the other activations: the shared AVX2 store path.
    alignas(64) float spill[NR512];
    for (int i = 0; i < m_valid; ++i) {
        _mm512_store_ps(spill, acc[i][0]);
        _mm512_store_ps(spill + 16, acc[i][1]);
        const __m256 row[4] = {_mm256_load_ps(spill), _mm256_load_ps(spill + 8), _mm256_load_ps(spill + 16),
                               _mm256_load_ps(spill + 24)};
        store_row<4>(row, C + static_cast<long>(i) * ldc, i0 + i, j0, n_valid, mode, ep);
    }
}

#pragma GCC diagnostic pop

// The 12x32 kernel for a tile with m_valid rows: the 6- and 8-row variants for edge slivers with few
// valid rows (M = 128 ends in an 8-row sliver: a third of its FMAs saved). kDirectB: B read in place,
// b_step floats per row (packed_direct_b), else packed.
template <bool kDirectB>
inline void kernel_12x32_rows(int kc, const float* Ap, const float* Bp, float* C, int ldc, int m_valid, int n_valid,
                              const StoreMode& mode, const Epilogue& ep, int i0, int j0, long b_step,
                              const LinePrefetch& pf = LinePrefetch()) {
    if (m_valid <= 6) {
        kernel_avx512<6, kDirectB>(kc, Ap, Bp, C, ldc, m_valid, n_valid, mode, ep, i0, j0, b_step, pf);
    } else if (m_valid <= 8) {
        kernel_avx512<8, kDirectB>(kc, Ap, Bp, C, ldc, m_valid, n_valid, mode, ep, i0, j0, b_step, pf);
    } else {
        kernel_avx512<12, kDirectB>(kc, Ap, Bp, C, ldc, m_valid, n_valid, mode, ep, i0, j0, b_step, pf);
    }
}

// The packed-path kernel (the signature packed_with calls).
inline void kernel_12x32_avx512(int kc, const float* Ap, const float* Bp, float* C, int ldc, int m_valid,
                                int n_valid, const StoreMode& mode, const Epilogue& ep, int i0, int j0,
                                const LinePrefetch& pf = LinePrefetch()) {
    kernel_12x32_rows<false>(kc, Ap, Bp, C, ldc, m_valid, n_valid, mode, ep, i0, j0, NR512, pf);
}

}  // namespace gemm
}  // namespace nnc
