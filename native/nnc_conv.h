// nnc_conv.h - 2-D convolution (NCHW) through the GEMM, its backward pieces, and pooling.
//
// conv2d: per image and group, im2col into a caller-provided workspace (conv2d_workspace_floats;
// 0 for a 1x1 / stride 1 / no padding conv, which reads the input directly), then
//     y[g] = epilogue(W[g] (Kg x Cg*R*S) @ col (Cg*R*S x P*Q))
// with the per-channel bias fused as the GEMM's row bias.
// Backward: col2im scatters a column matrix back into an image; conv2d_backward_input and
// conv2d_backward_weight use it and the GEMM.
// Pooling: max_pool2d (padding counts as -inf, optional argmax indices), avg_pool2d
// (count_include_pad, torch's divisor rules), global_avg_pool; the backward of both pools.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "nnc_gemm.h"
#include "nnc_vec.h"

namespace nnc {

// Output length of a conv / pool window sweep (torch's formula; ceil_mode for pooling).
inline int window_out_size(int in, int kernel, int stride, int pad, int dilation, bool ceil_mode = false) {
    const int span = in + 2 * pad - dilation * (kernel - 1) - 1;
    int out = (ceil_mode ? (span + stride - 1) / stride : span / stride) + 1;
    // torch: the last window must start inside the input or the left padding.
    if (ceil_mode && (out - 1) * stride >= in + pad) --out;
    return out;
}

struct Conv2dParams {
    int N = 1, C = 1, H = 1, W = 1;  // input
    int K = 1, R = 1, S = 1;         // output channels, kernel height / width
    int stride_h = 1, stride_w = 1;
    int pad_h = 0, pad_w = 0;
    int dil_h = 1, dil_w = 1;
    int groups = 1;
    int P() const { return window_out_size(H, R, stride_h, pad_h, dil_h); }
    int Q() const { return window_out_size(W, S, stride_w, pad_w, dil_w); }
    int group_in() const { return C / groups; }
    int group_out() const { return K / groups; }
    // Whether the input image itself is the column matrix (no im2col needed).
    bool is_pointwise() const {
        return R == 1 && S == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0;
    }
};

// Floats of workspace conv2d / conv2d_backward_* need (one group of one image).
inline long conv2d_workspace_floats(const Conv2dParams& p) {
    if (p.is_pointwise()) return 0;
    return static_cast<long>(p.group_in()) * p.R * p.S * p.P() * p.Q();
}
inline long conv2d_workspace_bytes(const Conv2dParams& p) { return conv2d_workspace_floats(p) * 4; }

// col[(c * R + r) * S + s, p * Q + q] = x[c, p * sh - ph + r * dh, q * sw - pw + s * dw] (0 outside).
inline void im2col(const float* x, int C, int H, int W, int R, int S, int sh, int sw, int ph, int pw, int dh, int dw,
                   int P, int Q, float* col) {
    const long rows = static_cast<long>(C) * R * S;
    const int threads = detail::threads_for(rows * P * Q);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long row = 0; row < rows; ++row) {
        const int s = static_cast<int>(row % S);
        const int r = static_cast<int>((row / S) % R);
        const int c = static_cast<int>(row / (static_cast<long>(R) * S));
        const float* xc = x + static_cast<long>(c) * H * W;
        float* out = col + row * P * Q;
        // Valid q range: 0 <= q * sw - pw + s * dw < W.
        const int w_off = s * dw - pw;
        const int q_lo = w_off >= 0 ? 0 : std::min(Q, (-w_off + sw - 1) / sw);
        const int q_hi = std::max(q_lo, std::min(Q, W - w_off <= 0 ? 0 : (W - w_off - 1) / sw + 1));
        for (int p = 0; p < P; ++p) {
            float* o = out + static_cast<long>(p) * Q;
            const int h = p * sh - ph + r * dh;
            if (h < 0 || h >= H) {
                std::memset(o, 0, sizeof(float) * Q);
                continue;
            }
            const float* xr = xc + static_cast<long>(h) * W + w_off;
            for (int q = 0; q < q_lo; ++q) o[q] = 0.0f;
            if (sw == 1) {
                std::memcpy(o + q_lo, xr + q_lo, sizeof(float) * (q_hi - q_lo));
            } else {
                for (int q = q_lo; q < q_hi; ++q) o[q] = xr[static_cast<long>(q) * sw];
            }
            for (int q = q_hi; q < Q; ++q) o[q] = 0.0f;
        }
    }
}

