"""Every op's NumPy ``ref`` against torch (CPU) on random shapes and attributes.

Each case goes through the op's own rules the way the builder and interpreter use them:
``bind_attrs`` (defaults + canonical spelling), ``infer`` on the input types, ``ref`` on the arrays,
``cost`` on the types. ``run_op`` checks that ``infer`` gives exactly the shape and dtype of the
``ref`` output, then the test compares the values with torch. Inputs are f32 or f64; the output must
keep the input's float dtype.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nncompile.errors import InputError, ShapeError
from nncompile.ir.types import TensorType, dtype_of_array, numpy_dtype
from nncompile.ops import Cost, get_op
from nncompile.ops.random import hash32

FLOATS = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
FEW = settings(max_examples=25)
SOME = settings(max_examples=40)


def run_op(op: str, *arrays, **attrs) -> np.ndarray:
    """Bind, infer, run and cost one op; check that infer matches the ref output exactly."""
    opdef = get_op(op)
    bound = opdef.bind_attrs(attrs)
    types = [None if a is None else TensorType(a.shape, dtype_of_array(a)) for a in arrays]
    if opdef.variadic:
        in_types, in_arrays = [types], [list(arrays)]
    else:
        opdef.check_arity(len(arrays))
        in_types, in_arrays = opdef.split_inputs(types), opdef.split_inputs(list(arrays))
    out_type = opdef.infer(*in_types, **bound)
    out = np.asarray(opdef.ref(*in_arrays, **bound))
    assert out.shape == out_type.shape, f"{op}: ref gives {out.shape}, infer says {out_type}"
    assert out.dtype == numpy_dtype(out_type.dtype), f"{op}: ref gives {out.dtype}, infer says {out_type}"
    cost = opdef.cost(out_type, *in_types, **bound)
    assert isinstance(cost, Cost)
    assert min(cost.flops, cost.bytes_read, cost.bytes_written) >= 0
    assert cost.bytes_written == (out_type.nbytes if cost.bytes_written else 0)
    return out


def T(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, order="C"))   # (ascontiguousarray would make rank 0 into rank 1)


def close(actual: np.ndarray, expected, dtype) -> None:
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    if np.dtype(dtype) == np.float32:
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# elementwise -------------------------------------------------------------------------------------

POSITIVE = {"log", "sqrt", "rsqrt", "pow_scalar"}
UNARY_CASES = {   # case id -> (op, attrs, torch function)
    "relu": ("relu", {}, F.relu),
    "tanh": ("tanh", {}, torch.tanh),
    "sigmoid": ("sigmoid", {}, torch.sigmoid),
    "silu": ("silu", {}, F.silu),
    "exp": ("exp", {}, torch.exp),
    "log": ("log", {}, torch.log),
    "sqrt": ("sqrt", {}, torch.sqrt),
    "rsqrt": ("rsqrt", {}, torch.rsqrt),
    "neg": ("neg", {}, torch.neg),
    "abs": ("abs", {}, torch.abs),
    "erf": ("erf", {}, torch.erf),
    "gelu": ("gelu", {}, F.gelu),
    "gelu-tanh": ("gelu", {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
    "leaky_relu": ("leaky_relu", {}, F.leaky_relu),
    "leaky_relu-0.2": ("leaky_relu", {"negative_slope": 0.2}, lambda t: F.leaky_relu(t, 0.2)),
    "clamp": ("clamp", {"min": -0.5, "max": 0.75}, lambda t: torch.clamp(t, -0.5, 0.75)),
    "clamp-min": ("clamp", {"min": 0}, lambda t: torch.clamp(t, min=0.0)),
    "clamp-max": ("clamp", {"max": 1.5}, lambda t: torch.clamp(t, max=1.5)),
    "scale": ("scale", {"factor": -2.5}, lambda t: t * -2.5),
    "add_scalar": ("add_scalar", {"value": 3}, lambda t: t + 3.0),
    "pow_scalar": ("pow_scalar", {"exponent": 1.7}, lambda t: torch.pow(t, 1.7)),
    "pow_scalar-2": ("pow_scalar", {"exponent": 2}, lambda t: torch.pow(t, 2.0)),
    "identity": ("identity", {}, lambda t: t),
}


@pytest.mark.parametrize("case", sorted(UNARY_CASES))
@settings(max_examples=12)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5), dtype=FLOATS, seed=SEEDS)
def test_unary_matches_torch(case, shape, dtype, seed):
    op, attrs, torch_fn = UNARY_CASES[case]
    rng = np.random.default_rng(seed)
    x = randn(rng, shape, dtype) * 3
    if op in POSITIVE:
        x = np.abs(x) + dtype(0.05)
    out = run_op(op, x, **attrs)
    close(out, torch_fn(T(x)), dtype)


def test_erf_matches_math_erf():
    """An independent check of the erf that gelu uses (torch's erf is what the torch comparisons share)."""
    x = np.concatenate([np.linspace(-6, 6, 241), [0.0, 1e-300, -1e-8, 3.5, 27.0]])
    expected = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(run_op("erf", x), expected, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(run_op("erf", x.astype(np.float32)), expected, rtol=1e-6, atol=1e-7)


BINARY_CASES = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                "maximum": torch.maximum, "minimum": torch.minimum}


@pytest.mark.parametrize("op", sorted(BINARY_CASES))
@settings(max_examples=20)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       dtype=FLOATS, seed=SEEDS)
def test_binary_broadcasting_matches_torch(op, shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    a = randn(rng, shapes.input_shapes[0], dtype)
    b = randn(rng, shapes.input_shapes[1], dtype)
    if op == "div":
        b = np.where(np.abs(b) < 0.1, dtype(0.5), b).astype(dtype)
    out = run_op(op, a, b)
    assert out.shape == shapes.result_shape
    close(out, BINARY_CASES[op](T(a), T(b)), dtype)


@SOME
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=4),
       dtype=FLOATS, seed=SEEDS)
