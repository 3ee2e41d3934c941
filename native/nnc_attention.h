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

// Query rows per work item of the forward and per block of the backward (and keys per column block
// there). Measured on the gpt shapes (32 heads x T = 128, head dim 64, causal, 1 thread): 32 beats 16,
// 24, 48 and 64 both ways - fewer rows skip more of the causal triangle, more rows feed the GEMM better.
constexpr int kAttentionRows = 32;
// Per-thread bound on the backward's probabilities (and as many of their gradients), in floats.
constexpr int kAttentionPanelFloats = 1 << 16;

namespace detail {

// Rows of the attention scratch are padded to a multiple of 8 floats, so a row's last partial vector
// is loaded and stored whole (masked loads and stores are slow on AMD cores); lanes past `visible` are
// blended to 0 (whatever the scratch held there).
inline int padded(int n) { return (n + 7) / 8 * 8; }

inline __m256 lanes_below(int n) { return _mm256_castsi256_ps(tail_mask(n)); }

// p[0, visible) = softmax(p[0, visible)); p[visible, width) = 0 (width a multiple of 8, >= visible).
inline void softmax_padded(float* p, int visible, int width) {
    const int full = visible / 8 * 8;
    const __m256 tail = lanes_below(visible - full);
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < full; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + j));
    if (full < visible) m = _mm256_max_ps(m, _mm256_blendv_ps(m, _mm256_loadu_ps(p + full), tail));
    const __m256 mv = _mm256_set1_ps(hmax_ps(m));
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < full; j += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
        _mm256_storeu_ps(p + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (full < visible) {
        const __m256 x = _mm256_blendv_ps(mv, _mm256_loadu_ps(p + full), tail);
        const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(x, mv)), tail);
        _mm256_storeu_ps(p + full, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum_ps(sum));
    const int used = padded(visible);
    for (int j = 0; j < used; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inv));
    for (int j = used; j < width; j += 8) _mm256_storeu_ps(p + j, _mm256_setzero_ps());
}

// One row of the attention backward, `width` (a multiple of 8) floats of p and dp: p holds the scores and
// becomes the probabilities, dp holds dO V^T and becomes dS = p * (dp - sum(p * dp)) * scale; both are 0
// from `visible` on.
inline void attention_grad_row(float* p, float* dp, int visible, int width, float scale) {
    softmax_padded(p, visible, width);
    const int used = padded(visible);
    const __m256 tail = lanes_below(visible - (used - 8));
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < used; j += 8) {
        __m256 d = _mm256_loadu_ps(dp + j);
        if (j + 8 == used) d = _mm256_and_ps(d, tail);      // lanes past `visible` may hold garbage
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), d, acc);
    }
    const __m256 delta = _mm256_set1_ps(hsum_ps(acc));
    const __m256 sv = _mm256_set1_ps(scale);
    for (int j = 0; j < used; j += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(dp + j), delta);
        _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j), d), sv));
    }
    if (used > 0) {
        const __m256 last = _mm256_loadu_ps(dp + used - 8);
        _mm256_storeu_ps(dp + used - 8, _mm256_and_ps(last, tail));
    }
    for (int j = used; j < width; j += 8) _mm256_storeu_ps(dp + j, _mm256_setzero_ps());
}

}  // namespace detail

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
        float* scores = thread_scratch(SCRATCH_ROW, static_cast<size_t>(kRowsPerBlock) * detail::padded(Lk) + 16);
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
            const int ld = detail::padded(keys);
            Epilogue se;
            se.alpha = scale;
            if (mask) {
                se.residual = mask + static_cast<long>(i0) * Lk;
                se.ldr = Lk;
            }
            gemm::serial(false, true, rows, keys, D, q, D, k, D, scores, ld, 0.0f, se);
            for (int r = 0; r < rows; ++r) {
                const int visible = causal ? std::min(keys, i0 + r + 1) : keys;
                detail::softmax_padded(scores + static_cast<long>(r) * ld, visible, ld);
            }
            gemm::serial(false, false, rows, Dv, keys, scores, ld, v, Dv, o, Dv, 0.0f, Epilogue());
        }
    }
}

