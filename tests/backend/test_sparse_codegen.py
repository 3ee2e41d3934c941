"""Sparse-weight kernels (native/nnc_sparse.h, codegen/cpp_sparse.py) against the dense reference on the
same masked weights.

Hypothesis drives the kernels through the ctypes harness (the pattern passed at run time: the same code
the generated modules call with the pattern baked) over shapes and patterns with empty rows, fully
dense rows, block rows (row groups), K blocks and batch sizes across the 8-row and 64-row chunk edges.
Compiled models (patterns baked into the generated C++) are checked against the NumPy interpreter.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nncompile as nnc
from nncompile.codegen import cpp_sparse
from nncompile.errors import ShapeError
from nncompile.ir.interp import run
from nncompile.ir.types import Sparsity, TensorType

pytestmark = pytest.mark.backend

ACTS = {0: lambda v: v, 1: lambda v: np.maximum(v, 0)}   # nnc::ACT_NONE, nnc::ACT_RELU


@st.composite
def patterns(draw):
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]))
    mask = rng.random((n, k)) < density
    # some empty rows, some fully dense rows, some runs of identical rows (block rows)
    for row in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        mask[row] = False
    for row in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        mask[row] = True
    start = draw(st.integers(0, n - 1))
    run_length = draw(st.integers(1, 6))
    mask[start:start + run_length] = mask[start]
    kb = draw(st.sampled_from([None, 8, 16, 40]))
    return mask, kb, rng


@given(patterns(), st.sampled_from([1, 3, 7, 8, 9, 17, 64, 70]), st.booleans(), st.sampled_from([0, 1]),
       st.booleans(), st.booleans())
def test_sparse_linear_matches_dense(pattern, m, with_bias, act, with_residual, packed):
    mask, kb, rng = pattern
    n, k = mask.shape
    ns = cpp_sparse.NativeSparse(mask, kb)
    x = rng.standard_normal((m, k)).astype(np.float32)
    # off-pattern entries hold garbage: the kernel must never read them
    w = np.where(mask, rng.standard_normal((n, k)), 1e6).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    residual = rng.standard_normal((m, n)).astype(np.float32) if with_residual else None
    values = ns.packed(w) if packed else None
    y = ns.linear(x, w, bias=bias, act=act, residual=residual, values=values)
    ref = x.astype(np.float64) @ (np.where(mask, w, 0).astype(np.float64)).T
    ref = ACTS[act](ref + (bias if bias is not None else 0)) + (residual if residual is not None else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.sqrt(k)))


@given(patterns(), st.sampled_from([1, 5, 8, 33, 260]))
def test_sparse_weight_grad_matches_masked_dense(pattern, m):
    mask, kb, rng = pattern
    n, k = mask.shape
    ns = cpp_sparse.NativeSparse(mask, kb)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    dw = ns.weight_grad(dy, x, out=np.full((n, k), 7.0, np.float32))
    ref = (dy.astype(np.float64).T @ x) * mask
    np.testing.assert_allclose(dw, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.sqrt(m)))
    assert np.all(dw[~mask] == 0.0)


@given(patterns(), st.sampled_from([1, 6, 8, 40, 65]))
def test_sparse_input_grad_matches_masked_dense(pattern, m):
    mask, kb, rng = pattern
    n, k = mask.shape
    ns = cpp_sparse.NativeSparse(mask, kb)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    w = np.where(mask, rng.standard_normal((n, k)), -5e5).astype(np.float32)   # garbage off the pattern
    dx = ns.input_grad(dy, w)
    ref = dy.astype(np.float64) @ np.where(mask, w, 0).astype(np.float64)
    np.testing.assert_allclose(dx, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.sqrt(n)))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sparse_kernels_threaded_match_dense(threads):
    """Layers big enough for the kernels' thread split (rows per thread, packing per tile)."""
    rng = np.random.default_rng(threads)
    mask = rng.random((700, 520)) < 0.3
    mask[5:13] = mask[4]
    mask[100] = False
    ns = cpp_sparse.NativeSparse(mask)
    ns.lib.nnc_sp_threads(threads)
    try:
        for m in (3, 64, 150):
            x = rng.standard_normal((m, 520)).astype(np.float32)
            w = np.where(mask, rng.standard_normal(mask.shape), 3e5).astype(np.float32)
            wm = np.where(mask, w, 0).astype(np.float64)
            np.testing.assert_allclose(ns.linear(x, w), x @ wm.T, rtol=1e-4, atol=2e-3)
            dy = rng.standard_normal((m, 700)).astype(np.float32)
            np.testing.assert_allclose(ns.input_grad(dy, w), dy @ wm, rtol=1e-4, atol=2e-3)
            np.testing.assert_allclose(ns.weight_grad(dy, x), (dy.T.astype(np.float64) @ x) * mask, rtol=1e-4, atol=2e-3)
    finally:
        ns.lib.nnc_sp_threads(1)