def test_where_matches_torch(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    cond = rng.random(shapes.input_shapes[0]) < 0.5
    a = randn(rng, shapes.input_shapes[1], dtype)
    b = randn(rng, shapes.input_shapes[2], dtype)
    out = run_op("where", cond, a, b)
    close(out, torch.where(T(cond), T(a), T(b)), dtype)


@pytest.mark.parametrize("target", ["f32", "f64", "i64", "i32", "bool"])
def test_cast_matches_torch(target):
    x = np.array([[-2.7, -0.5, 0.0], [0.4, 1.6, 3.2]], dtype=np.float64)
    out = run_op("cast", x, dtype=target)
    expected = T(x).to({"f32": torch.float32, "f64": torch.float64, "i64": torch.int64, "i32": torch.int32,
                        "bool": torch.bool}[target]).numpy()
    np.testing.assert_array_equal(out, expected)


def test_binary_and_float_ops_reject_bad_dtypes():
    f32 = TensorType((2, 3), "f32")
    with pytest.raises(ShapeError, match=r"add: operands have different dtypes"):
        get_op("add").infer(f32, TensorType((2, 3), "f64"))
    with pytest.raises(ShapeError, match=r"relu: expected a floating-point tensor, got i64\[2\]"):
        get_op("relu").infer(TensorType((2,), "i64"))
    with pytest.raises(ShapeError, match=r"mul: shapes \[2,3\] and \[4\] do not broadcast"):
        get_op("mul").infer(f32, TensorType((4,), "f32"))
    with pytest.raises(ShapeError, match="where: the condition must be bool"):
        get_op("where").infer(f32, f32, f32)


# matmul / linear ---------------------------------------------------------------------------------

@st.composite
def matmul_shapes(draw):
    m, k, n = (draw(st.integers(1, 5)) for _ in range(3))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    a = batch.input_shapes[0] + (m, k)
    b = batch.input_shapes[1] + (k, n)
    form = draw(st.sampled_from(["full", "vec_a", "vec_b", "both"]))
    if form in ("vec_a", "both"):
        a = (k,)
    if form in ("vec_b", "both"):
        b = (k,)
    return a, b


@SOME
@given(shapes=matmul_shapes(), dtype=FLOATS, seed=SEEDS)
def test_matmul_matches_torch(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = randn(rng, shapes[0], dtype), randn(rng, shapes[1], dtype)
    out = run_op("matmul", a, b)
    close(out, torch.matmul(T(a), T(b)), dtype)


@SOME
@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), fin=st.integers(1, 6), fout=st.integers(1, 6),
       bias=st.booleans(), dtype=FLOATS, seed=SEEDS)