// The adjoint of im2col: x[c, h, w] += col[...] for every window position that reads (h, w).
// x must be initialized by the caller (zeros for a plain gradient).
inline void col2im(const float* col, int C, int H, int W, int R, int S, int sh, int sw, int ph, int pw, int dh,
                   int dw, int P, int Q, float* x) {
    const int threads = detail::threads_for(static_cast<long>(C) * R * S * P * Q);
    // Parallel over channels: rows of different channels never touch the same x element.
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int c = 0; c < C; ++c) {
        float* xc = x + static_cast<long>(c) * H * W;
        for (int r = 0; r < R; ++r) {
            for (int s = 0; s < S; ++s) {
                const float* in = col + ((static_cast<long>(c) * R + r) * S + s) * P * Q;
                const int w_off = s * dw - pw;
                const int q_lo = w_off >= 0 ? 0 : std::min(Q, (-w_off + sw - 1) / sw);
                const int q_hi = std::max(q_lo, std::min(Q, W - w_off <= 0 ? 0 : (W - w_off - 1) / sw + 1));
                for (int p = 0; p < P; ++p) {
                    const int h = p * sh - ph + r * dh;
                    if (h < 0 || h >= H) continue;
                    float* xr = xc + static_cast<long>(h) * W + w_off;
                    const float* ir = in + static_cast<long>(p) * Q;
                    if (sw == 1) {
                        for (int q = q_lo; q < q_hi; ++q) xr[q] += ir[q];
                    } else {
                        for (int q = q_lo; q < q_hi; ++q) xr[static_cast<long>(q) * sw] += ir[q];
                    }
                }
            }
        }
    }
}

// y[N, K, P, Q] = epilogue(conv(x[N, C, H, W], w[K, C / groups, R, S]) + bias[K]).
// epi: act and alpha apply; residual (if set) is an [N, K, P, Q] tensor (epi.ldr is ignored);
// epi.col_bias / epi.row_bias must be null (use `bias`). workspace: conv2d_workspace_floats(p).
inline void conv2d(const Conv2dParams& p, const float* x, const float* w, const float* bias, float* y,
                   float* workspace, const Epilogue& epi = Epilogue()) {
    const int P = p.P(), Q = p.Q(), Cg = p.group_in(), Kg = p.group_out();
    const long PQ = static_cast<long>(P) * Q;
    const int Kdim = Cg * p.R * p.S;
    const long col_floats = conv2d_workspace_floats(p);
    // One image-group: im2col into `col_buf`, then one GEMM (threaded unless `serial_gemm`).
    auto image_group = [&](int n, int g, float* col_buf, bool serial_gemm) {
        const float* xg = x + (static_cast<long>(n) * p.C + static_cast<long>(g) * Cg) * p.H * p.W;
        const float* col = xg;
        if (!p.is_pointwise()) {
            im2col(xg, Cg, p.H, p.W, p.R, p.S, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dil_h, p.dil_w, P, Q,
                   col_buf);
            col = col_buf;
        }
        const long out_off = (static_cast<long>(n) * p.K + static_cast<long>(g) * Kg) * PQ;
        Epilogue eg = epi;
        eg.col_bias = nullptr;
        eg.row_bias = bias ? bias + static_cast<long>(g) * Kg : nullptr;
        if (epi.residual) {
            eg.residual = epi.residual + out_off;
            eg.ldr = static_cast<int>(PQ);
        }
        const float* wg = w + static_cast<long>(g) * Kg * Kdim;
        if (serial_gemm) {
            gemm::serial(false, false, Kg, static_cast<int>(PQ), Kdim, wg, Kdim, col, static_cast<int>(PQ),
                         y + out_off, static_cast<int>(PQ), 0.0f, eg);
        } else {
            sgemm(false, false, Kg, static_cast<int>(PQ), Kdim, wg, Kdim, col, static_cast<int>(PQ), y + out_off,
                  static_cast<int>(PQ), 0.0f, eg);
        }
    };
    // Small images, several of them: one image-group per thread, each with its own im2col buffer
    // (per-thread scratch; at most kSmallColFloats each). Otherwise images in turn, threads inside.
    constexpr long kSmallColFloats = 1L << 20;
    const long items = static_cast<long>(p.N) * p.groups;
    const long work = static_cast<long>(Kg) * PQ * Kdim;
    const int threads = usable_threads();
    if (threads > 1 && items >= threads && col_floats <= kSmallColFloats && work < 4 * gemm::kMinParallelWork) {
#pragma omp parallel num_threads(threads)
        {
            float* col_buf = thread_scratch(SCRATCH_MISC, static_cast<size_t>(col_floats) + 16);
#pragma omp for schedule(dynamic, 1)
            for (long item = 0; item < items; ++item) {
                image_group(static_cast<int>(item / p.groups), static_cast<int>(item % p.groups), col_buf, true);
            }
        }
        return;
    }
    for (int n = 0; n < p.N; ++n) {
        for (int g = 0; g < p.groups; ++g) image_group(n, g, workspace, false);
    }
}

