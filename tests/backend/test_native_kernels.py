"""Native runtime kernels (native/*.h) against numpy / torch references.

One pybind11 module (tests/backend/native_bindings.cpp) is compiled per source hash and cached
(native_harness.py), so only the first run pays the ~10 s build. Hypothesis draws shapes that hit
the edge cases of each kernel: M = 1, K = 1, N not a multiple of 16, padded leading dimensions,
transposes, every epilogue piece, conv groups / dilation / stride / padding.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import native_harness  # noqa: E402
from native_harness import act_code, act_ref, rand, run_sgemm, stored  # noqa: E402,F401

pytestmark = pytest.mark.backend

if native_harness.compiler() is None:
    pytest.skip("g++ not available", allow_module_level=True)

torch = pytest.importorskip("torch")
F = torch.nn.functional
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTS = ["none", "relu", "gelu_erf", "gelu_tanh", "tanh", "sigmoid", "silu"]


@pytest.fixture(scope="module")
def nat():
    module = native_harness.load_native()
    module.set_threads(2)
    default_avx512 = module.get_avx512()
    default_blocking = module.get_blocking()
    module.default_blocking = default_blocking
    yield module
    module.set_avx512(default_avx512)
    module.set_blocking(*default_blocking)
    module.set_threads(2)


KERNELS = ["avx2", "avx512"]


def use_kernel(nat, kernel: str) -> None:
    """Select the packed micro-kernel; skips the test for AVX-512 on a CPU without it."""
    if kernel == "avx512" and not nat.has_avx512():
        pytest.skip("CPU has no AVX-512F")
    nat.set_avx512(kernel == "avx512")


dims = st.one_of(st.integers(1, 40), st.sampled_from([1, 6, 7, 16, 17, 33, 64, 65, 97]))


@pytest.mark.parametrize("kernel", KERNELS)
@SETTINGS
@given(M=dims, N=dims, K=dims, ta=st.booleans(), tb=st.booleans(), pad=st.sampled_from([0, 3]),
       beta=st.sampled_from([0.0, 1.0, 0.5]), alpha=st.sampled_from([1.0, 0.125]), use_col=st.booleans(),
       use_row=st.booleans(), act=st.sampled_from(ACTS), use_res=st.booleans(), seed=st.integers(0, 2**31))
def test_sgemm_matches_numpy(nat, kernel, M, N, K, ta, tb, pad, beta, alpha, use_col, use_row, act, use_res, seed):
    use_kernel(nat, kernel)
    rng = np.random.default_rng(seed)
    run_sgemm(nat, rng, M, N, K, ta, tb, pad, beta, alpha, use_col, use_row, act, use_res)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_sgemm_many_cache_blocks(nat, kernel, threads, ta, tb):
    """Tiny MC/KC/NC so every loop of the packed path runs several times (edges included)."""
    use_kernel(nat, kernel)
    rng = np.random.default_rng(7)
    nat.set_threads(threads)
    nat.set_blocking(12, 24, 48)
    try:
        for M, N, K in [(61, 101, 77), (130, 70, 50), (7, 200, 130)]:
            for beta, act, use_res in [(0.0, "gelu_erf", True), (1.0, "relu", False)]:
                run_sgemm(nat, rng, M, N, K, ta, tb, 1, beta, 0.5, True, True, act, use_res)
    finally:
        nat.set_blocking(*nat.default_blocking)
        nat.set_threads(2)


@pytest.mark.parametrize("M,N,K", [(1, 1024, 1024), (2, 333, 517), (4, 100, 1000), (5, 2100, 37), (8, 1030, 9),
                                   (300, 257, 700), (700, 400, 1000), (128, 1024, 784), (512, 64, 512),
                                   (5, 3, 0)])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_sgemm_real_shapes(nat, kernel, M, N, K, tb):
    use_kernel(nat, kernel)
    rng = np.random.default_rng(M * 7 + N)
    run_sgemm(nat, rng, M, N, K, False, tb, 0, 1.0, 1.0, True, False, "silu", True)


def test_sgemm_batched(nat):
    rng = np.random.default_rng(3)
    for batch, M, N, K, share_b, tb in [(6, 17, 33, 20, False, False), (3, 64, 80, 70, True, True),
                                        (8, 5, 9, 3, False, True), (1, 100, 100, 100, False, False)]:
        A = rand(rng, batch, M, K)
        B = rand(rng, 1 if share_b else batch, *((N, K) if tb else (K, N)))
        C = np.full((batch, M, N), np.nan, np.float32)
        mask = rand(rng, M, N)  # residual shared by all items (stride 0), like an attention mask
        nat.sgemm_batched(batch, False, tb, M, N, K, A, K, M * K, B, K if tb else N, 0 if share_b else B[0].size,
                          C, N, M * N, 0.0, mask, N, 0, act_code(nat, "none"), 0.25)
        Bm = np.swapaxes(B, 1, 2) if tb else B
        ref = 0.25 * np.matmul(A.astype(np.float64), Bm.astype(np.float64)) + mask
        np.testing.assert_allclose(C, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sgemm_called_inside_parallel_region(nat, kernel):
    """Generated code calls nnc::sgemm per batch item from its own OpenMP loop."""
    use_kernel(nat, kernel)
    rng = np.random.default_rng(9)
    batch, M, N, K = 6, 150, 130, 140  # each item large enough to be threaded when called alone
    A, B = rand(rng, batch, M, K), rand(rng, batch, K, N)
    C = np.full((batch, M, N), np.nan, np.float32)
    nat.sgemm_from_parallel(batch, M, N, K, A, B, C)
    np.testing.assert_allclose(C, np.matmul(A.astype(np.float64), B.astype(np.float64)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Vector math
# ---------------------------------------------------------------------------------------------

def test_exp_relative_error(nat):
    x = np.concatenate([np.linspace(-87.0, 88.5, 200_003), np.float32([0.0, -0.0, 1e-30, -1e-30])])
    x = x.astype(np.float32)
    got = nat.unary(x, "exp").astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 1e-6
    special = nat.unary(np.float32([-1000.0, 1000.0, np.inf, -np.inf, np.nan, -88.0]), "exp")
    assert special[0] == 0.0 and special[1] == np.inf and special[2] == np.inf and special[3] == 0.0
    assert np.isnan(special[4]) and 0.0 <= special[5] < 1e-37


def test_log_tanh_erf_accuracy(nat):
    x = np.exp(np.linspace(-80.0, 80.0, 100_001)).astype(np.float32)
    got = nat.unary(x, "log").astype(np.float64)
    ref = np.log(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)) < 3e-7
    special = nat.unary(np.float32([0.0, -1.0, np.inf, np.nan, 1e-42]), "log")
    assert special[0] == -np.inf and np.isnan(special[1]) and special[2] == np.inf and np.isnan(special[3])
    assert abs(special[4] - math.log(np.float32(1e-42))) < 1e-4
    t = np.linspace(-12.0, 12.0, 100_003).astype(np.float32)
    tanh = nat.unary(t, "tanh").astype(np.float64)
    assert np.max(np.abs(tanh - np.tanh(t.astype(np.float64)))) < 3e-7
    small = t[np.abs(t) < 1.0]
    rel = np.abs(nat.unary(small, "tanh") - np.tanh(small.astype(np.float64))) / np.maximum(np.abs(small), 1e-30)
    assert rel.max() < 5e-7
    erf_ref = np.array([math.erf(v) for v in t.astype(np.float64)])
    assert np.max(np.abs(nat.unary(t, "erf") - erf_ref)) < 5e-7
    assert np.isnan(nat.unary(np.float32([np.nan]), "tanh")[0])


@pytest.mark.parametrize("act", ACTS)
def test_activations_vector_and_scalar(nat, act):
    x = np.linspace(-30.0, 30.0, 10_007).astype(np.float32)
    ref = act_ref(x, act)
    vec = nat.unary(x, "act", act_code(nat, act))
    scalar = nat.unary(x, "scalar_act", act_code(nat, act))
    np.testing.assert_allclose(vec, ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(scalar, vec, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_elementwise_binary_and_sigmoid(nat, n, seed):
    rng = np.random.default_rng(seed)
    a, b = rand(rng, n, scale=10.0), rand(rng, n, scale=10.0) + 20.5
    np.testing.assert_array_equal(nat.binary(a, b, "add"), a + b)
    np.testing.assert_array_equal(nat.binary(a, b, "sub"), a - b)
    np.testing.assert_array_equal(nat.binary(a, b, "mul"), a * b)
    np.testing.assert_array_equal(nat.binary(a, b, "div"), a / b)
    np.testing.assert_allclose(nat.unary(a, "sigmoid"), act_ref(a, "sigmoid"), rtol=2e-6, atol=1e-7)


@SETTINGS
@given(rows=st.integers(1, 20), n=st.integers(1, 300), scale=st.sampled_from([1.0, 100.0, 1e4]),
       seed=st.integers(0, 2**31))
def test_softmax_log_softmax(nat, rows, n, scale, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, rows, n, scale=scale)
    t = torch.from_numpy(x.astype(np.float64))
    np.testing.assert_allclose(nat.rows(x, "softmax"), torch.softmax(t, -1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(nat.rows(x, "log_softmax"), torch.log_softmax(t, -1).numpy(),
                               rtol=1e-5, atol=1e-5 * (1 + scale / 100.0))


def test_softmax_large_parallel(nat):
    rng = np.random.default_rng(1)
    x = rand(rng, 512, 1000, scale=50.0)
    got = nat.rows(x, "softmax")
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(x).double(), -1).numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


@SETTINGS
@given(rows=st.integers(1, 40), n=st.integers(1, 200), affine=st.booleans(), seed=st.integers(0, 2**31))
def test_layer_norm(nat, rows, n, affine, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, rows, n, scale=3.0) + 5.0
    g, b = (rand(rng, n), rand(rng, n)) if affine else (None, None)
    y, mean, rstd = nat.layer_norm(x, g, b, 1e-5)
    ref = F.layer_norm(torch.from_numpy(x).double(), (n,), None if g is None else torch.from_numpy(g).double(),
                       None if b is None else torch.from_numpy(b).double(), 1e-5).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(x.astype(np.float64).var(-1) + 1e-5), rtol=1e-3)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_batch_norm_inference(nat, act):
    rng = np.random.default_rng(5)
    x = rand(rng, 3, 7, 5, 9, scale=2.0)
    mean, var = rand(rng, 7), np.abs(rand(rng, 7)) + 0.1
    g, b = rand(rng, 7), rand(rng, 7)
    y = nat.batch_norm(x, mean, var, g, b, 1e-5, act_code(nat, act))
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = act_ref(F.batch_norm(t(x), t(mean), t(var), t(g), t(b), False, 0.1, 1e-5).numpy(), act)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(outer=st.integers(1, 6), n=st.integers(1, 70), inner=st.sampled_from([1, 3, 8, 37, 70]),
       seed=st.integers(0, 2**31))
def test_reductions(nat, outer, n, inner, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, outer, n, inner)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(nat.reduce(x, outer, n, inner, 0), x64.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nat.reduce(x, outer, n, inner, 1), x64.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nat.reduce(x, outer, n, inner, 2), x.max(1))


# ---------------------------------------------------------------------------------------------
# Convolution and pooling
# ---------------------------------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dil[0] * (kh - 1) + 1 - 2 * pad[0]), 14))
    w = draw(st.integers(max(1, dil[1] * (kw - 1) + 1 - 2 * pad[1]), 14))
    n = draw(st.integers(1, 3))
    return n, cin, cout, h, w, kh, kw, stride, pad, dil, groups


@SETTINGS
@given(case=conv_cases(), use_bias=st.booleans(), act=st.sampled_from(["none", "relu", "silu"]),
       use_res=st.booleans(), seed=st.integers(0, 2**31))
def test_conv2d_matches_torch(nat, case, use_bias, act, use_res, seed):
    n, cin, cout, h, w, kh, kw, stride, pad, dil, groups = case
    rng = np.random.default_rng(seed)
    x = rand(rng, n, cin, h, w)
    wt = rand(rng, cout, cin // groups, kh, kw)
    bias = rand(rng, cout) if use_bias else None
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = F.conv2d(t(x), t(wt), None if bias is None else t(bias), stride, pad, dil, groups).numpy()
    ref = act_ref(ref, act)
    residual = rand(rng, *ref.shape) if use_res else None
    if use_res:
        ref = ref + residual
    y = nat.conv2d(x, wt, bias, stride, pad, dil, groups, act_code(nat, act), residual)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(case=conv_cases(), seed=st.integers(0, 2**31))
def test_conv2d_backward_matches_autograd(nat, case, seed):
    n, cin, cout, h, w, kh, kw, stride, pad, dil, groups = case
    rng = np.random.default_rng(seed)
    x = rand(rng, n, cin, h, w)
    wt = rand(rng, cout, cin // groups, kh, kw)
    xt = torch.from_numpy(x).double().requires_grad_()
    wtt = torch.from_numpy(wt).double().requires_grad_()
    bt = torch.zeros(cout, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(xt, wtt, bt, stride, pad, dil, groups)
    dy = rand(rng, *out.shape)
    out.backward(torch.from_numpy(dy).double())
    dx, dw, db = nat.conv2d_backward(x, wt, dy, stride, pad, dil, groups)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wtt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_conv2d_real_size_and_workspace(nat):
    rng = np.random.default_rng(11)
    x = rand(rng, 2, 64, 28, 28)
    wt = rand(rng, 128, 64, 3, 3, scale=0.1)
    bias = rand(rng, 128)
    y = nat.conv2d(x, wt, bias, (1, 1), (1, 1), (1, 1), 1, act_code(nat, "relu"), None)
    ref = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(bias), 1, 1)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert nat.conv2d_workspace_floats((2, 64, 28, 28), (128, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1) == 64 * 9 * 784
    assert nat.conv2d_workspace_floats((2, 64, 28, 28), (128, 64, 1, 1), (1, 1), (0, 0), (1, 1), 1) == 0


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    h, w = draw(st.integers(kh, 13)), draw(st.integers(kw, 13))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w, (kh, kw), stride, pad


@SETTINGS
@given(case=pool_cases(), dil=st.sampled_from([(1, 1), (2, 1)]), ceil_mode=st.booleans(), seed=st.integers(0, 2**31))
def test_max_pool2d(nat, case, dil, ceil_mode, seed):
    n, c, h, w, k, stride, pad = case
    if dil[0] * (k[0] - 1) + 1 > h + 2 * pad[0]:
        return
    x = rand(np.random.default_rng(seed), n, c, h, w)
    ref, ref_idx = F.max_pool2d(torch.from_numpy(x), k, stride, pad, dil, ceil_mode=ceil_mode, return_indices=True)
    y, idx = nat.max_pool2d(x, k, stride, pad, dil, ceil_mode)
    np.testing.assert_array_equal(y, ref.numpy())
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    xt = torch.from_numpy(x).double().requires_grad_()
    out = F.max_pool2d(xt, k, stride, pad, dil, ceil_mode=ceil_mode)
    dy = rand(np.random.default_rng(seed + 1), *out.shape)
    out.backward(torch.from_numpy(dy).double())
    dx = nat.max_pool2d_backward(x, dy, idx, k, stride, pad, dil, ceil_mode)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(case=pool_cases(), ceil_mode=st.booleans(), include_pad=st.booleans(), seed=st.integers(0, 2**31))
def test_avg_pool2d(nat, case, ceil_mode, include_pad, seed):
    n, c, h, w, k, stride, pad = case
    x = rand(np.random.default_rng(seed), n, c, h, w)
    ref = F.avg_pool2d(torch.from_numpy(x), k, stride, pad, ceil_mode=ceil_mode, count_include_pad=include_pad)
    np.testing.assert_allclose(nat.avg_pool2d(x, k, stride, pad, ceil_mode, include_pad), ref.numpy(),
                               rtol=1e-5, atol=1e-6)
    xt = torch.from_numpy(x).double().requires_grad_()
    out = F.avg_pool2d(xt, k, stride, pad, ceil_mode=ceil_mode, count_include_pad=include_pad)
    dy = rand(np.random.default_rng(seed + 1), *out.shape)
    out.backward(torch.from_numpy(dy).double())
    dx = nat.avg_pool2d_backward(x, dy, k, stride, pad, ceil_mode, include_pad)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_global_avg_pool(nat):
    x = rand(np.random.default_rng(2), 3, 5, 7, 9)
    np.testing.assert_allclose(nat.global_avg_pool(x), x.astype(np.float64).mean((2, 3)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,Lq,Lk,D,Dv", [(1, 1, 1, 1, 1, 1), (2, 3, 17, 17, 8, 8), (1, 2, 70, 70, 64, 32),
                                            (2, 2, 5, 130, 16, 16), (1, 4, 129, 129, 24, 24)])
@pytest.mark.parametrize("causal,use_mask", [(False, False), (True, False), (False, True)])
def test_attention_matches_torch(nat, B, H, Lq, Lk, D, Dv, causal, use_mask):
    rng = np.random.default_rng(B * 100 + Lq)
    q, k, v = rand(rng, B, H, Lq, D), rand(rng, B, H, Lk, D), rand(rng, B, H, Lk, Dv)
    mask = rand(rng, Lq, Lk, scale=3.0) if use_mask else None
    t = lambda a: torch.from_numpy(a).double()  # noqa: E731
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=None if mask is None else t(mask),
                                         is_causal=causal).numpy()
    got = nat.attention(q, k, v, 1.0 / math.sqrt(D), causal, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
