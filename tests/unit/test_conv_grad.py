"""The backward ops of conv2d / max_pool2d / avg_pool2d against torch.autograd (float64).

Each case runs the op through its own rules (``bind_attrs``, ``infer``, ``ref``, ``cost``) and
compares the result with the gradient torch computes for the forward op on the same shapes and
attributes (stride, padding, dilation, groups, ceil_mode, count_include_pad). Max pooling is also
checked against a brute-force loop on inputs full of ties, and the vjp rules of the backward ops
(second derivatives) against torch's double backward.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nncompile.ops  # noqa: F401
import nncompile.ops.conv_grad  # noqa: F401  (until nncompile.ops imports it)
from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType, dtype_of_array, numpy_dtype
from nncompile.ops import Cost, get_op
from nncompile.ops.conv_grad import max_pool_argmax

SEEDS = st.integers(0, 2**32 - 1)


def run_op(op: str, *arrays, **attrs) -> np.ndarray:
    """Bind, infer, run and cost one op; infer must match the ref output exactly."""
    opdef = get_op(op)
    bound = opdef.bind_attrs(attrs)
    assert opdef.bind_attrs(dict(bound)) == bound
    types = [TensorType(a.shape, dtype_of_array(a)) for a in arrays]
    out_type = opdef.infer(*types, **bound)
    out = np.asarray(opdef.ref(*arrays, **bound))
    assert out.shape == out_type.shape and out.dtype == numpy_dtype(out_type.dtype), f"{op}: {out.shape} vs {out_type}"
    cost = opdef.cost(out_type, *types, **bound)
    assert isinstance(cost, Cost) and cost.flops > 0 and cost.bytes_written == out_type.nbytes
    return out


def T(array, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(array), dtype=torch.float64, requires_grad=grad)


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
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    x_shape = (draw(st.integers(1, 3)), cg * groups, size[0], size[1])
    return x_shape, (og * groups, cg) + kernel, attrs


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), seed=SEEDS)
def test_conv2d_grads_match_torch_autograd(case, seed):
    x_shape, w_shape, attrs = case
    rng = np.random.default_rng(seed)
    x, w = T(rng.standard_normal(x_shape), True), T(rng.standard_normal(w_shape), True)
    y = F.conv2d(x, w, None, **attrs)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed % 2**31))
    y.backward(gy)
    gx = run_op("conv2d_grad_input", gy.numpy(), w.detach().numpy(), input_shape=x_shape, **attrs)
    gw = run_op("conv2d_grad_weight", x.detach().numpy(), gy.numpy(), weight_shape=w_shape, **attrs)
    np.testing.assert_allclose(gx, x.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, w.grad.numpy(), rtol=1e-10, atol=1e-10)


@st.composite
def pool_cases(draw, dilated: bool):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dilated else (1, 1)
    size = []
    for i in range(2):
        span = dilation[i] * (kernel[i] - 1) + 1
        size.append(draw(st.integers(max(1, span - 2 * padding[i]), span - 2 * padding[i] + 7)))
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": draw(st.booleans())}
    if dilated:
        attrs["dilation"] = dilation
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), size[0], size[1])
    return shape, attrs


def pool_input(rng, shape, ties: bool) -> np.ndarray:
    """Normal values, or a few small integers so that most windows hold a tie for the maximum."""
    return rng.integers(-2, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape)


def brute_max_pool_grad(x, gy, kernel, stride, padding, dilation):
    """torch's CPU loop: the first valid element starts the window; a larger value or a NaN replaces it."""
    out = np.zeros_like(x)
    n, c, h, w = x.shape
    for b in range(n):
        for ch in range(c):
            for oy in range(gy.shape[2]):
                for ox in range(gy.shape[3]):
                    best, where = None, None
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            iy = oy * stride[0] - padding[0] + i * dilation[0]
                            ix = ox * stride[1] - padding[1] + j * dilation[1]
                            if 0 <= iy < h and 0 <= ix < w:
                                v = x[b, ch, iy, ix]
                                if where is None or v > best or np.isnan(v):
                                    best, where = v, (iy, ix)
                    if where is not None:
                        out[b, ch, where[0], where[1]] += gy[b, ch, oy, ox]
    return out


