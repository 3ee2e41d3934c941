"""C++ for weights with a fixed sparsity pattern (``native/nnc_sparse.h``).

``linear(x, W)`` whose weight type carries a ``Sparsity`` is emitted one of two ways, chosen per layer:

* ``sparse``: W's pattern becomes CSR arrays (row pointers, column indices, row groups) baked into the
  generated code as ``static const`` tables. The values come from W's dense storage at the pattern's
  positions: an inference module keeps them packed (kernel order) in a region after the parameters and
  packs them again only after the weights changed (``CompiledModel.load_weights`` / ``train_step`` clear
  the region's valid flag); a training module packs them on every call (its weights change every step). The kernel is vectorized over the batch; rows that share
  one column list (block sparsity: a block row; N:M and unstructured: single rows) are register-blocked
  together. Code size is bounded: the tables grow with the number of nonzeros (4 bytes each), the code
  itself does not.
* ``dense``: the ordinary GEMM on the (masked) weight.

The chooser (``choose``) is a cost model: the dense GEMM runs at DENSE_FLOPS, the sparse kernel at
SPARSE_FLOPS per useful FLOP over batch lanes padded to 8, plus the transposes of x and y. It keeps dense
unless the sparse estimate is at least ``MARGIN`` times faster (as LIBXSMM does). With
``NNC_SPARSE_TIMING=1`` the choice is instead made by timing both kernels at compile time
(``measure``); ``NNC_SPARSE_KERNEL=sparse|dense`` forces one (tests, benchmarks).
``NNC_SPARSE_VALUES=baked`` also bakes the values of weights the graph carries (torch imports) into the
code, frozen: later weight updates are not seen (kept for measurements; the persistent packed values are as fast). Each decision, with its figures, is written as a comment above the layer's code and kept
in ``DECISIONS[module_name]`` (the driver copies it into plan.json under ``"sparse"``, and
``"train"."sparse"`` for the training step).

Training: ``sparse_weight_grad`` (dW on the pattern only) and ``sparse_mask`` (``nncompile/ops/sparse.py``)
have rules here too.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from nncompile.codegen import cpp_sparse_unrolled as unrolled
from nncompile.errors import BuildError
from nncompile.ir.types import Sparsity
from nncompile.ops.base import set_rule

# cost model constants (one core; fitted to medians measured with bench/sparse_kernel_probe.py-style
# timings on the development machine, an AMD EPYC (Zen 4, AVX-512) where the sparse kernel runs on zmm
# registers; 1024x1024 and 4096x1024, sparsity 50..99%, batch 1..256: the estimates are within about
# 25% of the measurements. Only their ratios matter)
DENSE_FLOPS = 96e9         # dense SGEMM FLOP/s (M >= 8) ...
DENSE_W_BYTES_PER_S = 19e9  # ... plus its per-call cost of packing W, 4 * n * k bytes at this rate
GEMV_BYTES_PER_S = 75e9    # dense with M < 8: each row of x reads W once at this rate while W fits the
CACHED_BYTES = 8 << 20     # caches (<= 8 MB: 1024x1024 measures ~70e9) ...
DRAM_BYTES_PER_S = 28e9    # ... and at this rate beyond (4096x1024, 16 MB: ~25e9); the packed values too
SPARSE_FLOPS = 85e9        # batch-lane kernel: FLOP/s over the padded lanes (2 * nnz * lanes / time) ...
SPARSE_NNZ_S = 0.06e-9     # ... plus seconds per nonzero per 64-row batch chunk (index, broadcast) ...
SPARSE_ROW_S = 12.5e-9     # ... plus seconds per row and K block per chunk (accumulators, loop entry)
PACK_NNZ_S = 0.3e-9        # values not packed yet: packing costs this per nonzero ...
TOUCHED_BYTES_PER_S = 20e9  # ... plus reading W's cache lines that hold nonzeros at this rate
SMALL_NNZ_S = 0.6e-9       # seconds per nonzero per row of x in the scalar kernel (M = 1, or M < 8 unpacked) ...
SMALL_ROW_S = 5e-9         # ... plus seconds per row of W per row of x
TRANSPOSE_S = 0.3e-9       # seconds per element transposed (x in, y out)
MARGIN = 2.0               # keep dense unless sparse is estimated this much faster (the dense GEMM is the
                           # safer choice where the estimates are close: at 50% sparsity, batch 64, with
                           # packed values the sparse kernel measures ~1.6x, the estimate ~1.6x)
DECISIONS: dict[str, list[dict]] = {}


@functools.lru_cache(maxsize=32)
def csr_pattern(sparsity: Sparsity, shape: tuple[int, ...]) -> "Csr":
    """The weight's pattern as K-blocked CSR (see ``pattern_from_mask``)."""
    return pattern_from_mask(sparsity.mask(shape))


