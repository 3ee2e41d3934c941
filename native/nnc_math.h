// nnc_math.h - AVX2/FMA vectorized transcendental functions and activations.
//
// Every function here works on 8 floats at once (__m256) and has a scalar twin that runs the
// exact same polynomial, so tails of arrays give bit-identical results to the vector body.
//
//   exp  : Cephes-style range reduction (x = n ln2 + r), degree-6 polynomial; rel err < 2 ulp
//          for x in [-87.3, 88.7]; 0 below, +inf above, NaN propagates.
//   log  : Cephes logf (mantissa in [sqrt(.5), sqrt(2)), degree-8 polynomial); -inf at 0, NaN < 0.
//   tanh : odd polynomial for |x| < 0.625, 1 - 2/(exp(2|x|)+1) above (sign restored).
//   erf  : rational approximation x P(x^2) / Q(x^2), x clamped to [-4, 4] (erf is +-1 in fp32 there).
//   sigmoid, silu, gelu (erf and tanh forms), relu.
//
// Activation codes (ACT_*) are shared with the GEMM / conv epilogues.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nnc {

enum Activation : int {
    ACT_NONE = 0,
    ACT_RELU = 1,
    ACT_GELU_ERF = 2,
    ACT_GELU_TANH = 3,
    ACT_TANH = 4,
    ACT_SIGMOID = 5,
    ACT_SILU = 6,
};

namespace detail {

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

constexpr float kExpHi = 88.72283172607422f;  // largest float whose exp is finite
constexpr float kExpLo = -87.3365447504019f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// exp(r) - 1 - r = r^2 * P(r), r in [-ln2/2, ln2/2] (Cephes expf coefficients).
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// log(1+f) = f - f^2/2 + f^3 * P(f) (Cephes logf coefficients).
constexpr float kLogP0 = 7.0376836292e-2f;
constexpr float kLogP1 = -1.1514610310e-1f;
constexpr float kLogP2 = 1.1676998740e-1f;
constexpr float kLogP3 = -1.2420140846e-1f;
constexpr float kLogP4 = 1.4249322787e-1f;
constexpr float kLogP5 = -1.6668057665e-1f;
constexpr float kLogP6 = 2.0000714765e-1f;
constexpr float kLogP7 = -2.4999993993e-1f;
constexpr float kLogP8 = 3.3333331174e-1f;
constexpr float kSqrtHalf = 0.707106781186547524f;

// tanh(x) = x + x^3 P(x^2) for |x| < 0.625 (Cephes tanhf coefficients).
constexpr float kTanhP0 = -5.70498872745e-3f;
constexpr float kTanhP1 = 2.06390887954e-2f;
constexpr float kTanhP2 = -5.37397155531e-2f;
constexpr float kTanhP3 = 1.33314422036e-1f;
constexpr float kTanhP4 = -3.33332819422e-1f;

// erf(x) = x * A(x^2) / B(x^2) on [-4, 4].
constexpr float kErfA1 = -1.60960333262415e-02f;
constexpr float kErfA3 = -2.95459980854025e-03f;
constexpr float kErfA5 = -7.34990630326855e-04f;
constexpr float kErfA7 = -5.69250639462346e-05f;
constexpr float kErfA9 = -2.10102402082508e-06f;
constexpr float kErfA11 = 2.77068142495902e-08f;
constexpr float kErfA13 = -2.72614225801306e-10f;
constexpr float kErfB0 = -1.42647390514189e-02f;
constexpr float kErfB2 = -7.37332916720468e-03f;
constexpr float kErfB4 = -1.68282697438203e-03f;
constexpr float kErfB6 = -2.13374055278905e-04f;
constexpr float kErfB8 = -1.45660718464996e-05f;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------------

inline __m256 exp_ps(__m256 x) {
    using namespace detail;
    // n = round(x / ln2) by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
    __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), magic);
    __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpP0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
    __m256i half = _mm256_srai_epi32(ni, 1);
    __m256i rest = _mm256_sub_epi32(ni, half);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    // Out-of-range and NaN lanes are rare: fix them up only when present.
    const __m256 special = _mm256_cmp_ps(xc, x, _CMP_NEQ_UQ);
    if (_mm256_movemask_ps(special)) {
        y = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ), y);
        y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(kExpHi), _CMP_GT_OQ));
        y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    return y;
}