def test_linear_matches_torch(lead, fin, fout, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, lead + (fin,), dtype), randn(rng, (fout, fin), dtype)
    b = randn(rng, (fout,), dtype) if bias else None
    out = run_op("linear", x, w, b) if bias else run_op("linear", x, w)
    close(out, F.linear(T(x), T(w), None if b is None else T(b)), dtype)


def test_gemm_costs_are_2mnk():
    matmul, linear = get_op("matmul"), get_op("linear")
    a, b = TensorType((3, 4, 5)), TensorType((5, 6))
    assert matmul.cost(matmul.infer(a, b), a, b) == Cost(2 * 3 * 4 * 6 * 5, a.nbytes + b.nbytes, 3 * 4 * 6 * 4)
    x, w, bias = TensorType((8, 16)), TensorType((32, 16)), TensorType((32,))
    out = linear.infer(x, w, bias)
    assert linear.cost(out, x, w, bias) == Cost(2 * 8 * 32 * 16 + 8 * 32, x.nbytes + w.nbytes + bias.nbytes, out.nbytes)


def test_matmul_errors_name_the_shapes():
    with pytest.raises(ShapeError, match=r"matmul: inner dimensions differ: a is \[3,4\] \(K=4\), b is \[5,6\]"):
        get_op("matmul").infer(TensorType((3, 4)), TensorType((5, 6)))
    with pytest.raises(ShapeError, match=r"linear: input features 7 do not match weight f32\[4,8\]"):
        get_op("linear").infer(TensorType((2, 7)), TensorType((4, 8)), None)


# conv / pool -------------------------------------------------------------------------------------

def spelled(draw, pair):
    """A pair attribute as the user may write it: an int when both halves agree, else a tuple or list."""
    if pair[0] == pair[1] and draw(st.booleans()):
        return pair[0]
    return draw(st.sampled_from([tuple(pair), list(pair)]))


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = []
    for i in range(2):
        span = dilation[i] * (kernel[i] - 1) + 1
        size.append(draw(st.integers(max(1, span - 2 * padding[i]), span - 2 * padding[i] + 7)))
    attrs = {"stride": spelled(draw, stride), "padding": spelled(draw, padding),
             "dilation": spelled(draw, dilation), "groups": groups}
    x_shape = (draw(st.integers(1, 2)), cg * groups, size[0], size[1])
    w_shape = (og * groups, cg) + kernel
    return x_shape, w_shape, draw(st.booleans()), attrs


@settings(max_examples=60)
@given(case=conv_cases(), dtype=FLOATS, seed=SEEDS)
def test_conv2d_matches_torch(case, dtype, seed):
    x_shape, w_shape, bias, attrs = case
    rng = np.random.default_rng(seed)
    x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
    b = randn(rng, (w_shape[0],), dtype) if bias else None
    out = run_op("conv2d", x, w, b, **attrs)
    canon = get_op("conv2d").bind_attrs(attrs)
    expected = F.conv2d(T(x), T(w), None if b is None else T(b), stride=canon["stride"], padding=canon["padding"],
                        dilation=canon["dilation"], groups=canon["groups"])
    close(out, expected, dtype)


