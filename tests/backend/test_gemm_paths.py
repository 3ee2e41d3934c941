"""The training-step GEMM paths against independent references.

* ``nnc::sgemm`` with few rows and B not transposed, where the AVX-512 packed path reads B in place
  (``gemm::packed_direct_b``, edge slivers packed) and where it packs B, and the 8-row edge kernel
  (M = 12 q + 7..8): hypothesis shapes with edges (M, N, K not multiples of the 12 x 32 tile, K from 1,
  padded leading dimensions, op(A) transposed), every epilogue piece, against float64 numpy.
* ``nnc::sgemm`` with one block of rows (M <= MC), B packed a sliver at a time with the next sliver
  prefetched (``gemm::packed_slivers``): both transpose flags, several K blocks, both ISA paths, 1-2 threads.
* ``nnc::sgd_update`` / ``nnc::adam_update`` (vectorized, every flag combination) against the torch.optim
  formulas in float64.
* Code generation: a 2-D transpose read by matmuls is folded into the GEMM's transposed flag (no copy
  emitted) when its source is untouched until the reader, and not folded otherwise; sums / means over
  leading axes (bias gradients) run as column sweeps. Both against the NumPy interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import native_harness  # noqa: E402

from nncompile.codegen import register_rules  # noqa: E402
from nncompile.driver import compile_graph  # noqa: E402
from nncompile.ir import GraphBuilder, TensorType, run  # noqa: E402

pytestmark = pytest.mark.backend

if native_harness.compiler() is None:
    pytest.skip("g++ not available", allow_module_level=True)

T = TensorType
ACTS = {"none": lambda v: v, "relu": lambda v: np.maximum(v, 0.0),
        "tanh": np.tanh, "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v))}


@pytest.fixture(scope="module")
def nat():
    module = native_harness.load_native()
    saved = (module.get_avx512(), module.get_blocking(), module.get_direct_b_rows())
    yield module
    module.set_avx512(saved[0])
    module.set_blocking(*saved[1])
    module.set_direct_b_rows(saved[2])
    module.set_threads(2)


def _check(nat, rng, M, N, K, ta, pad, beta, alpha, use_col, use_row, act, use_res):
    native_harness.run_sgemm(nat, rng, M, N, K, ta, False, pad, beta, alpha, use_col, use_row, act, use_res)


rows = st.one_of(st.integers(9, 140), st.sampled_from([12, 19, 20, 31, 32, 128, 200, 256]))
cols = st.one_of(st.integers(32, 170), st.sampled_from([32, 33, 63, 64, 100, 255]))
depth = st.one_of(st.integers(1, 130), st.sampled_from([1, 2, 7, 8, 9, 128, 129, 600]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=rows, N=cols, K=depth, ta=st.booleans(), pad=st.sampled_from([0, 1, 5]), direct=st.booleans(),
       beta=st.sampled_from([0.0, 1.0, 0.5]), alpha=st.sampled_from([1.0, 0.25]), use_col=st.booleans(),
       use_row=st.booleans(), act=st.sampled_from(sorted(ACTS)), use_res=st.booleans(), seed=st.integers(0, 2**31))
def test_few_rows_b_in_place_or_packed(nat, M, N, K, ta, pad, direct, beta, alpha, use_col, use_row, act, use_res,
                                       seed):
    """Shapes the few-rows AVX-512 paths take (M > 8 so the skinny path does not), both ways."""
    if not nat.has_avx512():
        pytest.skip("CPU has no AVX-512F")
    nat.set_avx512(True)
    nat.set_threads(1)
    nat.set_direct_b_rows(256 if direct else 0)
    _check(nat, np.random.default_rng(seed), M, N, K, ta, pad, beta, alpha, use_col, use_row, act, use_res)


@pytest.mark.parametrize("threads", [1, 2])
def test_b_in_place_several_k_blocks(nat, threads):
    """Small KC so the in-place path runs several K blocks (partial sums kept in C) and M blocks."""
    if not nat.has_avx512():
        pytest.skip("CPU has no AVX-512F")
    nat.set_avx512(True)
    nat.set_threads(threads)
    nat.set_direct_b_rows(256)
    nat.set_blocking(24, 40, 4080)
    try:
        rng = np.random.default_rng(3)
        for M, N, K in [(128, 1000, 300), (61, 101, 77), (130, 70, 50), (200, 300, 129)]:
            _check(nat, rng, M, N, K, False, 1, 0.5, 1.0, True, True, "relu", True)
            _check(nat, rng, M, N, K, True, 0, 0.0, 0.5, True, False, "none", False)
    finally:
        nat.set_blocking(144, 512, 4080)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.one_of(st.integers(5, 144), st.sampled_from([12, 128, 140, 144])), N=cols,
       K=st.one_of(st.integers(1, 200), st.sampled_from([1, 8, 9, 64, 129])), ta=st.booleans(), tb=st.booleans(),
       kc=st.sampled_from([512, 64, 24]), avx512=st.booleans(), threads=st.sampled_from([1, 2]),
       pad=st.sampled_from([0, 3]), beta=st.sampled_from([0.0, 1.0]), use_col=st.booleans(), use_row=st.booleans(),
       act=st.sampled_from(["none", "relu", "gelu_tanh"]), use_res=st.booleans(), seed=st.integers(0, 2**31))
def test_one_row_block_b_packed_by_sliver(nat, M, N, K, ta, tb, kc, avx512, threads, pad, beta, use_col, use_row,
                                          act, use_res, seed):
    """M <= MC: B packed one sliver at a time with the next sliver's source prefetched
    (gemm::packed_slivers), across K blocks (small KC) and column edges; the AVX2 kernel (whole-panel
    loop nest) on the same shapes."""
    if avx512 and not nat.has_avx512():
        pytest.skip("CPU has no AVX-512F")
    nat.set_avx512(avx512)
    nat.set_threads(threads)
    nat.set_direct_b_rows(0)
    nat.set_blocking(144, kc, 4080)
    try:
        native_harness.run_sgemm(nat, np.random.default_rng(seed), M, N, K, ta, tb, pad, beta, 0.5 if ta else 1.0,
                                 use_col, use_row, act, use_res)
    finally:
        nat.set_blocking(144, 512, 4080)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(9, 140), N=st.integers(1, 17), K=depth, ta=st.booleans(), tb=st.booleans(),
       act=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 2**31))
def test_narrow_outputs(nat, M, N, K, ta, tb, act, seed):
    """N <= 16 (a classifier's logits) runs the 6x16 kernel even where AVX-512 is on."""
    nat.set_avx512(nat.has_avx512())
    nat.set_threads(1)
    rng = np.random.default_rng(seed)
    a, A, lda = native_harness.stored(rng, M, K, ta, 1)
    b, B, ldb = native_harness.stored(rng, K, N, tb, 0)
    C = np.full((M, N), np.nan, np.float32)
    col = rng.uniform(-1, 1, N).astype(np.float32)
    nat.sgemm(ta, tb, M, N, K, A, lda, B, ldb, C, N, 0.0, col, None, getattr(nat, f"ACT_{act.upper()}"), None, 0, 1.0)
    ref = ACTS[act](a.astype(np.float64) @ b.astype(np.float64) + col)
    np.testing.assert_allclose(C, ref, rtol=1e-4, atol=2e-6 * (K + 4) + 1e-5)


def test_real_step_shapes(nat):
    """The MLP step's GEMMs as the generated code calls them (dW with op(A) = dY^T read in place)."""
    nat.set_threads(1)
    rng = np.random.default_rng(5)
    for M, N, K, ta in [(128, 1024, 784, False), (1024, 1024, 128, True), (1024, 784, 128, True),
                        (10, 1024, 128, True), (128, 1024, 10, False), (128, 784, 1000, False)]:
        _check(nat, rng, M, N, K, ta, 0, 0.0, 1.0, False, False, "none", False)


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------

SGD_SOURCE = r"""
#include "nnc_optim.h"
extern "C" void sgd(float* p, const float* g, float* b, long n, float lr, float mom, float damp, float wd,
                    int nesterov, int first) {
    nnc::sgd_update(p, g, b, n, lr, mom, damp, wd, nesterov != 0, first != 0);
}
extern "C" void adam(float* p, const float* g, float* m, float* v, long n, float lr, float b1, float b2, float eps,
                     float wd, int decoupled, long step) {
    nnc::adam_update(p, g, m, v, n, lr, b1, b2, eps, wd, decoupled != 0, step);
}
"""


@pytest.fixture(scope="module")
def sgd_lib(tmp_path_factory):
    import ctypes
    import subprocess

    folder = tmp_path_factory.mktemp("sgd")
    (folder / "sgd.cpp").write_text(SGD_SOURCE)
    lib = folder / "libsgd.so"
    subprocess.run([native_harness.compiler(), "-O3", "-fopenmp", "-march=x86-64-v3", "-std=c++17", "-fPIC", "-shared",
                    f"-I{native_harness.NATIVE}", str(folder / "sgd.cpp"), "-o", str(lib)], check=True)
    handle = ctypes.CDLL(str(lib))
    P = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    handle.sgd.argtypes = [P, P, P, ctypes.c_long, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                           ctypes.c_int, ctypes.c_int]
    handle.adam.argtypes = [P, P, P, P, ctypes.c_long] + [ctypes.c_float] * 5 + [ctypes.c_int, ctypes.c_long]
    return handle


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 16384 * 5 + 3])
@pytest.mark.parametrize("momentum,dampening,wd,nesterov", [(0.0, 0.0, 0.0, False), (0.0, 0.0, 0.01, False),
                                                            (0.9, 0.0, 0.0, False), (0.9, 0.1, 0.01, False),
                                                            (0.9, 0.0, 0.01, True), (0.5, 0.0, 0.0, True)])
