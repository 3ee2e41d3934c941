// nnc_math512.h - AVX-512F (16-lane, zmm) twins of the nnc_math.h functions that elementwise chains
// spend their time in (exp, erf, tanh, sigmoid, the GELU forms), chosen at run time.
//
// Generated code is compiled for x86-64-v3 (AVX2 + FMA); these functions carry
// __attribute__((target("avx512f"))) and are only called from chain loops compiled for that target
// (a lambda with the same attribute) when simd_use_avx512() says the CPU has AVX-512F and
// NNC_NO_AVX512 is not set. Each runs the same operations as its __m256 twin, lane by lane (same
// polynomials, same FMAs, the same division), so the functions give bit-identical results; a
// generated chain around them may still differ by an ulp where g++ contracts one of its
// multiply-adds into an FMA in one loop and not in the other.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdlib>

#include "nnc_math.h"

#define NNC_AVX512 __attribute__((target("avx512f")))

namespace nnc {

// Whether elementwise chains may run their zmm loop (read once per process).
inline bool simd_use_avx512() {
    static const bool enabled = __builtin_cpu_supports("avx512f") && std::getenv("NNC_NO_AVX512") == nullptr;
    return enabled;
}

NNC_AVX512 inline __m512 exp_ps512(__m512 x) {
    using namespace detail;
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
    __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(kLog2e), magic);
    __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpP0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic));
    __m512i half = _mm512_srai_epi32(ni, 1);
    __m512i rest = _mm512_sub_epi32(ni, half);
    __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, _mm512_set1_epi32(127)), 23));
    __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(rest, _mm512_set1_epi32(127)), 23));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
    // Out-of-range and NaN lanes are rare: fix them up only when present.
    if (_mm512_cmp_ps_mask(xc, x, _CMP_NEQ_UQ)) {
        y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ), _mm512_setzero_ps());
        y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpHi), _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
        y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
    }
    return y;
}

NNC_AVX512 inline __m512 abs_ps512(__m512 x) {
    return _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_castps_si512(_mm512_set1_ps(-0.0f)), _mm512_castps_si512(x)));
}

NNC_AVX512 inline __m512 neg_ps512(__m512 x) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_castps_si512(_mm512_set1_ps(-0.0f))));
}

NNC_AVX512 inline __m512 tanh_ps512(__m512 x) {
    using namespace detail;
    const __m512i sign_mask = _mm512_castps_si512(_mm512_set1_ps(-0.0f));
    __m512 ax = abs_ps512(x);
    __m512i sign = _mm512_and_si512(sign_mask, _mm512_castps_si512(x));
    // Large |x|: 1 - 2 / (exp(2|x|) + 1); exp saturates to inf -> exactly 1.
    __m512 e = exp_ps512(_mm512_add_ps(ax, ax));
    __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                               _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(kTanhP0);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP1));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP2));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP3));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP4));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    __m512 r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), sign));
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), small);
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

NNC_AVX512 inline __m512 erf_ps512(__m512 x) {
    using namespace detail;
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
    __m512 z = _mm512_mul_ps(xc, xc);
    __m512 a = _mm512_set1_ps(kErfA13);
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA11));
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA9));
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA7));
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA5));
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA3));
    a = _mm512_fmadd_ps(a, z, _mm512_set1_ps(kErfA1));
    a = _mm512_mul_ps(a, xc);
    __m512 b = _mm512_set1_ps(kErfB8);
    b = _mm512_fmadd_ps(b, z, _mm512_set1_ps(kErfB6));
    b = _mm512_fmadd_ps(b, z, _mm512_set1_ps(kErfB4));
    b = _mm512_fmadd_ps(b, z, _mm512_set1_ps(kErfB2));
    b = _mm512_fmadd_ps(b, z, _mm512_set1_ps(kErfB0));
    __m512 r = _mm512_div_ps(a, b);
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

NNC_AVX512 inline __m512 sigmoid_ps512(__m512 x) {
    __m512 e = exp_ps512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

NNC_AVX512 inline __m512 gelu_erf_ps512(__m512 x) {
    __m512 cdf = _mm512_fmadd_ps(erf_ps512(_mm512_mul_ps(x, _mm512_set1_ps(detail::kInvSqrt2))),
                                 _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
    return _mm512_mul_ps(x, cdf);
}

NNC_AVX512 inline __m512 gelu_tanh_ps512(__m512 x) {
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 inner = _mm512_mul_ps(_mm512_set1_ps(detail::kSqrt2OverPi),
                                 _mm512_fmadd_ps(x3, _mm512_set1_ps(detail::kGeluTanhCubic), x));
    __m512 cdf = _mm512_fmadd_ps(tanh_ps512(inner), _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
    return _mm512_mul_ps(x, cdf);
}

}  // namespace nnc