// dx[N, C, H, W] = conv2d's input gradient for dy[N, K, P, Q] (overwrites dx).
inline void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, float* dx,
                                  float* workspace) {
    const int P = p.P(), Q = p.Q(), Cg = p.group_in(), Kg = p.group_out();
    const long PQ = static_cast<long>(P) * Q;
    const int Kdim = Cg * p.R * p.S;
    for (int n = 0; n < p.N; ++n) {
        for (int g = 0; g < p.groups; ++g) {
            float* dxg = dx + (static_cast<long>(n) * p.C + static_cast<long>(g) * Cg) * p.H * p.W;
            const float* dyg = dy + (static_cast<long>(n) * p.K + static_cast<long>(g) * Kg) * PQ;
            const float* wg = w + static_cast<long>(g) * Kg * Kdim;
            // dcol (Kdim x PQ) = W_g^T (Kdim x Kg) @ dy_g (Kg x PQ)
            float* dcol = p.is_pointwise() ? dxg : workspace;
            sgemm(true, false, Kdim, static_cast<int>(PQ), Kg, wg, Kdim, dyg, static_cast<int>(PQ), dcol,
                  static_cast<int>(PQ), 0.0f);
            if (!p.is_pointwise()) {
                std::memset(dxg, 0, sizeof(float) * Cg * p.H * p.W);
                col2im(dcol, Cg, p.H, p.W, p.R, p.S, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dil_h, p.dil_w, P, Q,
                       dxg);
            }
        }
    }
}

