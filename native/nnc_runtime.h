// nnc_runtime.h - the one header generated C++ code includes (native/ on the include path).
//
// Contents (all in namespace nnc, header-only):
//   nnc_threads.h    set_threads / get_threads / usable_threads, split_range, per-thread scratch
//   nnc_math.h       AVX2 exp / log / tanh / erf / sigmoid / gelu, activation codes ACT_*
//   nnc_math512.h    AVX-512F twins of the expensive ones, used by chains only when the CPU has it
//   nnc_vec.h        elementwise maps, softmax / log-softmax rows, layer norm, batch norm, reductions
//   nnc_gemm.h       sgemm / sgemm_batched with fused epilogue (nnc_gemm_kernels.h: packing, kernels)
//   nnc_conv.h       conv2d (im2col + GEMM), col2im and conv backward, max / avg / global pooling
//   nnc_attention.h  fused scaled-dot-product attention
//   nnc_sparse.h     linear layers with a fixed weight sparsity pattern (CSR baked into the code)
// Compile with: g++ -O3 -fopenmp -march=x86-64-v3 -std=c++17 -I native ...
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__)
#error "nnc_runtime.h needs AVX2 and FMA (compile with -march=x86-64-v3 or newer)"
#endif

#include "nnc_threads.h"
#include "nnc_math.h"
#include "nnc_vec.h"
#include "nnc_gemm.h"
#include "nnc_conv.h"
#include "nnc_attention.h"
#include "nnc_sparse.h"