def test_conv2d_cost_and_canonical_attrs():
    conv = get_op("conv2d")
    attrs = conv.bind_attrs({"stride": 2, "padding": [1, 1]})
    assert attrs == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    x, w = TensorType((8, 3, 32, 32)), TensorType((16, 3, 3, 3))
    out = conv.infer(x, w, None, **attrs)
    assert out == TensorType((8, 16, 16, 16))
    assert conv.cost(out, x, w, None, **attrs).flops == 2 * out.numel * 3 * 3 * 3


@st.composite
def pool_cases(draw, dilated: bool):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilated else (1, 1)
    size = []
    for i in range(2):
        span = dilation[i] * (kernel[i] - 1) + 1
        size.append(draw(st.integers(max(1, span - 2 * padding[i]), span - 2 * padding[i] + 7)))
    attrs = {"kernel": spelled(draw, kernel), "padding": spelled(draw, padding), "ceil_mode": draw(st.booleans())}
    if draw(st.booleans()) or stride != kernel:
        attrs["stride"] = spelled(draw, stride)
    else:
        stride = kernel
    if dilated:
        attrs["dilation"] = spelled(draw, dilation)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), size[0], size[1])
    return shape, attrs, (kernel, stride, padding, dilation)


@settings(max_examples=60)
@given(case=pool_cases(dilated=True), dtype=FLOATS, seed=SEEDS)
def test_max_pool2d_matches_torch(case, dtype, seed):
    shape, attrs, (kernel, stride, padding, dilation) = case
    x = randn(np.random.default_rng(seed), shape, dtype)
    out = run_op("max_pool2d", x, **attrs)
    close(out, F.max_pool2d(T(x), kernel, stride, padding, dilation, ceil_mode=attrs["ceil_mode"]), dtype)


@settings(max_examples=60)
@given(case=pool_cases(dilated=False), include_pad=st.booleans(), dtype=FLOATS, seed=SEEDS)
def test_avg_pool2d_matches_torch(case, include_pad, dtype, seed):
    shape, attrs, (kernel, stride, padding, _) = case
    x = randn(np.random.default_rng(seed), shape, dtype)
    out = run_op("avg_pool2d", x, count_include_pad=include_pad, **attrs)
    close(out, F.avg_pool2d(T(x), kernel, stride, padding, ceil_mode=attrs["ceil_mode"],
                            count_include_pad=include_pad), dtype)


@FEW
@given(shape=hnp.array_shapes(min_dims=4, max_dims=4, max_side=6), dtype=FLOATS, seed=SEEDS)
def test_global_avg_pool2d_matches_torch(shape, dtype, seed):
    x = randn(np.random.default_rng(seed), shape, dtype)
    close(run_op("global_avg_pool2d", x), F.adaptive_avg_pool2d(T(x), 1), dtype)


def test_pool_and_conv_errors():
    with pytest.raises(ShapeError, match=r"max_pool2d: padding \(2, 2\) must be at most half the kernel \(3, 3\)"):
        get_op("max_pool2d").bind_attrs({"kernel": 3, "padding": 2})
    with pytest.raises(ShapeError, match=r"conv2d: stride must be >= 1, got \(0, 0\)"):
        get_op("conv2d").bind_attrs({"stride": 0})
    with pytest.raises(ShapeError, match=r"conv2d: weight f32\[4,2,3,3\] expects 2 input channels, input has 3"):
        get_op("conv2d").infer(TensorType((1, 3, 8, 8)), TensorType((4, 2, 3, 3)), None,
                               **get_op("conv2d").bind_attrs({}))
    with pytest.raises(ShapeError, match=r"conv2d: kernel 5x5 .* does not fit input 3x3"):
        get_op("conv2d").infer(TensorType((1, 1, 3, 3)), TensorType((1, 1, 5, 5)), None,
                               **get_op("conv2d").bind_attrs({}))


# norm / softmax ----------------------------------------------------------------------------------

@SOME
@given(shape=hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=4), training=st.booleans(),
       affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.1]), dtype=FLOATS, seed=SEEDS)