def test_sgd_update_matches_torch_formula(sgd_lib, n, momentum, dampening, wd, nesterov):
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(np.float32)
    buf = np.zeros(n, np.float32)
    ref_p, ref_buf = p.astype(np.float64), None
    lr = 0.1
    for step in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        sgd_lib.sgd(p, g, buf, n, lr, momentum, dampening, wd, int(nesterov), int(step == 0))
        d = g.astype(np.float64) + wd * ref_p
        if momentum:
            ref_buf = d if ref_buf is None else momentum * ref_buf + (1 - dampening) * d
            d = d + momentum * ref_buf if nesterov else ref_buf
        ref_p = ref_p - lr * d
        np.testing.assert_allclose(p, ref_p, rtol=1e-5, atol=1e-6)
        if momentum:
            np.testing.assert_allclose(buf, ref_buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 9, 100, 16384 * 5 + 3])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.01, False), (0.01, True)])
def test_adam_update_matches_torch_formula(sgd_lib, n, wd, decoupled):
    rng = np.random.default_rng(n + 1)
    p = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    ref_p, ref_m, ref_v = p.astype(np.float64), np.zeros(n), np.zeros(n)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    for step in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        sgd_lib.adam(p, g, m, v, n, lr, b1, b2, eps, wd, int(decoupled), step)
        d = g.astype(np.float64)
        if decoupled:
            ref_p = ref_p * (1 - lr * wd)
        else:
            d = d + wd * ref_p
        ref_m = b1 * ref_m + (1 - b1) * d
        ref_v = b2 * ref_v + (1 - b2) * d * d
        denom = np.sqrt(ref_v) / np.sqrt(1 - b2 ** step) + eps
        ref_p = ref_p - lr / (1 - b1 ** step) * ref_m / denom
        np.testing.assert_allclose(p, ref_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Code generation: transposes read in place, leading-axis reductions
# ---------------------------------------------------------------------------------------------

def _compile(graph):
    register_rules()
    model = compile_graph(graph)
    return model, (Path(model.module_path).parent / "kernels.cpp").read_text()


def _inputs(graph, seed):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(i.type.shape).astype(np.float32) for i in graph.inputs}