inline float exp_scalar(float x) {
    using namespace detail;
    if (x != x) return x;
    if (x < kExpLo) return 0.0f;
    if (x > kExpHi) return INFINITY;
    float n = std::nearbyint(x * kLog2e);
    float r = std::fma(-n, kLn2Hi, x);
    r = std::fma(-n, kLn2Lo, r);
    float p = kExpP0;
    p = std::fma(p, r, kExpP1);
    p = std::fma(p, r, kExpP2);
    p = std::fma(p, r, kExpP3);
    p = std::fma(p, r, kExpP4);
    p = std::fma(p, r, kExpP5);
    p = std::fma(p, r * r, r + 1.0f);
    int ni = static_cast<int>(n);
    int half = ni >> 1;
    int rest = ni - half;
    float s1 = bits_to_float(static_cast<uint32_t>(half + 127) << 23);
    float s2 = bits_to_float(static_cast<uint32_t>(rest + 127) << 23);
    return p * s1 * s2;
}

// ---------------------------------------------------------------------------------------------
// log
// ---------------------------------------------------------------------------------------------

inline __m256 log_ps(__m256 x) {
    using namespace detail;
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 invalid = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NGE_UQ);  // x < 0 or NaN
    const __m256 is_zero = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256 is_inf = _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
    // Denormals: scale up by 2^23 first and correct the exponent afterwards.
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
    __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);
    __m256 e_adjust = _mm256_and_ps(tiny, _mm256_set1_ps(23.0f));
    __m256i bits = _mm256_castps_si256(xs);
    __m256i exp_i = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
    __m256 e = _mm256_sub_ps(_mm256_cvtepi32_ps(exp_i), e_adjust);
    const __m256 small_m = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrtHalf), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small_m, one));
    __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small_m, m)), one);
    __m256 z = _mm256_mul_ps(f, f);
    __m256 p = _mm256_set1_ps(kLogP0);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP7));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogP8));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(detail::kLn2Lo), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    __m256 r = _mm256_add_ps(f, y);
    r = _mm256_fmadd_ps(e, _mm256_set1_ps(detail::kLn2Hi), r);
    r = _mm256_blendv_ps(r, _mm256_set1_ps(NAN), invalid);
    r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), is_zero);
    return _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), is_inf);
}

inline float log_scalar(float x) {
    using namespace detail;
    if (!(x >= 0.0f)) return NAN;
    if (x == 0.0f) return -INFINITY;
    if (x == INFINITY) return INFINITY;
    float e_adjust = 0.0f;
    if (x < 1.17549435e-38f) {
        x *= 8388608.0f;
        e_adjust = 23.0f;
    }
    uint32_t bits = float_to_bits(x);
    float e = static_cast<float>(static_cast<int>(bits >> 23) - 126) - e_adjust;
    float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
    if (m < kSqrtHalf) {
        e -= 1.0f;
        m = m + m;
    }
    float f = m - 1.0f;
    float z = f * f;
    float p = kLogP0;
    p = std::fma(p, f, kLogP1);
    p = std::fma(p, f, kLogP2);
    p = std::fma(p, f, kLogP3);
    p = std::fma(p, f, kLogP4);
    p = std::fma(p, f, kLogP5);
    p = std::fma(p, f, kLogP6);
    p = std::fma(p, f, kLogP7);
    p = std::fma(p, f, kLogP8);
    float y = (p * f) * z;
    y = std::fma(e, kLn2Lo, y);
    y = std::fma(-z, 0.5f, y);
    float r = f + y;
    return std::fma(e, kLn2Hi, r);
}

// ---------------------------------------------------------------------------------------------
// tanh, erf
// ---------------------------------------------------------------------------------------------

inline __m256 tanh_ps(__m256 x) {
    using namespace detail;
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign_mask, x);
    __m256 sign = _mm256_and_ps(sign_mask, x);
    // Large |x|: 1 - 2 / (exp(2|x|) + 1); exp saturates to inf -> exactly 1.
    __m256 e = exp_ps(_mm256_add_ps(ax, ax));
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(kTanhP0);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP1));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP2));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP3));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP4));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    __m256 use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
    __m256 r = _mm256_blendv_ps(_mm256_or_ps(big, sign), small, use_small);
    const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_ps(r, x, is_nan);
}

inline float tanh_scalar(float x) {
    using namespace detail;
    if (x != x) return x;
    float ax = std::fabs(x);
    if (ax < 0.625f) {
        float z = x * x;
        float p = kTanhP0;
        p = std::fma(p, z, kTanhP1);
        p = std::fma(p, z, kTanhP2);
        p = std::fma(p, z, kTanhP3);
        p = std::fma(p, z, kTanhP4);
        return std::fma(p * z, x, x);
    }
    float e = exp_scalar(ax + ax);
    float big = 1.0f - 2.0f / (e + 1.0f);
    return std::copysign(big, x);
}