def test_batch_norm_matches_torch(shape, training, affine, eps, dtype, seed):
    if training and math.prod(shape) == shape[1]:
        shape = (2,) + shape[1:]     # torch refuses batch statistics over a single value per channel
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = randn(rng, shape, dtype)
    mean, var = randn(rng, (c,), dtype), (rng.random(c) + 0.5).astype(dtype)
    weight, bias = (randn(rng, (c,), dtype), randn(rng, (c,), dtype)) if affine else (None, None)
    out = run_op("batch_norm", x, mean, var, weight, bias, eps=eps, training=training)
    expected = F.batch_norm(T(x), T(mean.copy()), T(var.copy()), None if weight is None else T(weight),
                            None if bias is None else T(bias), training=training, eps=eps)
    close(out, expected, dtype)


@SOME
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), data=st.data(),
       affine=st.booleans(), dtype=FLOATS, seed=SEEDS)
def test_layer_norm_matches_torch(shape, data, affine, dtype, seed):
    ndim = data.draw(st.integers(1, len(shape)))
    inner = shape[len(shape) - ndim:]
    rng = np.random.default_rng(seed)
    x = randn(rng, shape, dtype)
    weight, bias = (randn(rng, inner, dtype), randn(rng, inner, dtype)) if affine else (None, None)
    out = run_op("layer_norm", x, weight, bias, normalized_ndim=ndim)
    expected = F.layer_norm(T(x), inner, None if weight is None else T(weight), None if bias is None else T(bias),
                            eps=1e-5)
    close(out, expected, dtype)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@SOME
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), data=st.data(), dtype=FLOATS,
       seed=SEEDS)
def test_softmax_matches_torch(op, shape, data, dtype, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = randn(np.random.default_rng(seed), shape, dtype) * 30     # large values: needs the stable form
    out = run_op(op, x, axis=axis)
    torch_fn = torch.softmax if op == "softmax" else torch.log_softmax
    close(out, torch_fn(T(x), dim=axis), dtype)


def test_norm_errors():
    with pytest.raises(ShapeError, match=r"batch_norm: running_var must be \[3\], got f32\[4\]"):
        get_op("batch_norm").infer(TensorType((2, 3, 4)), TensorType((3,)), TensorType((4,)), None, None,
                                   eps=1e-5, training=False)
    with pytest.raises(ShapeError, match=r"layer_norm: weight must be \[4,5\], got f32\[5\]"):
        get_op("layer_norm").infer(TensorType((3, 4, 5)), TensorType((5,)), None, normalized_ndim=2, eps=1e-5)
    with pytest.raises(ShapeError, match="softmax: axis 2 is out of range for a rank-2 tensor"):
        get_op("softmax").infer(TensorType((3, 4)), axis=2)


# shape ops ---------------------------------------------------------------------------------------

@SOME
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=4), data=st.data(), dtype=FLOATS, seed=SEEDS)
def test_reshape_and_flatten_match_torch(shape, data, dtype, seed):
    x = randn(np.random.default_rng(seed), shape, dtype)
    target = list(data.draw(st.permutations(list(shape))))
    if target and data.draw(st.booleans()) and math.prod(shape) > 0:
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    close(run_op("reshape", x, shape=target), T(x).reshape(target), dtype)
    if shape:
        start = data.draw(st.integers(-len(shape), len(shape) - 1))
        end = data.draw(st.integers(start % len(shape), len(shape) - 1))
        close(run_op("flatten", x, start=start, end=end), torch.flatten(T(x), start, end), dtype)


@SOME
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data(), dtype=FLOATS, seed=SEEDS)
def test_transpose_and_permute_match_torch(shape, data, dtype, seed):
    x = randn(np.random.default_rng(seed), shape, dtype)
    rank = len(shape)
    dim0, dim1 = (data.draw(st.integers(-rank, rank - 1)) for _ in range(2))
    close(run_op("transpose", x, dim0=dim0, dim1=dim1), torch.transpose(T(x), dim0, dim1), dtype)
    dims = data.draw(st.permutations(list(range(rank))))
    dims = [d - rank if data.draw(st.booleans()) else d for d in dims]
    close(run_op("permute", x, dims=dims), T(x).permute(dims), dtype)