def _agree(graph, model, seed=0):
    inputs = _inputs(graph, seed)
    expected = run(graph, inputs, model.parameters())
    got = model(**inputs)
    got = got if isinstance(got, (list, tuple)) else [got]
    for name, value in zip(graph.outputs, got):
        np.testing.assert_allclose(value, expected[name], rtol=2e-4, atol=2e-4, err_msg=name)


def _t(b, x):
    return b.op("transpose", [x], {"dim0": 0, "dim1": 1})


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40))
def test_transposed_operands_read_in_place(m, n, k):
    b = GraphBuilder("tfold")
    a_km = b.input("a", T((k, m)))        # read as a^T
    w_nk = b.input("w", T((n, k)))        # read as w^T
    x_mk = b.input("x", T((m, k)))
    h = b.op("relu", [b.input("h", T((k, m)))])   # an arena value, read again after the matmul
    y1 = b.op("matmul", [_t(b, a_km), b.op("transpose", [w_nk], {"dim0": 1, "dim1": 0})])
    y2 = b.op("matmul", [x_mk, _t(b, w_nk)])
    y3 = b.op("matmul", [_t(b, h), _t(b, w_nk)])
    y4 = b.op("sum", [h], {"axes": (0,), "keepdim": False})
    b.output(y1, y2, y3, y4)
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    assert "nnc::sgemm(true, true" in source and "nnc::sgemm(false, true" in source
    # the four transposes of graph inputs are always read in place; h's when the schedule keeps h alive
    assert source.count("// no copy: every reader is a matmul") >= 4


