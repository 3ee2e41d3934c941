"""C++ for weights with a fixed sparsity pattern (``native/nnc_sparse.h``).

``linear(x, W)`` whose weight type carries a ``Sparsity`` is emitted one of two ways, chosen per layer:

* ``sparse``: W's pattern becomes CSR arrays (row pointers, column indices, row groups) baked into the
  generated code as ``static const`` tables; the values are read from W's dense storage at the pattern's
  positions, so training may update them. The kernel is vectorized over the batch; rows that share
  one column list (block sparsity: a block row; N:M and unstructured: single rows) are register-blocked
  together. Code size is bounded: the tables grow with the number of nonzeros (4 bytes each), the code
  itself does not.
* ``dense``: the ordinary GEMM on the (masked) weight.

The chooser (``choose``) is a cost model: the dense GEMM runs at DENSE_FLOPS, the sparse kernel at
SPARSE_FLOPS per useful FLOP over batch lanes padded to 8, plus the transposes of x and y. It keeps dense
unless the sparse estimate is at least ``MARGIN`` times faster (as LIBXSMM does). With
``NNC_SPARSE_TIMING=1`` the choice is instead made by timing both kernels at compile time
(``measure``). Each decision, with its figures, is written as a comment above the layer's code and kept
in ``DECISIONS[module_name]`` (the driver copies it into plan.json under ``"sparse"``).

Training: ``sparse_weight_grad`` (dW on the pattern only) and ``sparse_mask`` (``nncompile/ops/sparse.py``)
have rules here too.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from nncompile.errors import BuildError
from nncompile.ir.types import Sparsity
from nncompile.ops.base import set_rule

# cost model constants (single core, calibrated with bench/suite_sparse.py on an AVX2 machine)
DENSE_FLOPS = 60e9         # sustained dense SGEMM FLOP/s
SPARSE_FLOPS = 30e9        # useful FLOP/s of the sparse kernel (2 * nnz * lanes / time)
TRANSPOSE_S = 0.4e-9       # seconds per element transposed (x in, y out)
GEMV_BYTES_PER_S = 12e9    # dense GEMV is bound by reading W
MARGIN = 1.5               # keep dense unless sparse is estimated this much faster
DECISIONS: dict[str, list[dict]] = {}


@functools.lru_cache(maxsize=32)
def csr_pattern(sparsity: Sparsity, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rowptr [N+1], cols [nnz], group starts [G+1]) of the weight's pattern, all int32."""
    mask = sparsity.mask(shape)
    return pattern_from_mask(mask)


def pattern_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1)
    rows, cols = np.nonzero(mask)
    rowptr = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=mask.shape[0]), out=rowptr[1:])
    if mask.shape[0] > 1 and mask.shape[1]:
        same = np.all(mask[1:] == mask[:-1], axis=1)
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
    else:
        starts = np.zeros(min(mask.shape[0], 1), dtype=np.int64)
    gstart = np.concatenate([starts, [mask.shape[0]]])
    return rowptr.astype(np.int32), cols.astype(np.int32), gstart.astype(np.int32)