@SOME
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data(), dtype=FLOATS, seed=SEEDS)
def test_concat_matches_torch(shape, data, dtype, seed):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for _ in range(data.draw(st.integers(1, 4))):
        piece = list(shape)
        piece[axis] = data.draw(st.integers(0, 3))
        parts.append(randn(rng, tuple(piece), dtype))
    close(run_op("concat", *parts, axis=axis), torch.cat([T(p) for p in parts], dim=axis), dtype)


@SOME
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), data=st.data(), dtype=FLOATS, seed=SEEDS)
def test_slice_matches_torch(shape, data, dtype, seed):
    x = randn(np.random.default_rng(seed), shape, dtype)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[axis]
    start = data.draw(st.integers(-size - 2, size + 2))
    end = data.draw(st.none() | st.integers(-size - 2, size + 2))
    step = data.draw(st.integers(1, 3))
    index = [slice(None)] * len(shape)
    index[axis] = slice(start, end, step)
    close(run_op("slice", x, axis=axis, start=start, end=end, step=step), T(x)[tuple(index)], dtype)


@SOME
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=3), data=st.data(), dtype=FLOATS, seed=SEEDS)
def test_expand_squeeze_unsqueeze_match_torch(shape, data, dtype, seed):
    x = randn(np.random.default_rng(seed), shape, dtype)
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    target = list(lead) + [data.draw(st.sampled_from([-1, d] + ([1, 2, 3] if d == 1 else []))) for d in shape]
    close(run_op("expand", x, shape=target), T(x).expand(target), dtype)
    ones = [i for i, d in enumerate(shape) if d == 1]
    if ones:
        axes = data.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
        close(run_op("squeeze", x, axes=axes), torch.squeeze(T(x), dim=tuple(axes)), dtype)
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    close(run_op("unsqueeze", x, axis=axis), torch.unsqueeze(T(x), axis), dtype)


def test_shape_op_errors():
    x = TensorType((2, 3, 4))
    with pytest.raises(ShapeError, match=r"reshape: cannot reshape 24 elements into \[5, -1\]|cannot infer -1"):
        get_op("reshape").infer(x, shape=(5, -1))
    with pytest.raises(ShapeError, match=r"reshape: shape \[-1, -1\] may hold one -1"):
        get_op("reshape").infer(x, shape=(-1, -1))
    with pytest.raises(ShapeError, match=r"permute: dims \[0, 0, 1\] are not a permutation of 3 axes"):
        get_op("permute").infer(x, dims=(0, 0, 1))
    with pytest.raises(ShapeError, match=r"concat: f32\[2,5,4\] does not match f32\[2,3,4\] outside axis 0"):
        get_op("concat").infer([x, TensorType((2, 5, 4))], axis=0)
    with pytest.raises(ShapeError, match=r"squeeze: axis 1 of f32\[2,3,4\] has size 3, not 1"):
        get_op("squeeze").infer(x, axes=(1,))
    with pytest.raises(ShapeError, match=r"expand: cannot expand f32\[2,3,4\] to \[2, 5, 4\]"):
        get_op("expand").infer(x, shape=(2, 5, 4))
    with pytest.raises(ShapeError, match=r"slice: step must be >= 1, got 0"):
        get_op("slice").bind_attrs({"axis": 0, "step": 0})


# embedding / dropout -----------------------------------------------------------------------------

@FEW
@given(ids_shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), vocab=st.integers(1, 9),
       dim=st.integers(1, 5), int_dtype=st.sampled_from([np.int64, np.int32]), dtype=FLOATS, seed=SEEDS)