// dw[K, C / groups, R, S] = conv2d's weight gradient (overwrites dw); db[K] (if non-null) = sum of dy.
inline void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw, float* db,
                                   float* workspace) {
    const int P = p.P(), Q = p.Q(), Cg = p.group_in(), Kg = p.group_out();
    const long PQ = static_cast<long>(P) * Q;
    const int Kdim = Cg * p.R * p.S;
    for (int n = 0; n < p.N; ++n) {
        for (int g = 0; g < p.groups; ++g) {
            const float* xg = x + (static_cast<long>(n) * p.C + static_cast<long>(g) * Cg) * p.H * p.W;
            const float* col = xg;
            if (!p.is_pointwise()) {
                im2col(xg, Cg, p.H, p.W, p.R, p.S, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dil_h, p.dil_w, P, Q,
                       workspace);
                col = workspace;
            }
            const float* dyg = dy + (static_cast<long>(n) * p.K + static_cast<long>(g) * Kg) * PQ;
            // dW_g (Kg x Kdim) += dy_g (Kg x PQ) @ col^T (PQ x Kdim)
            sgemm(false, true, Kg, Kdim, static_cast<int>(PQ), dyg, static_cast<int>(PQ), col, static_cast<int>(PQ),
                  dw + static_cast<long>(g) * Kg * Kdim, Kdim, n == 0 ? 0.0f : 1.0f);
        }
    }
    if (db) {
        for (int k = 0; k < p.K; ++k) db[k] = 0.0f;
        for (int n = 0; n < p.N; ++n) {
            for (int k = 0; k < p.K; ++k) db[k] += row_sum(dy + (static_cast<long>(n) * p.K + k) * PQ, PQ);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pooling on [N, C, H, W] -> [N, C, P, Q] (P, Q from window_out_size)
// ---------------------------------------------------------------------------------------------

struct Pool2dParams {
    int N = 1, C = 1, H = 1, W = 1;
    int kh = 1, kw = 1;
    int stride_h = 1, stride_w = 1;
    int pad_h = 0, pad_w = 0;
    int dil_h = 1, dil_w = 1;  // max pool only
    bool ceil_mode = false;
    bool count_include_pad = true;  // avg pool only
    int P() const { return window_out_size(H, kh, stride_h, pad_h, dil_h, ceil_mode); }
    int Q() const { return window_out_size(W, kw, stride_w, pad_w, dil_w, ceil_mode); }
};

// Max pool; indices (optional, [N, C, P, Q]) receive h * W + w of each maximum (torch's layout).
inline void max_pool2d(const Pool2dParams& p, const float* x, float* y, int32_t* indices = nullptr) {
    const int P = p.P(), Q = p.Q();
    const long planes = static_cast<long>(p.N) * p.C;
    const int threads = detail::threads_for(planes * P * Q * p.kh * p.kw);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long plane = 0; plane < planes; ++plane) {
        const float* xp = x + plane * p.H * p.W;
        float* yp = y + plane * P * Q;
        int32_t* ip = indices ? indices + plane * P * Q : nullptr;
        for (int oh = 0; oh < P; ++oh) {
            for (int ow = 0; ow < Q; ++ow) {
                float best = -INFINITY;
                int best_idx = -1;
                for (int r = 0; r < p.kh; ++r) {
                    const int h = oh * p.stride_h - p.pad_h + r * p.dil_h;
                    if (h < 0 || h >= p.H) continue;
                    for (int s = 0; s < p.kw; ++s) {
                        const int w = ow * p.stride_w - p.pad_w + s * p.dil_w;
                        if (w < 0 || w >= p.W) continue;
                        const float v = xp[static_cast<long>(h) * p.W + w];
                        if (v > best || best_idx < 0 || v != v) {
                            best = v;
                            best_idx = h * p.W + w;
                            if (v != v) break;
                        }
                    }
                }
                yp[static_cast<long>(oh) * Q + ow] = best;
                if (ip) ip[static_cast<long>(oh) * Q + ow] = best_idx;
            }
        }
    }
}

// Average pool with torch's divisor: the window clipped to the padded input when
// count_include_pad, else to the input itself.
inline void avg_pool2d(const Pool2dParams& p, const float* x, float* y) {
    const int P = p.P(), Q = p.Q();
    const long planes = static_cast<long>(p.N) * p.C;
    const int threads = detail::threads_for(planes * P * Q * p.kh * p.kw);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long plane = 0; plane < planes; ++plane) {
        const float* xp = x + plane * p.H * p.W;
        float* yp = y + plane * P * Q;
        for (int oh = 0; oh < P; ++oh) {
            int h0 = oh * p.stride_h - p.pad_h;
            int h1 = std::min(h0 + p.kh, p.H + p.pad_h);
            const int pool_h = h1 - h0;
            h0 = std::max(h0, 0);
            h1 = std::min(h1, p.H);
            for (int ow = 0; ow < Q; ++ow) {
                int w0 = ow * p.stride_w - p.pad_w;
                int w1 = std::min(w0 + p.kw, p.W + p.pad_w);
                const int pool_w = w1 - w0;
                w0 = std::max(w0, 0);
                w1 = std::min(w1, p.W);
                float sum = 0.0f;
                for (int h = h0; h < h1; ++h) {
                    for (int w = w0; w < w1; ++w) sum += xp[static_cast<long>(h) * p.W + w];
                }
                const int count = p.count_include_pad ? pool_h * pool_w : (h1 - h0) * (w1 - w0);
                yp[static_cast<long>(oh) * Q + ow] = count > 0 ? sum / static_cast<float>(count) : 0.0f;
            }
        }
    }
}

// dx[N, C, H, W] = max_pool2d's input gradient: dy scattered to the argmax positions that
// max_pool2d recorded in `indices` (overwrites dx).
inline void max_pool2d_backward(const Pool2dParams& p, const float* dy, const int32_t* indices, float* dx) {
    const long PQ = static_cast<long>(p.P()) * p.Q();
    const long HW = static_cast<long>(p.H) * p.W;
    const long planes = static_cast<long>(p.N) * p.C;
    const int threads = detail::threads_for(planes * (PQ + HW));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long plane = 0; plane < planes; ++plane) {
        float* dxp = dx + plane * HW;
        std::memset(dxp, 0, sizeof(float) * HW);
        const float* dyp = dy + plane * PQ;
        const int32_t* ip = indices + plane * PQ;
        for (long o = 0; o < PQ; ++o) {
            if (ip[o] >= 0) dxp[ip[o]] += dyp[o];
        }
    }
}