def test_pattern_tables_are_k_blocked_csr():
    mask = np.zeros((4, 600), bool)
    mask[0, [1, 300, 599]] = True
    mask[2, :] = True
    mask[3] = mask[2]
    csr = cpp_sparse.pattern_from_mask(mask, kb=256)
    assert csr.kb == 256 and len(csr.rowptr) == 3 * 4 + 1
    assert csr.nnz == mask.sum() and list(csr.gstart) == [0, 1, 2, 4]
    # every (block, row) range holds that row's columns of that block, ascending
    for b in range(3):
        for r in range(4):
            cols = csr.cols[csr.rowptr[b * 4 + r]:csr.rowptr[b * 4 + r + 1]]
            want = np.flatnonzero(mask[r])
            assert list(cols) == [c for c in want if b * 256 <= c < (b + 1) * 256]


# Compiled models: the pattern baked into the generated code ----------------------------------------

MODEL = """
dim B = {batch}
model sparse_net {{
    input x: f32[B, 96]
    param w1: f32[64, 96] = kaiming_uniform() sparse(density=0.15, seed=4)
    param b1: f32[64] = uniform(low=-0.1, high=0.1)
    param w2: f32[64, 64] = kaiming_uniform() sparse(block=[4, 8], density=0.25, seed=2)
    param w3: f32[48, 64] = kaiming_uniform() sparse(nm=2:4)
    param w4: f32[40, 48] = kaiming_uniform() sparse(mask="{mask}")
    h1 = relu(linear(x, w1, b1))
    h2 = linear(h1, w2) + h1
    h3 = tanh(linear(h2, w3))
    y = linear(h3, w4)
    output y
}}
"""


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    mask = rng.random((40, 48)) < 0.2
    mask[0] = False          # empty row
    mask[1] = True           # fully dense row
    mask[5:9] = mask[4]      # a run of identical rows
    path = tmp_path_factory.mktemp("masks") / "w4_mask.npy"
    np.save(path, mask)
    return path, mask


@pytest.fixture(scope="module", params=[(5, "sparse"), (70, "sparse"), (5, "unrolled"), (16, "unrolled"),
                                        (70, "unrolled")], ids=lambda p: f"{p[1]}-b{p[0]}")
def compiled(request, mask_file, tmp_path_factory):
    """The model compiled with every sparse layer on the table-driven sparse kernel or the unrolled code
    (batch 5: the M < 8 kernel / one 8-lane vector with 4 accumulator sets; 16: two vectors; 70: one
    64-row chunk and a 6-row tail)."""
    batch, kernel = request.param
    out = tmp_path_factory.mktemp("build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNC_SPARSE_KERNEL", kernel)
        graph = nnc.parse_text(MODEL.format(batch=batch, mask=mask_file[0]))
        model = nnc.compile(graph, out_dir=out)
    return graph, model, out, batch


