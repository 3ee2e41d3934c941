"""The fused attention gradient ``sdpa_grad``: its NumPy reference == torch.autograd of
scaled_dot_product_attention, its shape rules, and the sdpa vjp that emits it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nncompile.autodiff import training_graph
from nncompile.errors import ShapeError
from nncompile.ir import GraphBuilder, TensorType, run
from nncompile.ops import get_op


def torch_grads(q, k, v, grad, causal, scale):
    """dq, dk, dv of scaled_dot_product_attention for the output gradient ``grad`` (broadcast batch)."""
    batch = grad.shape[:-2]
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    expanded = [t.expand(*batch, *t.shape[-2:]) for t in leaves]
    for t in expanded:
        t.retain_grad()
    out = F.scaled_dot_product_attention(*expanded, is_causal=causal, scale=scale)
    out.backward(torch.tensor(grad))
    return [t.grad.numpy() for t in expanded]


def unpack(packed, q, k, v, batch):
    parts, start = [], 0
    for x in (q, k, v):
        shape = batch + x.shape[-2:]
        end = start + int(np.prod(shape))
        parts.append(packed[start:end].reshape(shape))
        start = end
    assert start == packed.size
    return parts


@settings(max_examples=40, deadline=None)
@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=2, max_side=3),
       length=st.integers(1, 9), keys=st.integers(1, 9), d=st.integers(1, 6), dv=st.integers(1, 6),
       causal=st.booleans(), scale=st.none() | st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
def test_reference_matches_torch_autograd(batch, length, keys, d, dv, causal, scale, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(batch.input_shapes[0] + (length, d))
    k = rng.standard_normal(batch.input_shapes[1] + (keys, d))
    v = rng.standard_normal(batch.input_shapes[2] + (keys, dv))
    grad = rng.standard_normal(batch.result_shape + (length, dv))
    packed = get_op("sdpa_grad").ref(q, k, v, grad, causal=causal, scale=scale)
    assert packed.dtype == np.float64
    for got, expected in zip(unpack(packed, q, k, v, batch.result_shape), torch_grads(q, k, v, grad, causal, scale)):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_reference_keeps_float32():
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(4))
    packed = get_op("sdpa_grad").ref(q, k, v, g, causal=True, scale=None)
    assert packed.dtype == np.float32 and packed.shape == (3 * 2 * 5 * 4,)


def test_shape_errors_name_the_op():
    op = get_op("sdpa_grad")
    t = TensorType
    with pytest.raises(ShapeError, match=r"sdpa_grad: grad f32\[2,5,3\] does not match the attention output \[2, 5, 4\]"):
        op.infer(t((2, 5, 8)), t((2, 6, 8)), t((2, 6, 4)), t((2, 5, 3)), causal=False, scale=None)
    with pytest.raises(ShapeError, match="sdpa_grad: q .* do not fit"):
        op.infer(t((2, 5, 8)), t((2, 6, 7)), t((2, 6, 4)), t((2, 5, 4)), causal=False, scale=None)
    with pytest.raises(ShapeError, match="sdpa_grad: q, k, v and grad have different dtypes"):
        op.infer(t((5, 8)), t((6, 8)), t((6, 4)), t((5, 4), "f64"), causal=False, scale=None)
    assert op.infer(t((2, 1, 5, 8)), t((3, 6, 8)), t((3, 6, 4)), t((2, 3, 5, 4)), causal=True,
                    scale=None) == t((2 * 3 * 5 * 8 + 2 * 3 * 6 * 8 + 2 * 3 * 6 * 4,))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_vjp_is_one_fused_op_and_matches_torch(causal):
    """The training graph of a broadcasting sdpa holds one sdpa_grad (no [L, S] tensors) and its
    gradients, run by the interpreter, equal torch.autograd."""
    b = GraphBuilder("attn")
    q = b.param("q", TensorType((2, 1, 7, 4), "f64"))
    k = b.param("k", TensorType((3, 5, 4), "f64"))
    v = b.param("v", TensorType((1, 5, 6), "f64"))
    w = b.input("w", TensorType((2, 3, 7, 6), "f64"))
    out = b.op("sdpa", [q, k, v], {"causal": causal, "scale": 0.7})
    loss = b.op("sum", [b.op("mul", [out, w])])
    b.output(loss)
    graph = b.build()
    tg = training_graph(graph, loss)
    ops = [node.op for node in tg.graph.nodes]
    assert ops.count("sdpa_grad") == 1
    backward = tg.graph.nodes[[n.op for n in tg.graph.nodes].index("sdpa_grad"):]
    assert all(n.type.shape[-2:] != (7, 5) for n in backward)
    rng = np.random.default_rng(3)
    params = {name: rng.standard_normal(graph.type_of(name).shape) for name in ("q", "k", "v")}
    weights = rng.standard_normal((2, 3, 7, 6))
    values = run(tg.graph, {"w": weights}, params)
    leaves = {name: torch.tensor(x, requires_grad=True) for name, x in params.items()}
    expected = F.scaled_dot_product_attention(leaves["q"].expand(2, 3, 7, 4), leaves["k"].expand(2, 3, 5, 4),
                                              leaves["v"].expand(2, 3, 5, 6), is_causal=causal, scale=0.7)
    (expected * torch.tensor(weights)).sum().backward()
    for name, leaf in leaves.items():
        np.testing.assert_allclose(values[tg.grads[name]], leaf.grad.numpy(), rtol=1e-9, atol=1e-9)
