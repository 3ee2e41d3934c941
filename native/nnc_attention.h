// nnc_attention.h - fused scaled-dot-product attention on [B, H, L, D] tensors, forward and backward.
//
//   O[b, h] = softmax(scale * Q[b, h] K[b, h]^T + mask) V[b, h]
//
// Forward: work items are (batch * head, block of query rows); each thread computes its block's scores
// with the GEMM (scale fused as alpha, the additive mask fused as the residual), runs the row softmax
// in place over each row's visible keys (zeros past them), and multiplies by V, all in per-thread
// scratch of rows_per_block * Lk floats. Causal masking follows torch (is_causal: key j is visible to
// query i when j <= i); a causal block only touches the keys its last row can see.
//
// Backward (attention_backward): work items are whole (batch * head) slices, so each thread owns its
// slice of dK and dV and accumulates them without atomics. Per block of query rows it recomputes
// P = softmax(scale Q K^T) and dP = dO V^T for the visible keys only, turns dP into
// dS = P * (dP - rowsum(dP * P)) * scale in place and runs dQ = dS K; then, per block of keys, dV += P^T dO
// and dK += dS^T Q over the rows that see the block (K = up to Lq rows, not one row block, for the GEMM).
// P and dS live in per-thread scratch, a panel of query rows at a time (at most kAttentionPanelFloats
// each); nothing of size L x L reaches the arena.
#pragma once

#include <algorithm>
#include <cmath>

#include "nnc_gemm.h"
#include "nnc_vec.h"

namespace nnc {

// Query rows per work item of the forward and per step of the backward (measured on the gpt step,
// T = 128, head dim 64: 32 beats 64 by skipping more of the causal triangle).
constexpr int kAttentionRows = 32;
// Per-thread bound on the backward's probabilities (and as many of their gradients), in floats.
constexpr int kAttentionPanelFloats = 1 << 16;

// Q: [BH, Lq, D], K: [BH, Lk, D], V: [BH, Lk, Dv], O: [BH, Lq, Dv]; mask (optional): [Lq, Lk]
// additive, shared by all batch items and heads.
inline void attention(const float* Q, const float* K, const float* V, float* O, int BH, int Lq, int Lk, int D, int Dv,
                      float scale, bool causal, const float* mask = nullptr) {
    constexpr int kRowsPerBlock = kAttentionRows;
    const int row_blocks = (Lq + kRowsPerBlock - 1) / kRowsPerBlock;
    const long items = static_cast<long>(BH) * row_blocks;
    const int threads = std::max(1, static_cast<int>(std::min<long>(usable_threads(), items)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* scores = thread_scratch(SCRATCH_ROW, static_cast<size_t>(kRowsPerBlock) * Lk + 16);
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < items; ++item) {
            const int bh = static_cast<int>(item / row_blocks);
            const int i0 = static_cast<int>(item % row_blocks) * kRowsPerBlock;
            const int rows = std::min(kRowsPerBlock, Lq - i0);
            const float* q = Q + (static_cast<long>(bh) * Lq + i0) * D;
            const float* k = K + static_cast<long>(bh) * Lk * D;
            const float* v = V + static_cast<long>(bh) * Lk * Dv;
            float* o = O + (static_cast<long>(bh) * Lq + i0) * Dv;
            // Keys past the last visible one for this block's rows are never needed when causal.
            const int keys = causal ? std::min(Lk, i0 + rows) : Lk;
            if (keys <= 0) {
                std::fill(o, o + static_cast<long>(rows) * Dv, 0.0f);
                continue;
            }
            Epilogue se;
            se.alpha = scale;
            if (mask) {
                se.residual = mask + static_cast<long>(i0) * Lk;
                se.ldr = Lk;
            }
            gemm::serial(false, true, rows, keys, D, q, D, k, D, scores, keys, 0.0f, se);
            for (int r = 0; r < rows; ++r) {
                float* srow = scores + static_cast<long>(r) * keys;
                const int visible = causal ? std::min(keys, i0 + r + 1) : keys;
                softmax_row(srow, srow, visible);
                std::fill(srow + visible, srow + keys, 0.0f);
            }
            gemm::serial(false, false, rows, Dv, keys, scores, keys, v, Dv, o, Dv, 0.0f, Epilogue());
        }
    }
}

namespace detail {

// One row of the attention backward: p (scores in, probabilities out) and dp (dO V^T in, dS out) over
// `keys` entries, of which the first `visible` take part (the rest become 0).
inline void attention_grad_row(float* p, float* dp, int visible, int keys, float scale) {
    if (visible > 0) {
        const float m = row_max(p, visible);
        const float inv = 1.0f / row_exp_shift_sum(p, p, visible, m);
        __m256 acc = _mm256_setzero_ps();
        const __m256 iv = _mm256_set1_ps(inv);
        int j = 0;
        for (; j + 8 <= visible; j += 8) {
            const __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(p + j), iv);
            _mm256_storeu_ps(p + j, pv);
            acc = _mm256_fmadd_ps(pv, _mm256_loadu_ps(dp + j), acc);
        }
        float delta = hsum_ps(acc);
        for (; j < visible; ++j) {
            p[j] *= inv;
            delta += p[j] * dp[j];
        }
        const __m256 dv = _mm256_set1_ps(delta);
        const __m256 sv = _mm256_set1_ps(scale);
        j = 0;
        for (; j + 8 <= visible; j += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv);
            _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j), d), sv));
        }
        for (; j < visible; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
    }
    for (int j = std::max(visible, 0); j < keys; ++j) {
        p[j] = 0.0f;
        dp[j] = 0.0f;
    }
}

}  // namespace detail