inline __m256 erf_ps(__m256 x) {
    using namespace detail;
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    __m256 z = _mm256_mul_ps(xc, xc);
    __m256 a = _mm256_set1_ps(kErfA13);
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA11));
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA9));
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA7));
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA5));
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA3));
    a = _mm256_fmadd_ps(a, z, _mm256_set1_ps(kErfA1));
    a = _mm256_mul_ps(a, xc);
    __m256 b = _mm256_set1_ps(kErfB8);
    b = _mm256_fmadd_ps(b, z, _mm256_set1_ps(kErfB6));
    b = _mm256_fmadd_ps(b, z, _mm256_set1_ps(kErfB4));
    b = _mm256_fmadd_ps(b, z, _mm256_set1_ps(kErfB2));
    b = _mm256_fmadd_ps(b, z, _mm256_set1_ps(kErfB0));
    __m256 r = _mm256_div_ps(a, b);
    const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_ps(r, x, is_nan);
}

inline float erf_scalar(float x) {
    using namespace detail;
    if (x != x) return x;
    float xc = std::fmin(std::fmax(x, -4.0f), 4.0f);
    float z = xc * xc;
    float a = kErfA13;
    a = std::fma(a, z, kErfA11);
    a = std::fma(a, z, kErfA9);
    a = std::fma(a, z, kErfA7);
    a = std::fma(a, z, kErfA5);
    a = std::fma(a, z, kErfA3);
    a = std::fma(a, z, kErfA1);
    a = a * xc;
    float b = kErfB8;
    b = std::fma(b, z, kErfB6);
    b = std::fma(b, z, kErfB4);
    b = std::fma(b, z, kErfB2);
    b = std::fma(b, z, kErfB0);
    return a / b;
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

inline __m256 sigmoid_ps(__m256 x) {
    // 1 / (1 + exp(-x)); exp(-x) = inf for very negative x gives exactly 0.
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x));
    return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float sigmoid_scalar(float x) { return 1.0f / (1.0f + exp_scalar(-x)); }

inline __m256 gelu_erf_ps(__m256 x) {
    __m256 cdf = _mm256_fmadd_ps(erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(detail::kInvSqrt2))),
                                 _mm256_set1_ps(0.5f), _mm256_set1_ps(0.5f));
    return _mm256_mul_ps(x, cdf);
}

inline float gelu_erf_scalar(float x) { return x * std::fma(erf_scalar(x * detail::kInvSqrt2), 0.5f, 0.5f); }

inline __m256 gelu_tanh_ps(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 inner = _mm256_mul_ps(_mm256_set1_ps(detail::kSqrt2OverPi),
                                 _mm256_fmadd_ps(x3, _mm256_set1_ps(detail::kGeluTanhCubic), x));
    __m256 cdf = _mm256_fmadd_ps(tanh_ps(inner), _mm256_set1_ps(0.5f), _mm256_set1_ps(0.5f));
    return _mm256_mul_ps(x, cdf);
}

inline float gelu_tanh_scalar(float x) {
    float inner = detail::kSqrt2OverPi * std::fma(x * x * x, detail::kGeluTanhCubic, x);
    return x * std::fma(tanh_scalar(inner), 0.5f, 0.5f);
}

inline __m256 activate_ps(__m256 x, int act) {
    switch (act) {
        case ACT_RELU: return _mm256_max_ps(x, _mm256_setzero_ps());
        case ACT_GELU_ERF: return gelu_erf_ps(x);
        case ACT_GELU_TANH: return gelu_tanh_ps(x);
        case ACT_TANH: return tanh_ps(x);
        case ACT_SIGMOID: return sigmoid_ps(x);
        case ACT_SILU: return _mm256_mul_ps(x, sigmoid_ps(x));
        default: return x;
    }
}

inline float activate_scalar(float x, int act) {
    switch (act) {
        case ACT_RELU: return x > 0.0f ? x : 0.0f;
        case ACT_GELU_ERF: return gelu_erf_scalar(x);
        case ACT_GELU_TANH: return gelu_tanh_scalar(x);
        case ACT_TANH: return tanh_scalar(x);
        case ACT_SIGMOID: return sigmoid_scalar(x);
        case ACT_SILU: return x * sigmoid_scalar(x);
        default: return x;
    }
}

// ---------------------------------------------------------------------------------------------
// Horizontal helpers and tail masks
// ---------------------------------------------------------------------------------------------

inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Lane mask with the first n (0..8) lanes set, for _mm256_maskload_ps / _mm256_maskstore_ps.
inline __m256i tail_mask(int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
}

}  // namespace nnc