// Gradients of attention (no mask) for the output gradient dO: [BH, Lq, Dv]. dQ: [BH, Lq, D],
// dK: [BH, Lk, D], dV: [BH, Lk, Dv] are overwritten.
inline void attention_backward(const float* Q, const float* K, const float* V, const float* dO, float* dQ, float* dK,
                               float* dV, int BH, int Lq, int Lk, int D, int Dv, float scale, bool causal) {
    constexpr int kRows = kAttentionRows;
    // P and dS rows are ld floats apart; a panel of query rows keeps each within kAttentionPanelFloats.
    const int ld = detail::padded(Lk);
    const int panel = std::max(kRows, kAttentionPanelFloats / std::max(ld, 1) / kRows * kRows);
    const long plane = static_cast<long>(std::min(panel, Lq)) * ld + 16;
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
            // Keys no query sees (causal: past the last query row) get no column-block GEMM: zeros.
            const int seen = Lq == 0 ? 0 : causal ? std::min(Lk, Lq) : Lk;
            std::fill(gk + static_cast<long>(seen) * D, gk + static_cast<long>(Lk) * D, 0.0f);
            std::fill(gv + static_cast<long>(seen) * Dv, gv + static_cast<long>(Lk) * Dv, 0.0f);
            for (int p0 = 0; p0 < Lq; p0 += panel) {
                const int p1 = std::min(Lq, p0 + panel);
                // Row blocks: P and dS of their visible keys (a ragged last block still fills the kRows-wide
                // diagonal block, zeros past the mask, which the column blocks below read), and dQ = dS K.
                for (int i0 = p0; i0 < p1; i0 += kRows) {
                    const int rows = std::min(kRows, p1 - i0);
                    const int keys = causal ? std::min(Lk, i0 + kRows) : Lk;
                    float* pb = p + static_cast<long>(i0 - p0) * ld;
                    float* dsb = ds + static_cast<long>(i0 - p0) * ld;
                    float* gqb = gq + static_cast<long>(i0) * D;
                    if (keys <= 0) {
                        std::fill(gqb, gqb + static_cast<long>(rows) * D, 0.0f);
                        continue;
                    }
                    Epilogue se;
                    se.alpha = scale;
                    gemm::serial(false, true, rows, keys, D, q + static_cast<long>(i0) * D, D, k, D, pb, ld, 0.0f, se);
                    gemm::serial(false, true, rows, keys, Dv, go + static_cast<long>(i0) * Dv, Dv, v, Dv, dsb, ld, 0.0f,
                                 Epilogue());
                    for (int r = 0; r < rows; ++r) {
                        const int visible = causal ? std::min(keys, i0 + r + 1) : keys;
                        detail::attention_grad_row(pb + static_cast<long>(r) * ld, dsb + static_cast<long>(r) * ld,
                                                   visible, detail::padded(keys), scale);
                    }
                    gemm::serial(false, false, rows, D, keys, dsb, ld, k, D, gqb, D, 0.0f, Epilogue());
                }
                // Column blocks: dV = / += P^T dO and dK = / += dS^T Q over the panel's rows that see the block
                // (a block's first panel is the one holding its first seeing row: row 0, or row j0 if causal).
                for (int j0 = 0; j0 < Lk; j0 += kRows) {
                    const int cols = std::min(kRows, Lk - j0);
                    const int first = causal ? std::max(j0, p0) : p0;
                    if (first >= p1) break;
                    const float beta = (causal ? j0 < p0 : p0 > 0) ? 1.0f : 0.0f;
                    const long at = static_cast<long>(first - p0) * ld + j0;
                    gemm::serial(true, false, cols, Dv, p1 - first, p + at, ld, go + static_cast<long>(first) * Dv, Dv,
                                 gv + static_cast<long>(j0) * Dv, Dv, beta, Epilogue());
                    gemm::serial(true, false, cols, D, p1 - first, ds + at, ld, q + static_cast<long>(first) * D, D,
                                 gk + static_cast<long>(j0) * D, D, beta, Epilogue());
                }
            }
        }
    }
}

}  // namespace nnc
