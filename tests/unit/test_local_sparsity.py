"""Locally connected layers: the ``local`` sparsity pattern and the LocallyConnected1d/2d layers.

The pattern is checked against a brute-force loop over (output unit, input unit) pairs; the layer's
interpreter output against torch's ``F.unfold`` with per-position weights gathered from the dense weight
by explicit index loops (a locally connected layer is exactly that); bad arguments give located errors.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nncompile.errors import NameError_, NNError, ShapeError
from nncompile.frontend import parse_text
from nncompile.ir import graphs_equal, parse_graph, print_graph, run, verify
from nncompile.ir.init import materialize
from nncompile.ir.types import Sparsity, TensorType


def brute_force_mask(in_size, in_channels, out_channels, kernel, stride, padding):
    """W[o * P_out + q, c * P_in + i] is kept when input position i lies in output position q's window."""
    out_size = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_size, kernel, stride, padding)]
    n_out, n_in = math.prod(out_size), math.prod(in_size)
    mask = np.zeros((out_channels * n_out, in_channels * n_in), dtype=bool)
    for o, q_pos, c in itertools.product(range(out_channels), itertools.product(*map(range, out_size)),
                                         range(in_channels)):
        for offsets in itertools.product(*map(range, kernel)):
            i_pos = [q * s - p + d for q, s, p, d in zip(q_pos, stride, padding, offsets)]
            if all(0 <= i < n for i, n in zip(i_pos, in_size)):
                row = o * n_out + int(np.ravel_multi_index(q_pos, out_size))
                col = c * n_in + int(np.ravel_multi_index(i_pos, in_size))
                mask[row, col] = True
    return mask


@st.composite
def local_patterns(draw):
    rank = draw(st.sampled_from([1, 2]))
    in_size, kernel, stride, padding = [], [], [], []
    for _ in range(rank):
        size = draw(st.integers(1, 9))
        pad = draw(st.integers(0, 2))
        kernel.append(draw(st.integers(1, size + 2 * pad)))
        in_size.append(size)
        stride.append(draw(st.integers(1, 3)))
        padding.append(pad)
    return tuple(in_size), draw(st.integers(1, 3)), draw(st.integers(1, 3)), tuple(kernel), tuple(stride), tuple(padding)


@settings(max_examples=150, deadline=None)
@given(local_patterns())
def test_local_mask_matches_brute_force(pattern):
    in_size, channels, out_channels, kernel, stride, padding = pattern
    sparsity = Sparsity("local", in_size=in_size, in_channels=channels, kernel=kernel, stride=stride, padding=padding)
    want = brute_force_mask(in_size, channels, out_channels, kernel, stride, padding)
    got = sparsity.mask(want.shape)
    assert got.dtype == bool and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert sparsity.local_out_channels(want.shape) == out_channels
    assert sparsity.expected_density == pytest.approx(want.mean(), rel=1e-12)
    # the text form round trips (1-D tuples print as "(n,)")
    type_ = TensorType(want.shape, "f32", sparsity)
    graph = parse_graph(f"graph g {{\n  param w: {type_} = zeros()\n  output w\n}}\n")
    assert graph.params[0].type == type_