@settings(max_examples=60, deadline=None)
@given(case=pool_cases(dilated=True), ties=st.booleans(), seed=SEEDS)
def test_max_pool2d_grad_matches_torch_and_brute_force(case, ties, seed):
    shape, attrs = case
    rng = np.random.default_rng(seed)
    x = pool_input(rng, shape, ties)
    bound = get_op("max_pool2d").bind_attrs(attrs)
    oh, ow = get_op("max_pool2d").infer(TensorType(shape, "f64"), **bound).shape[2:]
    gy = rng.standard_normal(shape[:2] + (oh, ow))
    got = run_op("max_pool2d_grad", x, gy, **attrs)
    expected = brute_max_pool_grad(x, gy, bound["kernel"], bound["stride"], bound["padding"], bound["dilation"])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if (max_pool_argmax(x, **bound) >= 0).all():   # torch's kernel misbehaves on windows of padding only
        xt = T(x, True)
        y = F.max_pool2d(xt, bound["kernel"], bound["stride"], bound["padding"], bound["dilation"],
                         ceil_mode=bound["ceil_mode"])
        y.backward(T(gy))
        np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_max_pool2d_grad_ties_nans_and_empty_windows():
    x = np.array([[[[1.0, 5.0, 5.0, 2.0, np.nan, 0.0, np.nan, 3.0]]]])
    gy = np.array([[[[10.0, 20.0]]]])
    got = run_op("max_pool2d_grad", x, gy, kernel=(1, 4))
    np.testing.assert_array_equal(got, [[[[0, 10, 0, 0, 0, 0, 20, 0]]]])      # first maximum; the last NaN
    xt = T(x, True)
    F.max_pool2d(xt, (1, 4)).backward(T(gy))
    np.testing.assert_array_equal(got, xt.grad.numpy())
    # every valid element -inf: the first valid one takes the gradient, not a padded position
    x = np.full((1, 1, 2, 2), -np.inf)
    got = run_op("max_pool2d_grad", x, np.ones((1, 1, 3, 3)), kernel=2, stride=1, padding=1)
    np.testing.assert_array_equal(got, [[[[4, 2], [2, 1]]]])
    # height 1, kernel 2 with dilation 2 and padding 1: the window reads rows -1 and 1, neither exists
    x = np.ones((1, 1, 1, 3))
    got = run_op("max_pool2d_grad", x, np.ones((1, 1, 1, 3)), kernel=(2, 1), stride=1, padding=(1, 0), dilation=(2, 1))
    np.testing.assert_array_equal(got, np.zeros((1, 1, 1, 3)))


@settings(max_examples=60, deadline=None)
@given(case=pool_cases(dilated=False), include_pad=st.booleans(), seed=SEEDS)
def test_avg_pool2d_grad_matches_torch_autograd(case, include_pad, seed):
    shape, attrs = case
    rng = np.random.default_rng(seed)
    xt = T(rng.standard_normal(shape), True)
    y = F.avg_pool2d(xt, attrs["kernel"], attrs["stride"], attrs["padding"], ceil_mode=attrs["ceil_mode"],
                     count_include_pad=include_pad)
    gy = rng.standard_normal(tuple(y.shape))
    y.backward(T(gy))
    got = run_op("avg_pool2d_grad", gy, input_shape=shape, count_include_pad=include_pad, **attrs)
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_stride_defaults_to_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    assert run_op("max_pool2d_grad", x, gy, kernel=2).dtype == np.float32
    assert get_op("max_pool2d_grad").bind_attrs({"kernel": 2})["stride"] == (2, 2)
    got = run_op("avg_pool2d_grad", gy, input_shape=[2, 3, 6, 6], kernel=2)
    np.testing.assert_allclose(got, np.repeat(np.repeat(gy, 2, axis=2), 2, axis=3) / 4, rtol=1e-6)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    assert run_op("conv2d_grad_input", gy, w, input_shape=(2, 3, 6, 6)).dtype == np.float32
    assert run_op("conv2d_grad_weight", x, gy, weight_shape=(4, 3, 3, 3)).dtype == np.float32


