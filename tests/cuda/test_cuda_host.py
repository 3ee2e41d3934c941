"""The CUDA target's index math and arithmetic, run on the CPU (no GPU needed; nvcc needed).

``host_check.cu`` drives the ``__host__ __device__`` pieces of ``native/cuda``: the tiled fp32 GEMM
(the kernel's load / multiply / store phases, run thread after thread for every block, both tile
shapes), the loaders and stores of the three implicit-GEMM convolutions and of the strided SGEMM
(with its bias / activation / residual / alpha / beta epilogue), the dropout hash and the sgd / adam
updates. References: the op table's NumPy semantics and torch.optim on the CPU. Not covered: the
TF32 (WMMA) kernel, races and synchronization (test_cuda_ops.py, GPU).
"""
from __future__ import annotations

import ctypes
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nncompile.codegen.build_cuda import CUDA_NATIVE_DIR, find_nvcc
from nncompile.ops.base import get_op

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")

F32P = ctypes.POINTER(ctypes.c_float)
ACT = {"relu": 1, "tanh": 2, "sigmoid": 3, "silu": 4, "gelu": 5, "gelu_tanh": 6}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_check") / "host_check.so"
    result = subprocess.run([find_nvcc(), "-O2", "-std=c++17", "-arch=sm_80", "-shared", "-Xcompiler",
                             "-fPIC,-fvisibility=hidden", f"-I{CUDA_NATIVE_DIR}", str(Path(__file__).with_name("host_check.cu")),
                             "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(out))


def ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(F32P)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _ref(op, *arrays, **attrs):
    opdef = get_op(op)
    return np.asarray(opdef.ref(*arrays, **opdef.bind_attrs(attrs)), dtype=np.float32)


def _geom(x_shape, w_shape, out_hw, attrs) -> np.ndarray:
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    groups = attrs.get("groups", 1)
    (sh, sw), (ph, pw), (dh, dw) = (attrs.get(k, (1, 1) if k != "padding" else (0, 0)) for k in ("stride", "padding", "dilation"))
    return np.array([n, c, h, w, o, cg, o // groups, kh, kw, *out_hw, sh, sw, ph, pw, dh, dw, groups], dtype=np.int32)


GEOMETRIES = [
    ((2, 3, 9, 8), (4, 3, 3, 3), {}),
    ((1, 4, 10, 11), (6, 2, 3, 3), {"groups": 2, "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ((3, 6, 7, 7), (6, 1, 5, 5), {"groups": 6, "stride": (2, 2), "padding": (2, 2)}),
    ((2, 5, 6, 7), (5, 5, 1, 1), {}),
    ((1, 2, 12, 5), (3, 2, 2, 3), {"stride": (3, 2), "padding": (1, 1), "dilation": (2, 1)}),
]


@pytest.mark.parametrize("x_shape, w_shape, attrs", GEOMETRIES)
def test_conv_forward_loaders(lib, x_shape, w_shape, attrs):
    rng = np.random.default_rng(0)
    x, w, bias = f32(rng, *x_shape), f32(rng, *w_shape), f32(rng, w_shape[0])
    expected = _ref("conv2d", x, w, bias, **attrs)
    residual = f32(rng, *expected.shape)
    g = _geom(x_shape, w_shape, expected.shape[2:], attrs)
    y = np.full(expected.shape, np.nan, np.float32)
    lib.check_conv_forward(ptr(x), ptr(w), ptr(bias), ptr(residual), ptr(y), g.ctypes.data_as(ctypes.POINTER(ctypes.c_int)),
                           ACT["relu"])
    np.testing.assert_allclose(y, np.maximum(expected, 0) + residual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, attrs", GEOMETRIES)
def test_conv_grad_loaders(lib, x_shape, w_shape, attrs):
    rng = np.random.default_rng(1)
    x, w = f32(rng, *x_shape), f32(rng, *w_shape)
    out_shape = _ref("conv2d", x, w, None, **attrs).shape
    dy = f32(rng, *out_shape)
    g = _geom(x_shape, w_shape, out_shape[2:], attrs).ctypes.data_as(ctypes.POINTER(ctypes.c_int))
    dx = np.full(x_shape, np.nan, np.float32)
    lib.check_conv_grad_input(ptr(dy), ptr(w), ptr(dx), g)
    np.testing.assert_allclose(dx, _ref("conv2d_grad_input", dy, w, input_shape=x_shape, **attrs), rtol=1e-5, atol=1e-5)
    dw = np.full(w_shape, np.nan, np.float32)
    lib.check_conv_grad_weight(ptr(x), ptr(dy), ptr(dw), g)
    np.testing.assert_allclose(dw, _ref("conv2d_grad_weight", x, dy, weight_shape=w_shape, **attrs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("batches, m, n, k", [(2, 7, 9, 5), (1, 70, 130, 37), (1, 1030, 1025, 9)])
def test_strided_sgemm_and_epilogue(lib, ta, tb, batches, m, n, k):
    """64x64 tiles (one partial, several), and 128x128 tiles (>= 64 of them) with ragged edges."""
    rng = np.random.default_rng(2)
    a = f32(rng, batches, *((k, m) if ta else (m, k)))
    b = f32(rng, batches, *((n, k) if tb else (k, n)))
    c = f32(rng, batches, m, n)
    bias, residual = f32(rng, n), f32(rng, batches, m, n)
    out = c.copy()
    L = ctypes.c_longlong
    lib.check_sgemm(ta, tb, m, n, k, ptr(a), L(m if ta else k), ptr(b), L(k if tb else n), ptr(out), L(n), batches,
                    L(a[0].size), L(b[0].size), L(m * n), ptr(bias), ptr(residual), ACT["tanh"],
                    ctypes.c_float(0.5), ctypes.c_float(2.0))
    op_a = a.transpose(0, 2, 1) if ta else a
    op_b = b.transpose(0, 2, 1) if tb else b
    expected = np.tanh(0.5 * (op_a @ op_b) + 2.0 * c + bias) + residual
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", sorted(ACT))
def test_epilogue_activations(lib, act):
    rng = np.random.default_rng(3)
    a = f32(rng, 16, 1) * 3
    one = np.ones((1, 1), np.float32)
    out = np.zeros((16, 1), np.float32)
    L = ctypes.c_longlong
    lib.check_sgemm(0, 0, 16, 1, 1, ptr(a), L(1), ptr(one), L(1), ptr(out), L(1), 1, L(0), L(0), L(0), None, None,
                    ACT[act], ctypes.c_float(1.0), ctypes.c_float(0.0))
    if act == "gelu_tanh":
        expected = _ref("gelu", a, approximate="tanh")
    else:
        expected = _ref(act, a)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)


def test_dropout_hash_matches_the_interpreter(lib):
    """The device hash, with the emitters' threshold and training-step offset, keeps what the ref keeps."""
    lib.check_dropout_hash.restype = ctypes.c_uint
    x = np.ones(4096, np.float32)
    for p, seed, offset in ((0.3, 7, None), (0.5, 123456789, None), (0.9, 0, None), (0.5, 11, 3)):
        kept = _ref("dropout", x, None if offset is None else np.array(offset, np.int64), p=p, seed=seed, training=True) != 0
        threshold = min(int(math.ceil(p * 2**32)), 2**32 - 1)     # as the C++ and CUDA emitters
        mixed = seed if offset is None else (seed + offset * 0x9E3779B1) % 2**32
        ours = np.array([lib.check_dropout_hash(mixed, i) >= threshold for i in range(x.size)])
        np.testing.assert_array_equal(ours, kept)
        assert 0 < ours.sum() < x.size


@pytest.mark.parametrize("name, hyper", [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.1}),
    ("adam", {"lr": 1e-3, "weight_decay": 0.01}),
    ("adamw", {"lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.99)}),
])
def test_optimizer_updates_match_torch(lib, name, hyper):
    import torch

    from nncompile.trainer import optimizer_hyper

    h = optimizer_hyper(name, hyper)
    rng = np.random.default_rng(4)
    p = f32(rng, 257)
    ref = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]([ref], **hyper)
    buf, m, v = (np.zeros_like(p) for _ in range(3))
    L, Fl = ctypes.c_longlong, ctypes.c_float
    for step in range(1, 5):
        g = f32(rng, 257)
        ref.grad = torch.from_numpy(g.copy())
        opt.step()
        if name == "sgd":
            lib.check_sgd(ptr(p), ptr(g), ptr(buf), L(p.size), Fl(h["lr"]), Fl(h["momentum"]), Fl(h["dampening"]),
                          Fl(h["weight_decay"]), int(h["nesterov"]), int(step == 1))
        else:
            lib.check_adam(ptr(p), ptr(g), ptr(m), ptr(v), L(p.size), Fl(h["lr"]), Fl(h["betas"][0]), Fl(h["betas"][1]),
                           Fl(h["eps"]), Fl(h["weight_decay"]), int(name == "adamw"), L(step))
        np.testing.assert_allclose(p, ref.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