// Gradients of attention (no mask) for the output gradient dO: [BH, Lq, Dv]. dQ: [BH, Lq, D],
// dK: [BH, Lk, D], dV: [BH, Lk, Dv] are overwritten.
inline void attention_backward(const float* Q, const float* K, const float* V, const float* dO, float* dQ, float* dK,
                               float* dV, int BH, int Lq, int Lk, int D, int Dv, float scale, bool causal) {
    constexpr int kRows = kAttentionRows;
    // Query rows per panel: P and dS of a panel (2 * panel * Lk floats) stay within kAttentionPanelFloats each.
    const int panel = std::max(kRows, kAttentionPanelFloats / std::max(Lk, 1) / kRows * kRows);
    const long plane = (static_cast<long>(std::min(panel, Lq)) * Lk + 15) / 16 * 16;
    const int threads = std::max(1, std::min(usable_threads(), BH));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* p = thread_scratch(SCRATCH_ROW, 2 * plane + 16);
        float* ds = p + plane;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < BH; ++bh) {
            const float* q = Q + static_cast<long>(bh) * Lq * D;
            const float* k = K + static_cast<long>(bh) * Lk * D;
            const float* v = V + static_cast<long>(bh) * Lk * Dv;
            const float* go = dO + static_cast<long>(bh) * Lq * Dv;
            float* gq = dQ + static_cast<long>(bh) * Lq * D;
            float* gk = dK + static_cast<long>(bh) * Lk * D;
            float* gv = dV + static_cast<long>(bh) * Lk * Dv;
            std::fill(gk, gk + static_cast<long>(Lk) * D, 0.0f);
            std::fill(gv, gv + static_cast<long>(Lk) * Dv, 0.0f);
            for (int p0 = 0; p0 < Lq; p0 += panel) {
                const int p1 = std::min(Lq, p0 + panel);
                // Row blocks: P and dS of their visible keys (a ragged last block still fills the kRows-wide
                // diagonal block, zeros past the mask, which the column blocks below read), and dQ = dS K.
                for (int i0 = p0; i0 < p1; i0 += kRows) {
                    const int rows = std::min(kRows, p1 - i0);
                    const int keys = causal ? std::min(Lk, i0 + kRows) : Lk;
                    float* pb = p + static_cast<long>(i0 - p0) * Lk;
                    float* dsb = ds + static_cast<long>(i0 - p0) * Lk;
                    float* gqb = gq + static_cast<long>(i0) * D;
                    if (keys <= 0) {
                        std::fill(gqb, gqb + static_cast<long>(rows) * D, 0.0f);
                        continue;
                    }
                    Epilogue se;
                    se.alpha = scale;
                    gemm::serial(false, true, rows, keys, D, q + static_cast<long>(i0) * D, D, k, D, pb, Lk, 0.0f, se);
                    gemm::serial(false, true, rows, keys, Dv, go + static_cast<long>(i0) * Dv, Dv, v, Dv, dsb, Lk, 0.0f,
                                 Epilogue());
                    for (int r = 0; r < rows; ++r) {
                        const int visible = causal ? std::min(keys, i0 + r + 1) : keys;
                        detail::attention_grad_row(pb + static_cast<long>(r) * Lk, dsb + static_cast<long>(r) * Lk,
                                                   visible, keys, scale);
                    }
                    gemm::serial(false, false, rows, D, keys, dsb, Lk, k, D, gqb, D, 0.0f, Epilogue());
                }
                // Column blocks: dV += P^T dO and dK += dS^T Q over the panel's rows that see the block.
                for (int j0 = 0; j0 < Lk; j0 += kRows) {
                    const int cols = std::min(kRows, Lk - j0);
                    const int first = causal ? std::max(j0, p0) : p0;
                    if (first >= p1) break;
                    const long at = static_cast<long>(first - p0) * Lk + j0;
                    gemm::serial(true, false, cols, Dv, p1 - first, p + at, Lk, go + static_cast<long>(first) * Dv, Dv,
                                 gv + static_cast<long>(j0) * Dv, Dv, 1.0f, Epilogue());
                    gemm::serial(true, false, cols, D, p1 - first, ds + at, Lk, q + static_cast<long>(first) * D, D,
                                 gk + static_cast<long>(j0) * D, D, 1.0f, Epilogue());
                }
            }
        }
    }
}

}  // namespace nnc