def test_canonical_attrs_and_cost():
    a = get_op("conv2d_grad_input").bind_attrs({"input_shape": [8, 3, 32, 32], "stride": 2, "padding": [1, 1]})
    assert a == {"input_shape": (8, 3, 32, 32), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    gy, w = TensorType((8, 16, 16, 16)), TensorType((16, 3, 3, 3))
    out = get_op("conv2d_grad_input").infer(gy, w, **a)
    assert out == TensorType((8, 3, 32, 32))
    assert get_op("conv2d_grad_input").cost(out, gy, w, **a).flops == 2 * gy.numel * 3 * 3 * 3
    b = get_op("conv2d_grad_weight").bind_attrs({"weight_shape": (16, 3, 3, 3), "stride": 2, "padding": 1})
    gw = get_op("conv2d_grad_weight").infer(out, gy, **b)
    assert gw == w
    assert get_op("conv2d_grad_weight").cost(gw, out, gy, **b) == Cost(2 * gy.numel * 27, out.nbytes + gy.nbytes,
                                                                       w.nbytes)


BAD = [
    ("conv2d_grad_input", {"input_shape": (2, 3, 8)}, r"conv2d_grad_input: input_shape must be 4 positive ints"),
    ("conv2d_grad_weight", {"weight_shape": (4, 3, 0, 3)}, r"conv2d_grad_weight: weight_shape must be 4 positive ints"),
    ("conv2d_grad_weight", {"weight_shape": (4, 3, 3, 3), "groups": 0}, r"conv2d_grad_weight: groups must be >= 1"),
    ("max_pool2d_grad", {"kernel": 3, "padding": 2}, r"max_pool2d_grad: padding \(2, 2\) must be at most half"),
    ("avg_pool2d_grad", {"input_shape": (1, 1, 4, 4), "kernel": 2, "ceil_mode": 1},
     r"avg_pool2d_grad: ceil_mode must be true or false, got 1"),
    ("avg_pool2d_grad", {"kernel": 2}, r"avg_pool2d_grad: missing required attribute 'input_shape'"),
]


@pytest.mark.parametrize("op, attrs, message", BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD)])
def test_bad_attributes_are_shape_errors(op, attrs, message):
    with pytest.raises(ShapeError, match=message):
        get_op(op).bind_attrs(attrs)


def _infer(op, *types, **attrs):
    opdef = get_op(op)
    return opdef.infer(*types, **opdef.bind_attrs(attrs))