def estimate(m: int, n: int, k: int, nnz: int) -> dict:
    """Estimated seconds of the dense and the sparse kernel for y[m, n] = x[m, k] W^T."""
    dense = max(2.0 * m * n * k / DENSE_FLOPS, 4.0 * n * k / GEMV_BYTES_PER_S if m < 8 else 0.0)
    lanes = min(64, math.ceil(m / 8) * 8) * math.ceil(m / 64) if m else 0
    sparse = 2.0 * nnz * lanes / SPARSE_FLOPS + TRANSPOSE_S * m * (k + n)
    return {"dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse if sparse else math.inf}


def choose(m: int, n: int, k: int, nnz: int, timing: bool | None = None, kernels=None) -> dict:
    """Pick 'sparse' or 'dense' for one layer; the dict says why."""
    est = estimate(m, n, k, nnz)
    density = nnz / (n * k) if n * k else 0.0
    decision = {"m": m, "n": n, "k": k, "nnz": nnz, "density": round(density, 4),
                "est_dense_us": round(est["dense_s"] * 1e6, 2), "est_sparse_us": round(est["sparse_s"] * 1e6, 2),
                "est_speedup": round(est["speedup"], 2), "margin": MARGIN}
    if timing is None:
        timing = os.environ.get("NNC_SPARSE_TIMING", "") not in ("", "0")
    if timing and kernels is not None:
        dense_s, sparse_s = measure(m, kernels)
        decision.update(timed_dense_us=round(dense_s * 1e6, 2), timed_sparse_us=round(sparse_s * 1e6, 2))
        speedup, how = dense_s / sparse_s, "timed"
    else:
        speedup, how = est["speedup"], "cost model"
    if speedup >= MARGIN:
        decision.update(kernel="sparse", why=f"{how}: sparse {speedup:.2f}x faster than dense (>= {MARGIN}x)")
    else:
        decision.update(kernel="dense", why=f"{how}: sparse only {speedup:.2f}x faster than dense (< {MARGIN}x)")
    return decision


def measure(m: int, kernels) -> tuple[float, float]:
    """Time the dense and the sparse kernel on random data (compile-time timing, median of 5)."""
    import time

    dense_fn, sparse_fn = kernels
    times = []
    for fn in (dense_fn, sparse_fn):
        fn()
        samples = []
        for _ in range(5):
            t0 = time.thread_time()
            fn()
            samples.append(time.thread_time() - t0)
        times.append(float(np.median(samples)))
    return times[0], times[1]


def _table(name: str, values: np.ndarray) -> list[str]:
    data = values.tolist() or [0]
    lines = [f"static const int32_t {name}[{len(data)}] = {{"]
    for i in range(0, len(data), 64):
        lines.append("    " + ",".join(map(str, data[i:i + 64])) + ",")
    lines.append("};")
    return lines


def pattern_decl(sparsity: Sparsity, shape: tuple[int, ...], name: str = "pat_") -> list[str]:
    """C++ statements declaring ``const nnc::sparse::Pattern name`` with its baked tables."""
    rowptr, cols, gstart = csr_pattern(sparsity, tuple(shape))
    lines = _table("rowptr_", rowptr) + _table("cols_", cols)
    grouped = len(gstart) - 1 < shape[0]
    if grouped:
        lines += _table("gstart_", gstart)
    lines.append(f"const nnc::sparse::Pattern {name}{{{shape[0]}, {math.prod(shape[1:])}, rowptr_, cols_, "
                 f"{len(gstart) - 1}, {'gstart_' if grouped else 'nullptr'}}};")
    return lines


def _record(ctx, decision: dict) -> None:
    module = getattr(ctx.emitter, "module_name", "")
    entry = dict(decision, node=ctx.node.name)
    found = DECISIONS.setdefault(module, [])
    found[:] = [d for d in found if d["node"] != entry["node"]] + [entry]


def sparse_linear_call(ctx, args: list[str], out_ptr: str, epi: str) -> list[str] | None:
    """Statements computing linear(x, W[, b]) with W's pattern, or None when the chooser keeps dense."""
    x, w = ctx.type(args[0]), ctx.type(args[1])
    if w.sparsity is None or w.rank != 2 or x.dtype != "f32" or w.dtype != "f32":
        return None
    n, k = w.shape
    m = x.numel // k if k else 0
    rowptr, cols, gstart = csr_pattern(w.sparsity, (n, k))
    decision = choose(m, n, k, len(cols))
    decision.update(weight=args[1], pattern=str(w.sparsity), row_groups=len(gstart) - 1)
    _record(ctx, decision)
    comment = f"// sparse weight {args[1]}: {decision['kernel']} kernel ({decision['why']})"
    if decision["kernel"] == "dense" or m == 0:
        return [comment]
    ptrs = [ctx.ptr(a) for a in args]
    lines = [comment, "{"] + ["    " + line for line in pattern_decl(w.sparsity, (n, k))]
    if len(args) == 3:
        lines.append(f"    {epi}.col_bias = {ptrs[2]};")
    lines.append(f"    nnc::sparse::linear({m}, {ptrs[0]}, {ptrs[1]}, pat_, {out_ptr}, {epi});")
    lines.append("}")
    return lines


def emit_sparse_weight_grad(ctx, node) -> str:
    g, x, w = node.inputs
    wt = ctx.type(w)
    if wt.dtype != "f32":
        raise BuildError(f"sparse_weight_grad: the C++ backend needs f32, got {wt.dtype}", node.loc)
    m = ctx.type(g).shape[0]
    lines = ["{"] + ["    " + line for line in pattern_decl(wt.sparsity, wt.shape)]
    lines.append(f"    nnc::sparse::weight_grad({m}, {ctx.ptr(g)}, {ctx.ptr(x)}, pat_, {ctx.out});")
    lines.append("}")
    return "\n".join(lines)


def emit_sparse_mask(ctx, node) -> str:
    g, w = node.inputs
    wt = ctx.type(w)
    shape = (wt.shape[0], math.prod(wt.shape[1:])) if wt.rank else (1, 1)
    lines = ["{"] + ["    " + line for line in pattern_decl(wt.sparsity, tuple(wt.shape))]
    src, out = ctx.ptr(g), ctx.out
    lines += [f"    const float* src_ = {src};",
              f"    float* dst_ = {out};",
              f"    if (dst_ != src_) std::memset(dst_, 0, sizeof(float) * {wt.numel});",
              f"    for (int n_ = 0; n_ < {shape[0]}; ++n_) {{",
              "        int prev_ = 0;",
              f"        for (int j_ = rowptr_[n_]; j_ < rowptr_[n_ + 1]; ++j_) {{",
              f"            const long o_ = (long)n_ * {shape[1]};",
              "            if (dst_ == src_) for (int c_ = prev_; c_ < cols_[j_]; ++c_) dst_[o_ + c_] = 0.0f;",
              "            dst_[o_ + cols_[j_]] = src_[o_ + cols_[j_]];",
              "            prev_ = cols_[j_] + 1;",
              "        }",
              f"        if (dst_ == src_) for (int c_ = prev_; c_ < {shape[1]}; ++c_) dst_[(long)n_ * {shape[1]} + c_] = 0.0f;",
              "    }",
              "}"]
    return "\n".join(lines)


def register() -> None:
    from nncompile.ops import sparse  # noqa: F401  (defines the ops)

    set_rule("sparse_weight_grad", "emit_cpp", emit_sparse_weight_grad)
    set_rule("sparse_mask", "emit_cpp", emit_sparse_mask)