@dataclass(frozen=True)
class Csr:
    rowptr: np.ndarray   # [n_kblocks * rows + 1]: entry b * rows + n starts row n's nonzeros in K block b
    cols: np.ndarray     # [nnz] absolute column indices, ordered by (K block, row, column)
    gstart: np.ndarray   # [groups + 1]: consecutive rows with identical columns form a group
    kb: int              # columns per K block
    order: np.ndarray    # [nnz] flat indices into W (row * K + col) in the cols order (packing values)

    @property
    def nnz(self) -> int:
        return len(self.cols)


def block_cols(density: float, k: int) -> int:
    """Columns per K block: ~24 nonzeros of a row per block (the accumulators' reload is amortized), at
    least 128 columns (xT's slice of a 64-row chunk, 32 KB, stays near L1); K is split into blocks of
    equal width (a short last block would cost a row pass for few nonzeros)."""
    if density <= 0 or k <= 256:
        return k
    target = max(128, int(math.ceil(24.0 / density / 8.0)) * 8)
    if target * 2 > k:
        return k
    blocks = max(1, round(k / target))
    width = -(-k // blocks)
    return -(-width // 8) * 8


def pattern_from_mask(mask: np.ndarray, kb: int | None = None) -> Csr:
    mask = np.asarray(mask, dtype=bool)
    mask = mask.reshape(mask.shape[0], -1) if mask.ndim else mask.reshape(1, 1)
    n, k = mask.shape
    if kb is None:
        kb = block_cols(mask.mean() if mask.size else 0.0, k)
    nkb = max(1, -(-k // kb)) if k else 1
    rows, cols = np.nonzero(mask)
    blocks = cols // kb if kb else np.zeros_like(cols)
    key = blocks * n + rows
    perm = np.lexsort((cols, key))
    rows, cols, key = rows[perm], cols[perm], key[perm]
    rowptr = np.zeros(nkb * n + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=nkb * n), out=rowptr[1:])
    if n > 1 and k:
        same = np.all(mask[1:] == mask[:-1], axis=1)
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
    else:
        starts = np.zeros(min(n, 1), dtype=np.int64)
    gstart = np.concatenate([starts, [n]])
    return Csr(rowptr.astype(np.int32), cols.astype(np.int32), gstart.astype(np.int32), int(kb),
               (rows.astype(np.int64) * k + cols).astype(np.int64))


def _stream_s(nbytes: float) -> float:
    """Seconds to read ``nbytes`` once per call: from the caches if they hold it, else from DRAM."""
    return nbytes / (GEMV_BYTES_PER_S if nbytes <= CACHED_BYTES else DRAM_BYTES_PER_S)


def estimate(m: int, n: int, k: int, nnz: int, packed: bool = False) -> dict:
    """Estimated seconds of the dense and the sparse kernel for y[m, n] = x[m, k] W^T. ``packed``: the
    values are already packed (persistent buffer): the kernel streams values and column indices instead
    of gathering W's scattered cache lines."""
    if m < 8:
        dense = m * _stream_s(4.0 * n * k)
    else:
        dense = 2.0 * m * n * k / DENSE_FLOPS + 4.0 * n * k / DENSE_W_BYTES_PER_S
    density = nnz / (n * k) if n * k else 0.0
    if packed:
        values = _stream_s(8.0 * nnz)
    else:
        touched = 4.0 * n * k * (1.0 - (1.0 - density) ** 16)   # 16 floats per cache line
        values = PACK_NNZ_S * nnz + touched / TOUCHED_BYTES_PER_S
    if m == 1 or (m < 8 and not packed):
        sparse = values + (SMALL_NNZ_S * nnz + SMALL_ROW_S * n) * m
    else:
        chunks = [min(64, m - m0) for m0 in range(0, m, 64)]
        lanes = sum(mb + (-mb) % 8 for mb in chunks)
        n_kblocks = -(-k // block_cols(density, k)) if k else 1
        sparse = (values + 2.0 * nnz * lanes / SPARSE_FLOPS + len(chunks) * (SPARSE_NNZ_S * nnz + SPARSE_ROW_S * n * n_kblocks)
                  + TRANSPOSE_S * m * (k + n))
    return {"dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse if sparse else math.inf}


def choose(m: int, n: int, k: int, nnz: int, timing: bool | None = None, kernels=None, packed: bool = False) -> dict:
    """Pick 'sparse' or 'dense' for one layer; the dict says why. The sparse estimate is the better of
    the table-driven loop and, where the layer's code fits the bound, the unrolled code (``form``)."""
    est = estimate(m, n, k, nnz, packed)
    density = nnz / (n * k) if n * k else 0.0
    form = "tables"
    if packed and unrolled.fits(nnz, m):
        unrolled_s = unrolled.estimate_s(m, n, k, nnz)
        if unrolled_s < est["sparse_s"]:
            form = "unrolled"
            est = dict(est, sparse_s=unrolled_s, speedup=est["dense_s"] / unrolled_s)
    decision = {"m": m, "n": n, "k": k, "nnz": nnz, "density": round(density, 4), "form": form,
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
    forced = os.environ.get("NNC_SPARSE_KERNEL", "auto")
    if forced in ("sparse", "dense"):
        decision.update(kernel=forced, why=f"forced by NNC_SPARSE_KERNEL={forced} ({how}: {speedup:.2f}x)")
    elif speedup >= MARGIN:
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
    csr = csr_pattern(sparsity, tuple(shape))
    lines = _table("rowptr_", csr.rowptr) + _table("cols_", csr.cols)
    rows = shape[0] if shape else 1
    grouped = len(csr.gstart) - 1 < rows
    if grouped:
        lines += _table("gstart_", csr.gstart)
    lines.append(f"const nnc::sparse::Pattern {name}{{{rows}, {math.prod(shape[1:])}, rowptr_, cols_, "
                 f"{len(csr.gstart) - 1}, {'gstart_' if grouped else 'nullptr'}, {csr.kb}}};")
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
    csr = csr_pattern(w.sparsity, (n, k))
    timing = os.environ.get("NNC_SPARSE_TIMING", "") not in ("", "0")
    kernels = timing_kernels(w.sparsity, (n, k), m) if timing and m else None
    frozen = ctx.emitter.graph.weights.get(args[1]) if os.environ.get("NNC_SPARSE_VALUES") == "baked" else None
    persistent = getattr(ctx.emitter, "packed_values", False) or frozen is not None
    decision = choose(m, n, k, csr.nnz, timing=timing, kernels=kernels, packed=persistent)
    if os.environ.get("NNC_SPARSE_KERNEL") == "unrolled":
        decision.update(kernel="sparse", why="forced by NNC_SPARSE_KERNEL=unrolled")
    decision.update(weight=args[1], pattern=str(w.sparsity), row_groups=len(csr.gstart) - 1, k_block=csr.kb)
    _record(ctx, decision)
    comment = f"// sparse weight {args[1]}: {decision['kernel']} kernel ({decision['why']})"
    if decision["kernel"] == "dense" or m == 0:
        return [comment]
    ptrs = [ctx.ptr(a) for a in args]
    lines = [comment, "{"] + ["    " + line for line in pattern_decl(w.sparsity, (n, k))]
    if frozen is not None:
        # opt-in: the values too are baked (frozen weights; later weight updates are NOT seen)
        values = np.asarray(frozen, np.float32).reshape(-1)[csr.order]
        lines.append(f"    static const float vals_[{max(len(values), 1)}] = {{")
        for i in range(0, len(values), 16):
            lines.append("        " + ",".join(f"{float(v).hex()}f" for v in values[i:i + 16]) + ",")
        lines += ["    };" if len(values) else "    0.0f};", "    nnc::sparse::Pattern patv_ = pat_;", "    patv_.values = vals_;"]
        decision["values"] = "baked"
    slot = ctx.emitter.pack_slot(args[1], csr.nnz) if frozen is None and hasattr(ctx.emitter, "pack_slot") else None
    if slot is not None:
        # the values, packed in the kernel's order, persist after the parameters; they are packed again
        # (one pass over W) only when the runtime has cleared the valid flag (weights loaded or trained)
        lines += [f"    float* const vals_ = (float*)(params + {slot});",
                  f"    if (repack_) nnc::sparse::detail::pack_rows(pat_, {ptrs[1]}, {k}, 0, {n}, vals_);",
                  "    nnc::sparse::Pattern patv_ = pat_;", "    patv_.values = vals_;"]
        decision["values"] = "packed once per weight update"
    elif frozen is None:
        decision["values"] = "packed from W on every call"
    if len(args) == 3:
        lines.append(f"    {epi}.col_bias = {ptrs[2]};")
    if _unroll(decision, csr, m) and hasattr(ctx.emitter, "add_definitions"):
        if frozen is None and slot is None:
            lines += [f"    float* const vals_ = nnc::sparse::detail::scratch(2, {csr.nnz + 1});",
                      f"    nnc::sparse::detail::pack_rows(pat_, {ptrs[1]}, {k}, 0, {n}, vals_);"]
        name = f"nnc_sp_{re.sub(r'[^A-Za-z0-9_]', '_', ctx.node.name)}_{len(ctx.emitter.definitions)}"
        defs, n_tiles = unrolled.definitions(name, csr, n, unrolled.chunk_vectors(m))
        ctx.emitter.add_definitions(defs)
        lines += ["    " + line for line in unrolled.call(name, n_tiles, m, n, k, csr.nnz, ptrs[0], "vals_", out_ptr, epi)]
    else:
        lines.append(f"    nnc::sparse::linear({m}, {ptrs[0]}, {ptrs[1]}, {'pat_' if frozen is None and slot is None else 'patv_'}, "
                     f"{out_ptr}, {epi});")
    _record(ctx, decision)
    lines.append("}")
    return lines


def _unroll(decision: dict, csr: Csr, m: int) -> bool:
    """Whether a layer the chooser gave the sparse kernel gets the unrolled code (cpp_sparse_unrolled)
    rather than the table-driven loop: it must fit the code-size bound, and be forced or estimated faster."""
    forced = os.environ.get("NNC_SPARSE_KERNEL", "auto")
    use = decision["kernel"] == "sparse" and unrolled.fits(csr.nnz, m) and (
        forced == "unrolled" or (forced == "auto" and decision.get("form") == "unrolled"))
    decision["form"] = "unrolled" if use else "tables"
    return use


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


def emit_sparse_input_grad(ctx, node) -> str:
    g, w = node.inputs
    wt = ctx.type(w)
    if wt.dtype != "f32":
        raise BuildError(f"sparse_input_grad: the C++ backend needs f32, got {wt.dtype}", node.loc)
    m = ctx.type(g).shape[0]
    n, k = wt.shape
    csr = csr_pattern(wt.sparsity, (n, k))
    # the scatter form stores every partial sum: about 1.5x the forward kernel's cost per nonzero
    decision = choose(m, k, n, int(csr.nnz * 1.5))
    decision.update(weight=w, pattern=str(wt.sparsity), role="input gradient (dY @ W)")
    _record(ctx, decision)
    comment = f"// sparse weight {w}, dY @ W: {decision['kernel']} kernel ({decision['why']})"
    if decision["kernel"] == "dense" or m == 0:
        return "\n".join([comment, f"nnc::sgemm(false, false, {m}, {k}, {n}, {ctx.ptr(g)}, {n}, {ctx.ptr(w)}, {k}, "
                                    f"{ctx.out}, {k}, 0.0f);"])
    lines = [comment, "{"] + ["    " + line for line in pattern_decl(wt.sparsity, wt.shape)]
    lines.append(f"    nnc::sparse::input_grad({m}, {ctx.ptr(g)}, {ctx.ptr(w)}, pat_, {ctx.out});")
    lines.append("}")
    return "\n".join(lines)


def emit_sparse_mask(ctx, node) -> str:
    g, w = node.inputs
    wt = ctx.type(w)
    if wt.dtype != "f32":
        raise BuildError(f"sparse_mask: the C++ backend needs f32, got {wt.dtype}", node.loc)
    csr = csr_pattern(wt.sparsity, tuple(wt.shape))
    rows = wt.shape[0] if wt.rank else 1
    width = wt.numel // rows if rows else 0
    nkb = (len(csr.rowptr) - 1) // rows if rows else 1
    lines = ["{"] + ["    " + line for line in _table("rowptr_", csr.rowptr) + _table("cols_", csr.cols)]
    lines += [f"    const float* src_ = {ctx.ptr(g)};",
              f"    float* dst_ = {ctx.out};",
              f"    for (long n_ = 0; n_ < {rows}; ++n_) {{",
              f"        const long o_ = n_ * {width};",
              "        int prev_ = 0;   // columns ascend over the K blocks, so [prev_, c) is off the pattern",
              f"        for (int b_ = 0; b_ < {nkb}; ++b_)",
              f"            for (int j_ = rowptr_[b_ * {rows} + n_]; j_ < rowptr_[b_ * {rows} + n_ + 1]; ++j_) {{",
              "                for (int c_ = prev_; c_ < cols_[j_]; ++c_) dst_[o_ + c_] = 0.0f;",
              "                dst_[o_ + cols_[j_]] = src_[o_ + cols_[j_]];",
              "                prev_ = cols_[j_] + 1;",
              "            }",
              f"        for (int c_ = prev_; c_ < {width}; ++c_) dst_[o_ + c_] = 0.0f;",
              "    }",
              "}"]
    return "\n".join(lines)


def register() -> None:
    from nncompile.ops import sparse  # noqa: F401  (defines the ops)

    set_rule("sparse_weight_grad", "emit_cpp", emit_sparse_weight_grad)
    set_rule("sparse_mask", "emit_cpp", emit_sparse_mask)
    set_rule("sparse_input_grad", "emit_cpp", emit_sparse_input_grad)


# A small ctypes library over nnc_sparse.h / nnc_gemm.h with the pattern passed at run time: the same
# kernels the generated code calls (there with the pattern baked). Used by the compile-time timing,
# the tests and bench/suite_sparse.py.

_HARNESS = r'''
#include "nnc_runtime.h"
extern "C" {
void nnc_sp_linear(int M, int N, int K, const float* x, const float* w, const int32_t* rowptr, const int32_t* cols,
                   int n_groups, const int32_t* gstart, const float* bias, int act, const float* residual, float* y,
                   const float* values, int kb) {
    nnc::sparse::Pattern p{N, K, rowptr, cols, n_groups, gstart, kb, values};
    nnc::Epilogue ep; ep.col_bias = bias; ep.act = act; ep.residual = residual; ep.ldr = N;
    nnc::sparse::linear(M, x, w, p, y, ep);
}
void nnc_sp_weight_grad(int M, int N, int K, const float* dy, const float* x, const int32_t* rowptr,
                        const int32_t* cols, float* dw, int kb) {
    nnc::sparse::Pattern p{N, K, rowptr, cols, N, nullptr, kb};
    nnc::sparse::weight_grad(M, dy, x, p, dw);
}
void nnc_sp_input_grad(int M, int N, int K, const float* dy, const float* w, const int32_t* rowptr,
                       const int32_t* cols, float* dx, int kb) {
    nnc::sparse::Pattern p{N, K, rowptr, cols, N, nullptr, kb};
    nnc::sparse::input_grad(M, dy, w, p, dx);
}
void nnc_sp_naive(int M, int N, int K, const float* x, const float* w, const int32_t* rowptr, const int32_t* cols,
                  float* y, int kb) {
    nnc::sparse::Pattern p{N, K, rowptr, cols, N, nullptr, kb};
    nnc::sparse::linear_naive(M, x, w, p, y);
}
void nnc_sp_dense(int M, int N, int K, const float* x, const float* w, float* y) {
    nnc::sgemm(false, true, M, N, K, x, K, w, K, y, N, 0.0f);
}
void nnc_sp_threads(int n) { nnc::set_threads(n); }
}
'''

_native = None


def build_harness(source: str, stem: str):
    """``source`` (a harness over the native headers) built once into the build cache, keyed by its text
    and the headers' digest, and loaded with ctypes."""
    import ctypes
    import hashlib
    import subprocess

    from nncompile.codegen.build import NATIVE_DIR, cache_root, native_digest

    key = hashlib.sha256((source + native_digest()).encode()).hexdigest()[:16]
    root = cache_root() / "sparse_harness"
    root.mkdir(parents=True, exist_ok=True)
    lib = root / f"{stem}_{key}.so"
    if not lib.exists():
        src = root / f"{stem}_{key}.cpp"
        src.write_text(source)
        tmp = root / f"{lib.name}.{os.getpid()}.tmp"
        cmd = ["g++", "-O3", "-fopenmp", "-march=x86-64-v3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno",
               "-fno-trapping-math", f"-I{NATIVE_DIR}",
               str(src), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError("could not build the sparse kernel harness:\n" + done.stderr[-2000:])
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


def native_kernels():
    """The ctypes harness (built once into the build cache, keyed by the headers' digest)."""
    global _native
    if _native is None:
        _native = build_harness(_HARNESS, "nnc_sparse")
    return _native


def _p(array):
    import ctypes

    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


class NativeSparse:
    """y = x @ W^T on one pattern through the harness (dense W storage, pattern passed at run time)."""

    def __init__(self, mask: np.ndarray, kb: int | None = None):
        self.lib = native_kernels()
        self.mask = np.asarray(mask, dtype=bool)
        self.n, self.k = self.mask.shape
        self.csr = pattern_from_mask(self.mask, kb)
        self.rowptr, self.cols, self.gstart = self.csr.rowptr, self.csr.cols, self.csr.gstart

    def packed(self, w):
        """W's values on the pattern, in the kernel's order (for frozen, baked values)."""
        return np.ascontiguousarray(np.asarray(w, np.float32).reshape(-1)[self.csr.order])

    def linear(self, x, w, bias=None, act=0, residual=None, out=None, grouped=True, values=None):
        m = x.shape[0]
        y = np.empty((m, self.n), np.float32) if out is None else out
        gs = self.gstart if grouped else None
        self.lib.nnc_sp_linear(m, self.n, self.k, _p(x), _p(w), _p(self.rowptr), _p(self.cols),
                               len(self.gstart) - 1 if grouped else self.n, _p(gs), _p(bias), act, _p(residual), _p(y),
                               _p(values), self.csr.kb)
        return y

    def weight_grad(self, dy, x, out=None):
        dw = np.empty((self.n, self.k), np.float32) if out is None else out
        self.lib.nnc_sp_weight_grad(x.shape[0], self.n, self.k, _p(dy), _p(x), _p(self.rowptr), _p(self.cols), _p(dw),
                                    self.csr.kb)
        return dw

    def input_grad(self, dy, w, out=None):
        dx = np.empty((dy.shape[0], self.k), np.float32) if out is None else out
        self.lib.nnc_sp_input_grad(dy.shape[0], self.n, self.k, _p(dy), _p(w), _p(self.rowptr), _p(self.cols), _p(dx),
                                   self.csr.kb)
        return dx

    def naive(self, x, w, out=None):
        y = np.empty((x.shape[0], self.n), np.float32) if out is None else out
        self.lib.nnc_sp_naive(x.shape[0], self.n, self.k, _p(x), _p(w), _p(self.rowptr), _p(self.cols), _p(y),
                              self.csr.kb)
        return y

    def dense(self, x, w, out=None):
        y = np.empty((x.shape[0], self.n), np.float32) if out is None else out
        self.lib.nnc_sp_dense(x.shape[0], self.n, self.k, _p(x), _p(w), _p(y))
        return y


def timing_kernels(sparsity: Sparsity, shape: tuple[int, int], m: int):
    """(dense, sparse) callables on random data of the layer's shape, for ``measure``."""
    mask = sparsity.mask(shape)
    ns = NativeSparse(mask)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, shape[1]), dtype=np.float32)
    w = (rng.standard_normal(shape, dtype=np.float32) * mask).astype(np.float32)
    y = np.empty((m, shape[0]), np.float32)
    ns.lib.nnc_sp_threads(1)
    return (lambda: ns.dense(x, w, y)), (lambda: ns.linear(x, w, out=y))