def test_compiled_sparse_model_matches_interpreter(compiled):
    graph, model, out, batch = compiled
    weights = model.parameters()
    for name in ("w1", "w2", "w3", "w4"):
        t = graph.type_of(name)
        assert np.all(weights[name][~t.sparsity.mask(t.shape)] == 0), name
    x = np.random.default_rng(batch).standard_normal((batch, 96)).astype(np.float32)
    ref = run(graph, {"x": x}, weights)["y"]
    np.testing.assert_allclose(model(x), ref, rtol=1e-4, atol=1e-5)
    source = (out / "kernels.cpp").read_text()
    decisions = cpp_sparse.DECISIONS[model.manifest["module_name"]]
    assert {d["weight"] for d in decisions} == {"w1", "w2", "w3", "w4"}
    assert all(d["kernel"] == "sparse" and "forced" in d["why"] for d in decisions)
    unrolled = "forced by NNC_SPARSE_KERNEL=unrolled" in decisions[0]["why"]
    assert all(d["form"] == ("unrolled" if unrolled else "tables") for d in decisions)
    assert source.count("nnc::sparse::linear(") == (0 if unrolled else 4)
    assert source.count("_mm256_fmadd_ps(w, _mm256_load_ps(xT + ") >= (sum(d["nnz"] for d in decisions) if unrolled else 0)
    assert "static const int32_t cols_" in source
    plan = json.loads((out / "plan.json").read_text())
    assert {d["weight"] for d in plan["sparse"]} == {"w1", "w2", "w3", "w4"}


def test_compiled_sparse_model_ignores_off_pattern_weights(compiled):
    """The baked pattern, not the weight values, decides what is read: garbage off the pattern is ignored."""
    graph, model, out, batch = compiled
    x = np.random.default_rng(0).standard_normal((batch, 96)).astype(np.float32)
    before = model(x)
    saved = model.parameters()["w1"].copy()
    garbage = np.where(saved == 0, 123.0, saved).astype(np.float32)
    model.load_weights({"w1": garbage})
    try:
        np.testing.assert_array_equal(model(x), before)
    finally:
        model.load_weights({"w1": saved})


def test_packed_values_follow_weight_updates(compiled):
    """The inference module keeps the sparse weights' values packed between calls; loading new weights
    (or a training step) refreshes them, and the views it hands out cannot silently bypass that."""
    graph, model, out, batch = compiled
    packed = model.manifest["packed_values"]
    assert {w["weight"] for w in packed["weights"]} == {"w1", "w2", "w3", "w4"}
    assert model.manifest["param_bytes"] == packed["end"]
    x = np.random.default_rng(1).standard_normal((batch, 96)).astype(np.float32)
    saved = {k: v.copy() for k, v in model.parameters().items()}
    model(x)
    with pytest.raises(ValueError, match="read-only"):
        model.parameters()["w2"][...] = 0.0
    scaled = {k: (v * 1.5).astype(np.float32) for k, v in saved.items()}
    model.load_weights(scaled)
    try:
        np.testing.assert_allclose(model(x), run(graph, {"x": x}, scaled)["y"], rtol=1e-4, atol=1e-5)
        # a reloaded build directory packs on its first call too
        again = nnc.load(out)
        np.testing.assert_allclose(again(x), run(graph, {"x": x}, saved)["y"], rtol=1e-4, atol=1e-5)
    finally:
        model.load_weights(saved)
    np.testing.assert_allclose(model(x), run(graph, {"x": x}, saved)["y"], rtol=1e-4, atol=1e-5)