def test_transpose_with_another_reader_is_copied():
    b = GraphBuilder("tkeep")
    a = b.input("a", T((7, 5)))
    at = _t(b, a)
    y = b.op("matmul", [at, b.input("c", T((7, 3)))])
    b.output(y, b.op("relu", [at]))
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    assert "// no copy" not in source


def test_transposed_source_overwritten_before_the_reader_is_copied():
    """The transpose's source dies at the transpose; the planner may reuse its memory before the matmul."""
    b = GraphBuilder("tclobber")
    x = b.input("x", T((64, 32)))
    s = b.op("relu", [x])                     # arena value, last read by the transpose
    st_ = _t(b, s)                            # [32, 64]
    other = b.op("tanh", [b.input("z", T((64, 32)))])   # may land in s's slot
    y = b.op("matmul", [st_, other])          # [32, 32]
    b.output(y)
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    store = model.plan["memory"]["values"]
    if store[other]["kind"] == "arena" and store[other]["where"] == store[s]["where"]:
        assert "// no copy" not in source   # the tanh overwrote relu(x): the transpose must be copied


@pytest.mark.parametrize("shape,axes,op,keep", [((7, 300), (0,), "sum", False), ((3, 4, 261), (0, 1), "mean", False),
                                                ((5, 256), (0,), "mean", True), ((2, 9, 3), (0,), "sum", True),
                                                ((130, 2), (0,), "sum", False)])
def test_leading_axis_reductions(shape, axes, op, keep):
    b = GraphBuilder("lead")
    y = b.op(op, [b.input("x", T(shape))], {"axes": axes, "keepdim": keep})
    b.output(y)
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    assert "acc_[j_] = 0.0;" in source and "acc_[j_] +=" in source   # the column-strip sweep, not a loop per output


def test_transposed_view_read_in_place():
    """dW = reshape(g)^T @ reshape(x) as the linear VJP builds it for 3-D activations: the transpose's
    source is a view, its base's buffer is what must stay untouched."""
    b = GraphBuilder("tview")
    g = b.op("tanh", [b.input("g", T((2, 5, 12)))])
    x = b.input("x", T((2, 5, 9)))
    g2 = b.op("reshape", [g], {"shape": (10, 12)})
    x2 = b.op("reshape", [x], {"shape": (10, 9)})
    dw = b.op("matmul", [_t(b, g2), x2])
    db = b.op("sum", [g2], {"axes": (0,), "keepdim": False})
    b.output(dw, db)
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    assert "nnc::sgemm(true, false, 12, 9, 10" in source


@pytest.mark.parametrize("shape", [(8, 8), (70, 9), (9, 70), (3, 19, 37), (2, 4, 40, 33), (1, 64, 256)])
def test_transpose_last_two_dims_tiled(shape):
    b = GraphBuilder("ttile")
    x = b.op("relu", [b.input("x", T(shape))])
    y = b.op("transpose", [x], {"dim0": len(shape) - 1, "dim1": len(shape) - 2})
    b.output(b.op("tanh", [y]))
    graph = b.build()
    model, source = _compile(graph)
    _agree(graph, model)
    assert "nnc::transpose_last_two(" in source


@pytest.mark.parametrize("shape,axes,op", [((5, 300), (1,), "sum"), ((2, 3, 40), (-1,), "mean"),
                                           ((4, 33), (1,), "sum"), ((3, 31), (1,), "mean")])
def test_trailing_axis_reductions(shape, axes, op):
    b = GraphBuilder("trail")
    b.output(b.op(op, [b.input("x", T(shape))], {"axes": axes, "keepdim": True}))
    graph = b.build()
    model, _ = _compile(graph)
    _agree(graph, model)