def test_embedding_matches_torch(ids_shape, vocab, dim, int_dtype, dtype, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, ids_shape).astype(int_dtype)
    weight = randn(rng, (vocab, dim), dtype)
    close(run_op("embedding", ids, weight), F.embedding(T(ids.astype(np.int64)), T(weight)), dtype)


def test_embedding_rejects_out_of_range_ids_and_float_ids():
    weight = np.ones((4, 2), np.float32)
    with pytest.raises(InputError, match="embedding: id 4 is out of range for a vocabulary of 4"):
        get_op("embedding").ref(np.array([0, 4]), weight)
    with pytest.raises(InputError, match="embedding: id -1 is out of range"):
        get_op("embedding").ref(np.array([-1]), weight)
    with pytest.raises(ShapeError, match=r"embedding: ids must be integers, got f32\[3\]"):
        get_op("embedding").infer(TensorType((3,)), TensorType((4, 2)))


def spec_hash32(seed: int, i: int) -> int:
    """The dropout hash exactly as written in the op catalog, on Python integers."""
    mod = 2**32
    h = (i * 0x9E3779B1 + seed * 0x85EBCA77 + 0x165667B1) % mod
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % mod
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % mod
    h ^= h >> 16
    return h


@settings(max_examples=30)
@given(seed=SEEDS, indices=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_dropout_hash_is_the_catalog_formula(seed, indices):
    got = hash32(seed, np.array(indices, dtype=np.uint64))
    assert [int(v) for v in got] == [spec_hash32(seed, i) for i in indices]


@FEW
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8), p=st.floats(0.0, 0.95),
       seed=SEEDS, dtype=FLOATS)
def test_dropout_mask_and_scaling_follow_the_spec(shape, p, seed, dtype):
    rng = np.random.default_rng(seed)
    x = (np.abs(randn(rng, shape, dtype)) + 1).astype(dtype)     # nonzero, so zeros in out = dropped
    out = run_op("dropout", x, p=p, seed=seed)
    p_exact = Fraction(p)
    for i, (xi, yi) in enumerate(zip(x.ravel(), out.ravel())):
        keep = Fraction(spec_hash32(seed, i), 2**32) >= p_exact
        if keep:
            assert yi == dtype(xi * dtype(1.0 / (1.0 - p))), (i, xi, yi)
        else:
            assert yi == 0, (i, xi, yi)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_is_one_minus_p(p):
    n = 200_000
    out = run_op("dropout", np.ones(n, np.float32), p=p, seed=1234)
    kept = np.count_nonzero(out) / n
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(out.mean() - 1.0) < 0.02     # 1/(1-p) scaling keeps the expectation


def test_dropout_identity_cases_and_seeds():
    x = np.arange(1, 13, dtype=np.float64).reshape(3, 4)
    np.testing.assert_array_equal(run_op("dropout", x, p=0.0, seed=3), x)
    np.testing.assert_array_equal(run_op("dropout", x, p=0.7, training=False), x)
    a = run_op("dropout", np.ones(1000), p=0.5, seed=1)
    b = run_op("dropout", np.ones(1000), p=0.5, seed=2)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, run_op("dropout", np.ones(1000), p=0.5, seed=1))
    with pytest.raises(ShapeError, match=r"dropout: p must be in \[0, 1\), got 1.0"):
        get_op("dropout").bind_attrs({"p": 1})


# reductions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@SOME
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4), data=st.data(),
       keepdim=st.booleans(), dtype=FLOATS, seed=SEEDS)
def test_reductions_match_torch(op, shape, data, keepdim, dtype, seed):
    rank = len(shape)
    x = randn(np.random.default_rng(seed), shape, dtype)
    if rank and data.draw(st.booleans()):
        picked = data.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
        axes = [a - rank if data.draw(st.booleans()) else a for a in picked]
        dims = tuple(a % rank for a in axes)
    else:
        axes, dims = None, tuple(range(rank))
    out = run_op(op, x, axes=axes, keepdim=keepdim)
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[op]
    close(out, fn(T(x), dim=dims, keepdim=keepdim) if dims else T(x), dtype)


