// nnc_attention.h - fused scaled-dot-product attention on [B, H, L, D] tensors.
//
//   O[b, h] = softmax(scale * Q[b, h] K[b, h]^T + mask) V[b, h]
//
// Work items are (batch * head, block of query rows); each thread computes its block's scores
// with the GEMM (scale fused as alpha, the additive mask fused as the residual), masks the causal
// part, runs the row softmax in place, and multiplies by V, all in per-thread scratch of
// rows_per_block * Lk floats. Causal masking follows torch (is_causal: key j is visible to
// query i when j <= i).
#pragma once

#include <algorithm>
#include <cmath>

#include "nnc_gemm.h"
#include "nnc_vec.h"

namespace nnc {

// Q: [BH, Lq, D], K: [BH, Lk, D], V: [BH, Lk, Dv], O: [BH, Lq, Dv]; mask (optional): [Lq, Lk]
// additive, shared by all batch items and heads.
inline void attention(const float* Q, const float* K, const float* V, float* O, int BH, int Lq, int Lk, int D, int Dv,
                      float scale, bool causal, const float* mask = nullptr) {
    constexpr int kRowsPerBlock = 64;
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
                for (int j = visible; j < keys; ++j) srow[j] = -INFINITY;
                softmax_row(srow, srow, keys);
            }
            gemm::serial(false, false, rows, Dv, keys, scores, keys, v, Dv, o, Dv, 0.0f, Epilogue());
        }
    }
}

}  // namespace nnc