def test_chooser_keeps_dense_at_half_density_and_picks_sparse_at_ninety():
    half = cpp_sparse.choose(64, 1024, 1024, nnz=1024 * 1024 // 2, timing=False)
    assert half["kernel"] == "dense" and "cost model" in half["why"]
    ninety = cpp_sparse.choose(64, 1024, 1024, nnz=1024 * 1024 // 10, timing=False)
    assert ninety["kernel"] == "sparse"
    one_row = cpp_sparse.choose(1, 1024, 1024, nnz=1024 * 1024 // 10, timing=False)
    assert one_row["kernel"] == "dense"     # batch 1 is bound by reading W either way


def test_chooser_timing_mode_measures_both_kernels():
    sp = Sparsity("unstructured", density=0.05, seed=0)
    decision = cpp_sparse.choose(64, 256, 512, nnz=int(sp.mask((256, 512)).sum()), timing=True,
                                 kernels=cpp_sparse.timing_kernels(sp, (256, 512), 64))
    assert decision["timed_dense_us"] > 0 and decision["timed_sparse_us"] > 0
    assert decision["why"].startswith("timed")


def test_sparse_ops_reject_bad_input():
    from nncompile.ops import sparse as sparse_ops  # noqa: F401
    from nncompile.ops.base import get_op

    dense_w = TensorType((8, 4))
    with pytest.raises(ShapeError, match="no sparsity pattern"):
        get_op("sparse_weight_grad").infer(TensorType((2, 8)), TensorType((2, 4)), dense_w)
    sparse_w = TensorType((8, 4), sparsity=Sparsity("unstructured", density=0.5))
    with pytest.raises(ShapeError, match="expects grad"):
        get_op("sparse_weight_grad").infer(TensorType((2, 8)), TensorType((3, 4)), sparse_w)
    with pytest.raises(ShapeError, match="sparse_mask"):
        get_op("sparse_mask").infer(TensorType((8, 5)), sparse_w)


# From torch: torch.nn.utils.prune masks and sparsity="auto" -------------------------------------------


def test_torch_pruned_linear_keeps_its_mask_and_matches_torch(monkeypatch):
    import torch
    import torch.nn as tnn
    import torch.nn.utils.prune as prune

    from nncompile.frontend.fx import from_torch

    monkeypatch.setenv("NNC_SPARSE_KERNEL", "sparse")
    torch.manual_seed(0)
    module = tnn.Sequential(tnn.Linear(64, 96), tnn.ReLU(), tnn.Linear(96, 10))
    prune.l1_unstructured(module[0], "weight", amount=0.8)
    mask = module[0].weight_mask.numpy() != 0
    x = torch.randn(12, 64)
    graph = from_torch(module, (x,))
    sparse = [p for p in graph.params if p.type.sparsity is not None]
    assert len(sparse) == 1 and sparse[0].type.shape == (96, 64)
    np.testing.assert_array_equal(sparse[0].type.sparsity.mask((96, 64)), mask)
    # the user's module is untouched (still pruned through its hook)
    assert hasattr(module[0], "weight_orig") and hasattr(module[0], "weight_mask")
    model = nnc.compile(graph)
    np.testing.assert_allclose(model(x.numpy()), module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_torch_sparsity_auto_finds_mostly_zero_weights():
    import torch
    import torch.nn as tnn

    from nncompile.errors import InputError
    from nncompile.frontend.fx import from_torch

    torch.manual_seed(1)
    module = tnn.Sequential(tnn.Linear(32, 48), tnn.ReLU(), tnn.Linear(48, 8))
    with torch.no_grad():
        module[0].weight[torch.rand(48, 32) < 0.7] = 0.0       # 70% zeros: becomes sparse
        module[2].weight[torch.rand(8, 48) < 0.3] = 0.0        # 30% zeros: stays dense
    x = torch.randn(4, 32)
    graph = from_torch(module, (x,), sparsity="auto")
    kinds = {p.type.shape: p.type.sparsity for p in graph.params}
    assert kinds[(48, 32)] is not None and kinds[(8, 48)] is None
    np.testing.assert_array_equal(kinds[(48, 32)].mask((48, 32)), module[0].weight.detach().numpy() != 0)
    assert all(p.type.sparsity is None for p in from_torch(module, (x,)).params)
    with pytest.raises(InputError, match="sparsity="):
        from_torch(module, (x,), sparsity="everything")


@pytest.mark.slow
def test_baked_values_opt_in_matches_torch(monkeypatch, tmp_path):
    import torch
    import torch.nn as tnn
    import torch.nn.utils.prune as prune

    from nncompile.frontend.fx import from_torch

    monkeypatch.setenv("NNC_SPARSE_KERNEL", "sparse")
    monkeypatch.setenv("NNC_SPARSE_VALUES", "baked")
    torch.manual_seed(2)
    module = tnn.Sequential(tnn.Linear(40, 72), tnn.GELU(), tnn.Linear(72, 6))
    prune.random_unstructured(module[0], "weight", amount=0.9)
    x = torch.randn(20, 40)
    model = nnc.compile(from_torch(module, (x,)), out_dir=tmp_path)
    assert "static const float vals_" in (tmp_path / "kernels.cpp").read_text()
    assert any(d.get("values") == "baked" for d in cpp_sparse.DECISIONS[model.manifest["module_name"]])
    np.testing.assert_allclose(model(x.numpy()), module(x).detach().numpy(), rtol=1e-4, atol=1e-5)