def test_shape_errors_say_what_does_not_fit():
    gy, w = TensorType((2, 4, 6, 6)), TensorType((4, 3, 3, 3))
    with pytest.raises(ShapeError, match=r"conv2d_grad_input: grad f32\[2,4,6,6\] does not match the conv2d output "
                                         r"\[2,4,4,4\] of input \[2,3,6,6\] and weight \[4,3,3,3\]"):
        _infer("conv2d_grad_input", gy, w, input_shape=(2, 3, 6, 6))
    with pytest.raises(ShapeError, match=r"conv2d_grad_input: weight \[4,3,3,3\] expects 3 input channels, input has 6"):
        _infer("conv2d_grad_input", gy, w, input_shape=(2, 6, 8, 8))
    with pytest.raises(ShapeError, match=r"divisible by groups=2"):
        _infer("conv2d_grad_input", TensorType((2, 3, 6, 6)), TensorType((3, 3, 3, 3)), input_shape=(2, 6, 8, 8), groups=2)
    with pytest.raises(ShapeError, match=r"conv2d_grad_input: operands have different dtypes"):
        _infer("conv2d_grad_input", TensorType((2, 4, 6, 6), "f64"), w, input_shape=(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"conv2d_grad_weight: kernel 3x3 .* does not fit input 2x2"):
        _infer("conv2d_grad_weight", TensorType((2, 3, 2, 2)), gy, weight_shape=(4, 3, 3, 3))
    with pytest.raises(ShapeError, match=r"conv2d_grad_weight: expected a floating-point tensor"):
        _infer("conv2d_grad_weight", TensorType((2, 3, 8, 8), "i64"), gy, weight_shape=(4, 3, 3, 3))
    with pytest.raises(ShapeError, match=r"max_pool2d_grad: grad f32\[2,3,3,3\] does not match the pooled output "
                                         r"\[2,3,4,4\] of input \[2,3,8,8\]"):
        _infer("max_pool2d_grad", TensorType((2, 3, 8, 8)), TensorType((2, 3, 3, 3)), kernel=2)
    with pytest.raises(ShapeError, match=r"max_pool2d_grad: input must be \[N, C, H, W\]"):
        _infer("max_pool2d_grad", TensorType((3, 8, 8)), TensorType((3, 4, 4)), kernel=2)
    with pytest.raises(ShapeError, match=r"avg_pool2d_grad: window \(5, 5\) does not fit input 4x4"):
        _infer("avg_pool2d_grad", TensorType((1, 1, 1, 1)), input_shape=(1, 1, 4, 4), kernel=5)


# vjp rules of the backward ops (second derivatives) -------------------------------------------------------


class EagerGradContext:
    """The part of autodiff's GradContext a vjp rule uses, evaluating each op at once with its ref."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = dict(values)

    def type(self, name: str) -> TensorType:
        return TensorType(self.values[name].shape, dtype_of_array(self.values[name]))

    def op(self, op: str, inputs, **attrs) -> str:
        opdef = get_op(op)
        arrays = opdef.split_inputs([self.values[i] for i in inputs])
        name = f"v{len(self.values)}"
        self.values[name] = opdef.ref(*arrays, **opdef.bind_attrs(attrs))
        return name


class FakeNode:
    def __init__(self, name: str, attrs: dict):
        self.name, self.attrs = name, attrs


@settings(max_examples=15, deadline=None)
@given(case=conv_cases(), seed=SEEDS)
def test_conv_grad_vjps_match_torch_double_backward(case, seed):
    x_shape, w_shape, attrs = case
    rng = np.random.default_rng(seed)
    x, w = T(rng.standard_normal(x_shape), True), T(rng.standard_normal(w_shape), True)
    y = F.conv2d(x, w, None, **attrs)
    gy = T(rng.standard_normal(tuple(y.shape)), True)
    gx, gw = torch.autograd.grad(y, (x, w), gy, create_graph=True)
    bar_x, bar_w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    want_gy_from_x, want_w = torch.autograd.grad(gx, (gy, w), T(bar_x), retain_graph=True)
    want_x, want_gy_from_w = torch.autograd.grad(gw, (x, gy), T(bar_w))
    ctx = EagerGradContext({"gy": gy.detach().numpy(), "w": w.detach().numpy(), "x": x.detach().numpy(),
                            "bar_x": bar_x, "bar_w": bar_w})
    opdef = get_op("conv2d_grad_input")
    node = FakeNode("gx", opdef.bind_attrs(dict(input_shape=x_shape, **attrs)))
    d_gy, d_w = (ctx.values[v] for v in opdef.rule("vjp")(ctx, node, "bar_x", "gy", "w"))
    np.testing.assert_allclose(d_gy, want_gy_from_x.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d_w, want_w.numpy(), rtol=1e-10, atol=1e-10)
    opdef = get_op("conv2d_grad_weight")
    node = FakeNode("gw", opdef.bind_attrs(dict(weight_shape=w_shape, **attrs)))
    d_x, d_gy = (ctx.values[v] for v in opdef.rule("vjp")(ctx, node, "bar_w", "x", "gy"))
    np.testing.assert_allclose(d_x, want_x.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d_gy, want_gy_from_w.numpy(), rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(case=pool_cases(dilated=False), include_pad=st.booleans(), seed=SEEDS)
def test_avg_pool_grad_vjp_is_the_forward_pool(case, include_pad, seed):
    shape, attrs = case
    rng = np.random.default_rng(seed)
    opdef = get_op("avg_pool2d_grad")
    bound = opdef.bind_attrs(dict(input_shape=shape, count_include_pad=include_pad, **attrs))
    out_shape = get_op("avg_pool2d").infer(TensorType(shape), **{k: v for k, v in bound.items() if k != "input_shape"})
    gy, bar = rng.standard_normal(out_shape.shape), rng.standard_normal(shape)
    ctx = EagerGradContext({"gy": gy, "bar": bar})
    (d_gy,) = (ctx.values[v] for v in opdef.rule("vjp")(ctx, FakeNode("gx", bound), "bar", "gy"))
    # the adjoint identity <bar, grad_op(gy)> == <vjp(bar), gy>
    lhs = float((bar * opdef.ref(gy, **bound)).sum())
    assert d_gy.shape == gy.shape
    assert np.isclose(lhs, float((d_gy * gy).sum()), rtol=1e-10, atol=1e-10)