def test_scalar_arguments_broadcast_over_axes():
    a = Sparsity("local", in_size=(6, 5), in_channels=2, kernel=3, stride=2, padding=1)
    b = Sparsity("local", in_size=[6, 5], in_channels=2, kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    assert a == b and hash(a) == hash(b) and a.out_size == (3, 3)
    assert Sparsity("local", in_size=(7,), in_channels=1, kernel=3).stride == (1,)


def test_mask_is_fast_for_a_mnist_sized_layer():
    """28x28x8 -> 26x26x16 with 3x3 windows: W is [10816, 6272], 778752 nonzeros (72 per row)."""
    sparsity = Sparsity("local", in_size=(28, 28), in_channels=8, kernel=3)
    start = time.perf_counter()
    mask = sparsity.mask((16 * 26 * 26, 8 * 28 * 28))
    elapsed = time.perf_counter() - start
    assert mask.shape == (10816, 6272) and int(mask.sum()) == 10816 * 72
    assert np.all(mask.sum(axis=1) == 72)
    assert elapsed < 2.0, f"mask took {elapsed:.2f} s"


@pytest.mark.parametrize("fields, message", [
    ({"in_size": (5, 5), "in_channels": 2}, "local sparsity needs in_size, in_channels and kernel"),
    ({"in_size": (5, 5, 5), "in_channels": 2, "kernel": 3}, "local sparsity is 1-D or 2-D, got in_size [5, 5, 5]"),
    ({"in_size": (5, 5), "in_channels": 2, "kernel": (3, 3, 3)},
     "local sparsity: kernel must be 2 integers (the rank of in_size), got [3, 3, 3]"),
    ({"in_size": (5, 5), "in_channels": 2, "kernel": 3, "stride": 0}, "local sparsity: stride must be >= 1, got [0, 0]"),
    ({"in_size": (5, 5), "in_channels": 2, "kernel": 3, "padding": (0, -1)},
     "local sparsity: padding must be >= 0, got [0, -1]"),
    ({"in_size": (5, 5), "in_channels": 0, "kernel": 3}, "local sparsity: in_channels must be an integer >= 1, got 0"),
    ({"in_size": (5, 4), "in_channels": 1, "kernel": (3, 7), "padding": 1},
     "local sparsity: kernel [3, 7] is larger than the padded input [7, 6]"),
])
def test_bad_local_pattern_is_a_shape_error(fields, message):
    with pytest.raises(ShapeError) as info:
        Sparsity("local", **fields)
    assert info.value.message == message


@pytest.mark.parametrize("shape, message", [
    ((18, 50, 1), "local sparsity needs a 2-D weight [out features, in features], got shape [18, 50, 1]"),
    ((18, 49), "local sparsity: weight shape [18, 49] has 49 columns, expected 50 (in_channels 2 x input 5x5)"),
    ((10, 50), "local sparsity: weight shape [10, 50] has 10 rows, not a positive multiple of the 9 output positions "
               "(output 3x3 from input 5x5, kernel 3x3, stride 1x1, padding 0x0)"),
    ((0, 50), "local sparsity: weight shape [0, 50] has 0 rows, not a positive multiple of the 9 output positions "
              "(output 3x3 from input 5x5, kernel 3x3, stride 1x1, padding 0x0)"),
])
def test_weight_shape_must_fit_the_pattern(shape, message):
    sparsity = Sparsity("local", in_size=(5, 5), in_channels=2, kernel=3)
    with pytest.raises(ShapeError) as info:
        sparsity.mask(shape)
    assert info.value.message == message


# The layers against torch ------------------------------------------------------------------------

def torch_locally_connected(x, weight, bias, out, kernel, stride, padding):
    """F.unfold + one weight matrix per output position, the weights gathered from the dense
    [out * P_out, C * P_in] weight by explicit loops over (position, out channel, channel, kernel offset)."""
    x4 = x if x.dim() == 4 else x.unsqueeze(2)                      # 1-D as height 1
    k2, s2, p2 = [(1, *v) if x.dim() == 3 else v for v in (kernel, stride, padding)]
    p2 = (0, p2[1]) if x.dim() == 3 else p2
    batch, channels, height, width = x4.shape
    out_h = (height + 2 * p2[0] - k2[0]) // s2[0] + 1
    out_w = (width + 2 * p2[1] - k2[1]) // s2[1] + 1
    columns = F.unfold(x4, k2, padding=p2, stride=s2)              # [B, C * kh * kw, P_out]
    local = np.zeros((out_h * out_w, out, channels * k2[0] * k2[1]), np.float64)
    w = weight.numpy()
    for oy, ox, o, c, ky, kx in itertools.product(range(out_h), range(out_w), range(out), range(channels),
                                                  range(k2[0]), range(k2[1])):
        iy, ix = oy * s2[0] - p2[0] + ky, ox * s2[1] - p2[1] + kx
        if 0 <= iy < height and 0 <= ix < width:
            q = oy * out_w + ox
            local[q, o, (c * k2[0] + ky) * k2[1] + kx] = w[o * out_h * out_w + q, (c * height + iy) * width + ix]
    y = torch.einsum("bjq,qoj->boq", columns.double(), torch.from_numpy(local))
    if bias is not None:
        y = y + bias.double().reshape(out, out_h * out_w)
    return y.reshape(batch, out, *((out_h, out_w) if x.dim() == 4 else (out_w,)))


@st.composite
def layer_cases(draw):
    rank = draw(st.sampled_from([1, 2]))
    size = [draw(st.integers(2, 8)) for _ in range(rank)]
    padding = [draw(st.integers(0, 1)) for _ in range(rank)]
    kernel = [draw(st.integers(1, min(4, n + 2 * p))) for n, p in zip(size, padding)]
    stride = [draw(st.integers(1, 2)) for _ in range(rank)]
    return rank, size, draw(st.integers(1, 3)), draw(st.integers(1, 3)), kernel, stride, padding, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(layer_cases(), st.integers(0, 2**31 - 1))
def test_layer_interpreter_matches_torch_unfold(case, seed):
    rank, size, channels, out, kernel, stride, padding, bias = case
    layer = f"LocallyConnected{rank}d"
    dims = ", ".join(map(str, size))
    graph = parse_text(f"""
model lc {{
    input x: f32[2, {channels}, {dims}]
    y = {layer}(x, {out}, kernel={kernel}, stride={stride}, padding={padding}, bias={str(bias).lower()})
    output y
}}
""")
    verify(graph)
    weight_type = graph.type_of("y.weight")
    rng = np.random.default_rng(seed)
    # a dense random weight: torch reads it only inside the windows, the interpreter gets it masked
    dense = rng.standard_normal(weight_type.shape).astype(np.float32)
    weights = {"y.weight": dense * weight_type.sparsity.mask(weight_type.shape)}
    if bias:
        weights["y.bias"] = rng.standard_normal(graph.type_of("y.bias").shape).astype(np.float32)
    x = rng.standard_normal(graph.type_of("x").shape).astype(np.float32)
    got = run(graph, {"x": x}, weights)["y"]
    want = torch_locally_connected(torch.from_numpy(x), torch.from_numpy(dense),
                                   torch.from_numpy(weights["y.bias"]) if bias else None, out,
                                   tuple(kernel), tuple(stride), tuple(padding)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_parameters_and_round_trip():
    graph = parse_text("""
model lc {
    input x: f32[3, 2, 6, 5]
    h = LocallyConnected2d(x, 4, kernel=[3, 2], stride=[1, 2], padding=1)
    output h
}
""")
    assert graph.type_of("h").shape == (3, 4, 6, 3)
    weight = graph.type_of("h.weight")
    assert weight.shape == (4 * 6 * 3, 2 * 6 * 5) and graph.type_of("h.bias").shape == (4 * 6 * 3,)
    assert weight.sparsity == Sparsity("local", in_size=(6, 5), in_channels=2, kernel=(3, 2), stride=(1, 2),
                                       padding=(1, 1))
    assert [n.op for n in graph.nodes] == ["reshape", "linear", "reshape"]
    values = materialize(graph, 0)
    mask = weight.sparsity.mask(weight.shape)
    assert np.all(values["h.weight"][~mask] == 0) and np.all(values["h.weight"][mask] != 0)
    bound = 1 / math.sqrt(2 * 3 * 2)   # U(+-1/sqrt(fan_in)) with the window's fan-in
    assert np.abs(values["h.weight"]).max() <= bound and np.abs(values["h.weight"]).max() > 0.8 * bound
    text = print_graph(graph)
    assert "sparse local(in_size=(6, 5), in_channels=2, kernel=(3, 2), stride=(1, 2), padding=(1, 1))" in text
    back = parse_graph(text)
    assert graphs_equal(graph, back) and print_graph(back) == text


def test_same_padding_keeps_the_size():
    graph = parse_text("""
model lc {
    input x: f32[1, 2, 7, 6]
    input s: f32[1, 3, 9]
    h = LocallyConnected2d(x, 3, 5, padding="same")
    g = LocallyConnected1d(s, 2, 3, padding="same", bias=false)
    output h, g
}
""")
    assert graph.type_of("h").shape == (1, 3, 7, 6) and graph.type_of("g").shape == (1, 2, 9)
    assert "g.bias" not in {p.name for p in graph.params}


def test_declared_local_pattern_equals_the_layers():
    graph = parse_text("""
model lc {
    input x: f32[2, 3, 6, 6]
    param w: f32[18, 108] = normal() sparse(local=[6, 6], channels=3, kernel=3, stride=2, padding=1)
    y = reshape(linear(reshape(x, [2, 108]), w), [2, 2, 3, 3])
    z = LocallyConnected2d(x, 2, 3, stride=2, padding=1, bias=false)
    output y, z
}
""")
    assert graph.type_of("w").sparsity == graph.type_of("z.weight").sparsity
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    weights = materialize(graph, 0)
    weights["z.weight"] = weights["w"]
    values = run(graph, {"x": x}, weights)
    np.testing.assert_allclose(values["y"], values["z"], rtol=1e-6)


# Bad arguments: located errors --------------------------------------------------------------------

M = "model m {\n"
X4 = "  input x: f32[2, 3, 5, 5]\n"
# (id, source, error class, line, col, message)
ERROR_CASES = [
    ("layer-rank", M + "  input x: f32[2, 3, 5]\n  h = LocallyConnected2d(x, 4, 3)\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: x must be [batch, channels, height, width], got f32[2,3,5]"),
    ("layer-rank-1d", M + X4 + "  h = LocallyConnected1d(x, 4, 3)\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected1d: x must be [batch, channels, length], got f32[2,3,5,5]"),
    ("layer-kernel-too-big", M + X4 + "  h = LocallyConnected2d(x, 4, [3, 6])\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: kernel [3, 6] is larger than the padded input [5, 5] (x is f32[2,3,5,5])"),
    ("layer-kernel-list", M + X4 + "  h = LocallyConnected2d(x, 4, [3, 3, 3])\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: kernel must be an integer or a list of 2 integers, got 3 values"),
    ("layer-stride-zero", M + X4 + "  h = LocallyConnected2d(x, 4, 3, stride=0)\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: stride must be at least 1, got 0"),
    ("layer-negative-padding", M + X4 + "  h = LocallyConnected2d(x, 4, 3, padding=-1)\n  output h\n}\n", ShapeError,
     3, 7, "LocallyConnected2d: padding must be at least 0, got -1"),
    ("layer-same-stride", M + X4 + "  h = LocallyConnected2d(x, 4, 3, stride=2, padding=\"same\")\n  output h\n}\n",
     ShapeError, 3, 7, "LocallyConnected2d: padding=\"same\" needs stride=1"),
    ("layer-same-even", M + X4 + "  h = LocallyConnected2d(x, 4, 2, padding=\"same\")\n  output h\n}\n",
     ShapeError, 3, 7, "LocallyConnected2d: padding=\"same\" needs an odd effective kernel size, got kernel 2"),
    ("layer-out-float", M + X4 + "  h = LocallyConnected2d(x, 2.5, 3)\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: out must be an integer, got number 2.5"),
    ("layer-missing-kernel", M + X4 + "  h = LocallyConnected2d(x, 4)\n  output h\n}\n", ShapeError, 3, 7,
     "LocallyConnected2d: missing argument 'kernel'"),
    ("layer-unknown-keyword", M + X4 + "  h = LocallyConnected2d(x, 4, 3, dilation=2)\n  output h\n}\n", NameError_,
     3, 7, "LocallyConnected2d: unknown keyword 'dilation' (known: x, out, kernel, stride, padding, bias)"),
    ("decl-columns", M + "  param w: f32[18, 49] = normal() sparse(local=[5, 5], channels=2, kernel=3)\n  output w\n}\n",
     ShapeError, 2, 35, "local sparsity: weight shape [18, 49] has 49 columns, expected 50 (in_channels 2 x input 5x5)"),
    ("decl-rows", M + "  param w: f32[10, 50] = normal() sparse(local=[5, 5], channels=2, kernel=3)\n  output w\n}\n",
     ShapeError, 2, 35, "local sparsity: weight shape [10, 50] has 10 rows, not a positive multiple of the 9 output "
                        "positions (output 3x3 from input 5x5, kernel 3x3, stride 1x1, padding 0x0)"),
    ("decl-missing-channels", M + "  param w: f32[9, 25] = normal() sparse(local=[5, 5], kernel=3)\n  output w\n}\n",
     ShapeError, 2, 34, "sparse: local= needs channels"),
    ("decl-kernel-rank", M + "  param w: f32[9, 25] sparse(local=[5, 5], channels=1, kernel=[3, 3, 3])\n  output w\n}\n",
     ShapeError, 2, 23, "sparse: kernel must be an integer or a list of 2 integers, got 3 values"),
    ("decl-kernel-too-big", M + "  param w: f32[9, 25] sparse(local=[5, 5], channels=1, kernel=6)\n  output w\n}\n",
     ShapeError, 2, 23, "local sparsity: kernel [6, 6] is larger than the padded input [5, 5]"),
    ("decl-with-density", M + "  param w: f32[9, 25] sparse(local=[5, 5], channels=1, kernel=3, density=0.5)\n"
                              "  output w\n}\n",
     ShapeError, 2, 23, "sparse: local= fixes the whole pattern; it cannot be combined with density"),
    ("decl-kernel-without-local", M + "  param w: f32[9, 25] sparse(channels=1, kernel=3)\n  output w\n}\n",
     ShapeError, 2, 23, "sparse: channels= and kernel= belong to a locally connected pattern; give local=[H, W] too"),
    ("decl-3d-local", M + "  param w: f32[9, 25] sparse(local=[5, 5, 5], channels=1, kernel=3)\n  output w\n}\n",
     ShapeError, 2, 23, "sparse: local= is the input's spatial size, [H, W] or L, got 3 values"),
    ("linear-local", M + "  input x: f32[2, 25]\n"
                         "  h = Linear(x, 10, sparse=sparse(local=[5, 5], channels=1, kernel=3))\n  output h\n}\n",
     ShapeError, 3, 7, "local sparsity: weight shape [10, 25] has 10 rows, not a positive multiple of the 9 output "
                       "positions (output 3x3 from input 5x5, kernel 3x3, stride 1x1, padding 0x0)"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_local_source_gives_located_error(case):
    _, source, kind, line, col, message = case
    with pytest.raises(NNError) as info:
        parse_text(source)
    err = info.value
    assert isinstance(err, kind), f"{type(err).__name__}: {err.format()}"
    assert err.message == message, err.format()
    assert (err.loc.line, err.loc.col) == (line, col), err.format()
    assert err.loc.source_line == source.splitlines()[line - 1]