def test_reduction_axes_are_canonical():
    op = get_op("sum")
    assert op.bind_attrs({"axes": 2})["axes"] == (2,)
    assert op.bind_attrs({"axes": [3, 0, 1]})["axes"] == (0, 1, 3)
    assert op.bind_attrs({})["axes"] is None
    with pytest.raises(ShapeError, match="sum: repeated axis"):
        op.infer(TensorType((2, 3)), axes=(1, -1), keepdim=False)
    with pytest.raises(ShapeError, match="mean: expected a floating-point tensor"):
        get_op("mean").infer(TensorType((2,), "i64"), axes=None, keepdim=False)


# losses ------------------------------------------------------------------------------------------

@FEW
@given(n=st.integers(1, 6), c=st.integers(1, 6), reduction=st.sampled_from(["mean", "sum"]), dtype=FLOATS,
       seed=SEEDS)
def test_cross_entropy_matches_torch(n, c, reduction, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, (n, c), dtype) * 10
    labels = rng.integers(0, c, n).astype(np.int64)
    out = run_op("cross_entropy", logits, labels, reduction=reduction)
    close(out, F.cross_entropy(T(logits), T(labels), reduction=reduction), dtype)


@FEW
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
       reduction=st.sampled_from(["mean", "sum"]), dtype=FLOATS, seed=SEEDS)
def test_mse_loss_matches_torch(shape, reduction, dtype, seed):
    rng = np.random.default_rng(seed)
    pred, target = randn(rng, shape, dtype), randn(rng, shape, dtype)
    out = run_op("mse_loss", pred, target, reduction=reduction)
    close(out, F.mse_loss(T(pred), T(target), reduction=reduction), dtype)


def test_loss_errors():
    with pytest.raises(ShapeError, match=r"cross_entropy: labels must be integer \[4\], got f32\[4\]"):
        get_op("cross_entropy").infer(TensorType((4, 3)), TensorType((4,)), reduction="mean")
    with pytest.raises(ShapeError, match="cross_entropy: reduction must be 'mean' or 'sum', got 'none'"):
        get_op("cross_entropy").bind_attrs({"reduction": "none"})
    with pytest.raises(InputError, match="cross_entropy: a label is out of range for 3 classes"):
        get_op("cross_entropy").ref(np.zeros((2, 3)), np.array([0, 3]), reduction="mean")


# attention ---------------------------------------------------------------------------------------

@SOME
@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=2, max_side=3),
       length=st.integers(1, 6), keys=st.integers(1, 6), d=st.integers(1, 5), dv=st.integers(1, 5),
       causal=st.booleans(), scale=st.none() | st.floats(0.05, 2.0), dtype=FLOATS, seed=SEEDS)
def test_sdpa_matches_torch(batch, length, keys, d, dv, causal, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    q = randn(rng, batch.input_shapes[0] + (length, d), dtype)
    k = randn(rng, batch.input_shapes[1] + (keys, d), dtype)
    v = randn(rng, batch.input_shapes[2] + (keys, dv), dtype)
    out = run_op("sdpa", q, k, v, causal=causal, scale=scale)
    full = batch.result_shape
    expected = F.scaled_dot_product_attention(T(q).expand(*full, length, d), T(k).expand(*full, keys, d),
                                              T(v).expand(*full, keys, dv), is_causal=causal, scale=scale)
    close(out, expected, dtype)


def test_sdpa_errors():
    with pytest.raises(ShapeError, match=r"sdpa: k and v sequence lengths differ \(f32\[5,4\] vs f32\[6,4\]\)"):
        get_op("sdpa").infer(TensorType((3, 4)), TensorType((5, 4)), TensorType((6, 4)), causal=False, scale=None)
    with pytest.raises(ShapeError, match="sdpa: q, k, v have different dtypes"):
        get_op("sdpa").infer(TensorType((3, 4)), TensorType((5, 4), "f64"), TensorType((5, 4)), causal=False,
                             scale=None)
