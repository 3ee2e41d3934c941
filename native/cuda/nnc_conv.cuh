// nnc_conv.cuh - 2-D convolution (NCHW, groups) and its gradients as implicit GEMMs on nnc_gemm.cuh.
//
// Batch z of each GEMM is a group g. With og = O / groups, cg = C / groups, kdim = cg * KH * KW,
// PQ = OH * OW:
//   forward:      Y[n, g*og + o, p]      = sum_k  W[g*og + o, k]    * im2col(X[n, g])[k, p]
//                 GEMM M = og, N = Nimg * PQ, K = kdim
//   grad input:   dX[n, g*cg + c, y, x]  = sum_(o, r) W[g*og + o, c, r] * dY[n, g*og + o, (y, x) - r]
//                 GEMM M = cg, N = Nimg * H * W, K = og * KH * KW (the stride test is in the loader)
//   grad weight:  dW[g*og + o, k]        = sum_(n, p) dY[n, g*og + o, p] * im2col(X[n, g])[k, p]
//                 GEMM M = og, N = kdim, K = Nimg * PQ
// No column buffer is written and no atomics are used, so every run gives the same bits.
#pragma once

#include "nnc_gemm.cuh"

namespace nnc {
namespace cuda {

struct ConvGeom {
    int n, c, h, w, o, cg, og, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, groups;
};

// element of im2col(X[n, g]): row k = (c, ki, kj), column p = (oy, ox)
NNC_HD float im2col_at(const float* x, const ConvGeom& g, int n, int grp, int k, int p) {
    const int khw = g.kh * g.kw;
    const int c = k / khw, r = k % khw, ki = r / g.kw, kj = r % g.kw;
    const int oy = p / g.ow, ox = p % g.ow;
    const int iy = oy * g.sh - g.ph + ki * g.dh, ix = ox * g.sw - g.pw + kj * g.dw;
    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return 0.0f;
    return x[(((long long)n * g.c + grp * g.cg + c) * g.h + iy) * g.w + ix];
}

struct ConvWeightA {           // forward A: W_g (og x kdim)
    const float* w; ConvGeom g;
    NNC_HD float operator()(int z, int m, int k) const {
        const long long kdim = (long long)g.cg * g.kh * g.kw;
        return w[((long long)z * g.og + m) * kdim + k];
    }
    NNC_HD bool col_fast() const { return true; }
};

struct ConvImageB {            // forward B: im2col of every image side by side (kdim x Nimg*PQ)
    const float* x; ConvGeom g;
    NNC_HD float operator()(int z, int k, int col) const {
        const int pq = g.oh * g.ow;
        return im2col_at(x, g, col / pq, z, k, col % pq);
    }
    NNC_HD bool col_fast() const { return true; }
};

struct ConvStore {             // forward store: Y[n, g*og + m, p] with the epilogue (row_bias = conv bias)
    float* y; ConvGeom g; Epilogue e;
    NNC_HD void operator()(int z, int m, int col, float acc) const {
        const int pq = g.oh * g.ow;
        const int n = col / pq, p = col % pq;
        const long long index = ((long long)n * g.o + z * g.og + m) * pq + p;
        y[index] = e.apply(acc, 0.0f, z, m, col, index);
    }
};

struct ConvGradInA {           // grad input A: A(c, (o, r)) = W[g*og + o, c, r]
    const float* w; ConvGeom g;
    NNC_HD float operator()(int z, int c, int k) const {
        const int khw = g.kh * g.kw;
        const int o = k / khw, r = k % khw;
        return w[(((long long)z * g.og + o) * g.cg + c) * khw + r];
    }
    NNC_HD bool col_fast() const { return false; }
};

struct ConvGradInB {           // grad input B: B((o, r), (n, y, x)) = dY[n, g*og + o, oy, ox] where valid
    const float* dy; ConvGeom g;
    NNC_HD float operator()(int z, int k, int col) const {
        const int khw = g.kh * g.kw, hw = g.h * g.w;
        const int o = k / khw, r = k % khw, ki = r / g.kw, kj = r % g.kw;
        const int n = col / hw, q = col % hw, y = q / g.w, x = q % g.w;
        const int ty = y + g.ph - ki * g.dh, tx = x + g.pw - kj * g.dw;
        if (ty < 0 || tx < 0 || ty % g.sh != 0 || tx % g.sw != 0) return 0.0f;
        const int oy = ty / g.sh, ox = tx / g.sw;
        if (oy >= g.oh || ox >= g.ow) return 0.0f;
        return dy[(((long long)n * g.o + z * g.og + o) * g.oh + oy) * g.ow + ox];
    }
    NNC_HD bool col_fast() const { return true; }
};

struct ConvGradInStore {
    float* dx; ConvGeom g;
    NNC_HD void operator()(int z, int c, int col, float acc) const {
        const int hw = g.h * g.w;
        const int n = col / hw, q = col % hw;
        dx[((long long)n * g.c + z * g.cg + c) * hw + q] = acc;
    }
};

struct ConvGradWA {            // grad weight A: A(o, (n, p)) = dY[n, g*og + o, p]
    const float* dy; ConvGeom g;
    NNC_HD float operator()(int z, int m, int k) const {
        const int pq = g.oh * g.ow;
        return dy[((long long)(k / pq) * g.o + z * g.og + m) * pq + k % pq];
    }
    NNC_HD bool col_fast() const { return true; }
};

struct ConvGradWB {            // grad weight B: B((n, p), k) = im2col(X[n, g])[k, p]
    const float* x; ConvGeom g;
    NNC_HD float operator()(int z, int kk, int j) const {
        const int pq = g.oh * g.ow;
        return im2col_at(x, g, kk / pq, z, j, kk % pq);
    }
    NNC_HD bool col_fast() const { return false; }
};

struct ConvGradWStore {
    float* dw; ConvGeom g;
    NNC_HD void operator()(int z, int m, int j, float acc) const {
        const long long kdim = (long long)g.cg * g.kh * g.kw;
        dw[((long long)z * g.og + m) * kdim + j] = acc;
    }
};

// The three convolution GEMMs as (M, N, K, batches, A loader, B loader, store), handed to `gemm`:
// gemm_launch on the device, a plain loop in tests/cuda/host_check.cu.
template <class Gemm>
inline void conv2d_forward_gemm(const float* x, const float* w, float* y, const ConvGeom& g, Epilogue e, Gemm&& gemm) {
    e.row_bias_stride = g.og;   // row_bias (the conv bias) of group z starts at z * og
    gemm(g.og, g.n * g.oh * g.ow, g.cg * g.kh * g.kw, g.groups, ConvWeightA{w, g}, ConvImageB{x, g}, ConvStore{y, g, e});
}

template <class Gemm>
inline void conv2d_grad_input_gemm(const float* dy, const float* w, float* dx, const ConvGeom& g, Gemm&& gemm) {
    gemm(g.cg, g.n * g.h * g.w, g.og * g.kh * g.kw, g.groups, ConvGradInA{w, g}, ConvGradInB{dy, g}, ConvGradInStore{dx, g});
}

template <class Gemm>
inline void conv2d_grad_weight_gemm(const float* x, const float* dy, float* dw, const ConvGeom& g, Gemm&& gemm) {
    gemm(g.og, g.cg * g.kh * g.kw, g.n * g.oh * g.ow, g.groups, ConvGradWA{dy, g}, ConvGradWB{x, g}, ConvGradWStore{dw, g});
}

struct DeviceGemm {
    cudaStream_t stream;
    template <class LA, class LB, class ST>
    void operator()(int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) const {
        gemm_launch(stream, M, N, K, batches, la, lb, st);
    }
};

// (templates, so that a module instantiates the GEMM kernels of only the convolutions it has)
template <int Unused = 0>
inline void conv2d_forward(cudaStream_t s, const float* x, const float* w, float* y, const ConvGeom& g, Epilogue e) {
    conv2d_forward_gemm(x, w, y, g, e, DeviceGemm{s});
}

template <int Unused = 0>
inline void conv2d_grad_input(cudaStream_t s, const float* dy, const float* w, float* dx, const ConvGeom& g) {
    conv2d_grad_input_gemm(dy, w, dx, g, DeviceGemm{s});
}

template <int Unused = 0>
inline void conv2d_grad_weight(cudaStream_t s, const float* x, const float* dy, float* dw, const ConvGeom& g) {
    conv2d_grad_weight_gemm(x, dy, dw, g, DeviceGemm{s});
}

}  // namespace cuda
}  // namespace nnc