// dx[N, C, H, W] = avg_pool2d's input gradient (same divisor rules; overwrites dx).
inline void avg_pool2d_backward(const Pool2dParams& p, const float* dy, float* dx) {
    const int P = p.P(), Q = p.Q();
    const long HW = static_cast<long>(p.H) * p.W;
    const long planes = static_cast<long>(p.N) * p.C;
    const int threads = detail::threads_for(planes * P * Q * p.kh * p.kw);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long plane = 0; plane < planes; ++plane) {
        float* dxp = dx + plane * HW;
        std::memset(dxp, 0, sizeof(float) * HW);
        const float* dyp = dy + plane * P * Q;
        for (int oh = 0; oh < P; ++oh) {
            int h0 = oh * p.stride_h - p.pad_h;
            int h1 = std::min(h0 + p.kh, p.H + p.pad_h);
            const int pool_h = h1 - h0;
            h0 = std::max(h0, 0);
            h1 = std::min(h1, p.H);
            for (int ow = 0; ow < Q; ++ow) {
                int w0 = ow * p.stride_w - p.pad_w;
                int w1 = std::min(w0 + p.kw, p.W + p.pad_w);
                const int pool_w = w1 - w0;
                w0 = std::max(w0, 0);
                w1 = std::min(w1, p.W);
                const int count = p.count_include_pad ? pool_h * pool_w : (h1 - h0) * (w1 - w0);
                if (count <= 0) continue;
                const float g = dyp[static_cast<long>(oh) * Q + ow] / static_cast<float>(count);
                for (int h = h0; h < h1; ++h) {
                    for (int w = w0; w < w1; ++w) dxp[static_cast<long>(h) * p.W + w] += g;
                }
            }
        }
    }
}

// y[N, C] = mean over H * W of x[N, C, H, W].
inline void global_avg_pool(const float* x, float* y, long N, long C, long HW) {
    reduce_axis(x, y, N * C, HW, 1, REDUCE_MEAN);
}

}  // namespace nnc
