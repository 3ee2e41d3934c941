"""Every differentiable op's vjp against torch.autograd, on shapes drawn by hypothesis (float64).

Each case is ``loss = sum(op(inputs) * R)``; the IR's gradients (``differentiate`` + interpreter)
must equal torch's ``loss.backward()`` for the same inputs. Finite-difference checks of every vjp
are in test_autodiff.py; this file pins torch's conventions (broadcast reduction, ties, masks).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nncompile.autodiff import differentiate
from nncompile.ir import GraphBuilder, Init, TensorType, run, verify

T = TensorType
dims = st.integers(1, 4)


def compare(op, shapes, attrs=None, torch_fn=None, seed=0, positive=False, ints=None, tol=1e-9, ints_first=False,
            arrange=None):
    """Build loss = sum(op(p0, p1, ..., ints...) * R) and compare its gradients with torch's.

    ``arrange(b, float_names, int_names)`` may give the op's input list instead (to add constants)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("case")
    values = [np.abs(rng.standard_normal(s)) + 0.5 if positive else rng.standard_normal(s) for s in shapes]
    names = [b.param(f"p{i}", T(s, "f64"), Init("given"), value=v) for i, (s, v) in enumerate(zip(shapes, values))]
    int_values = [rng.integers(0, high, s) for s, high in (ints or [])]
    int_names = [b.param(f"q{i}", T(v.shape, "i64"), Init("given"), trainable=False, value=v)
                 for i, v in enumerate(int_values)]
    if arrange is not None:
        inputs = arrange(b, names, int_names)
    else:
        inputs = int_names + names if ints_first else names + int_names
    out = b.op(op, inputs, attrs or {})
    r_value = rng.standard_normal(b.type_of(out).shape)
    r = b.param("R", T(r_value.shape, "f64"), Init("given"), trainable=False, value=r_value)
    b.output(b.op("sum", [b.op("mul", [out, r])], name="loss"))
    graph = b.build()
    builder, grads = differentiate(graph, "loss", names)
    builder.outputs = ["loss"] + [grads[n] for n in names]
    got = run(verify(builder.build()), {}, dict(graph.weights), dtype=np.float64)
    tensors = [torch.tensor(v, requires_grad=True) for v in values]
    result = torch_fn(*tensors, *[torch.tensor(v) for v in int_values])
    (result * torch.tensor(r_value)).sum().backward()
    np.testing.assert_allclose(got["loss"], (result * torch.tensor(r_value)).sum().item(), rtol=1e-9)
    for name, t in zip(names, tensors):
        np.testing.assert_allclose(got[grads[name]], t.grad.numpy(), rtol=tol, atol=tol, err_msg=f"{op}: d/d{name}")


UNARY = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "exp": torch.exp,
         "neg": torch.neg, "abs": torch.abs, "erf": torch.erf, "gelu": F.gelu}


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(sorted(UNARY)), st.lists(dims, min_size=1, max_size=3), st.integers(0, 99))
def test_unary(op, shape, seed):
    compare(op, [tuple(shape)], torch_fn=UNARY[op], seed=seed)


@settings(max_examples=10, deadline=None)
@given(st.lists(dims, min_size=1, max_size=3), st.integers(0, 99))
def test_log_sqrt_rsqrt_pow(shape, seed):
    shape = tuple(shape)
    compare("log", [shape], torch_fn=torch.log, seed=seed, positive=True)
    compare("sqrt", [shape], torch_fn=torch.sqrt, seed=seed, positive=True)
    compare("rsqrt", [shape], torch_fn=torch.rsqrt, seed=seed, positive=True)
    compare("pow_scalar", [shape], {"exponent": 3.0}, lambda x: x ** 3, seed=seed)
    compare("leaky_relu", [shape], {"negative_slope": 0.1}, lambda x: F.leaky_relu(x, 0.1), seed=seed)
    compare("clamp", [shape], {"min": -0.5, "max": 0.7}, lambda x: torch.clamp(x, -0.5, 0.7), seed=seed)
    compare("gelu", [shape], {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh"), seed=seed)


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "maximum": torch.maximum,
          "minimum": torch.minimum}


@st.composite
def broadcast_pair(draw):
    shape = draw(st.lists(dims, min_size=1, max_size=3))
    other = [d if draw(st.booleans()) else 1 for d in shape][draw(st.integers(0, len(shape) - 1)):]
    return (tuple(shape), tuple(other)) if draw(st.booleans()) else (tuple(other), tuple(shape))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(BINARY)), broadcast_pair(), st.integers(0, 99))
def test_binary_broadcasting(op, shapes, seed):
    compare(op, list(shapes), torch_fn=BINARY[op], seed=seed, positive=op == "div")


@settings(max_examples=10, deadline=None)
@given(dims, dims, dims, st.sampled_from([(), (2,), (3, 1)]), st.integers(0, 99))
def test_matmul_and_linear(m, k, n, batch, seed):
    compare("matmul", [batch + (m, k), (k, n)], torch_fn=torch.matmul, seed=seed)
    compare("linear", [(m, k), (n, k), (n,)], torch_fn=F.linear, seed=seed)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["sum", "mean", "max"]), st.lists(dims, min_size=1, max_size=3), st.booleans(),
       st.integers(0, 99), st.data())
def test_reductions(op, shape, keepdim, seed, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    fn = {"sum": lambda x: x.sum(axes, keepdim=keepdim), "mean": lambda x: x.mean(axes, keepdim=keepdim),
          "max": lambda x: x.amax(axes, keepdim=keepdim)}[op]
    compare(op, [tuple(shape)], {"axes": axes, "keepdim": keepdim}, fn, seed=seed)


@settings(max_examples=10, deadline=None)
@given(st.lists(dims, min_size=1, max_size=3), st.integers(0, 99), st.data())
def test_softmax_log_softmax_layer_norm(shape, seed, data):
    shape = tuple(shape)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    compare("softmax", [shape], {"axis": axis}, lambda x: torch.softmax(x, axis), seed=seed)
    compare("log_softmax", [shape], {"axis": axis}, lambda x: torch.log_softmax(x, axis), seed=seed)
    compare("layer_norm", [shape, shape[-1:], shape[-1:]], {}, lambda x, w, b: F.layer_norm(x, shape[-1:], w, b, 1e-5),
            seed=seed, tol=1e-8)


@settings(max_examples=10, deadline=None)
@given(dims, dims, st.integers(0, 99))
def test_losses_and_embedding(n, c, seed):
    compare("cross_entropy", [(n, c + 1)], {}, lambda x, y: F.cross_entropy(x, y), seed=seed, ints=[((n,), c + 1)])
    compare("mse_loss", [(n, c), (n, c)], {}, F.mse_loss, seed=seed)
    compare("embedding", [(c + 2, 3)], {}, lambda w, ids: F.embedding(ids, w), seed=seed, ints=[((n, 2), c + 2)],
            ints_first=True)


@settings(max_examples=10, deadline=None)
@given(dims, st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 99))
def test_sdpa(heads, length, d, causal, seed):
    shape = (heads, length, d)
    compare("sdpa", [shape, shape, shape], {"causal": causal},
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), seed=seed, tol=1e-8)


@settings(max_examples=10, deadline=None)
@given(dims, dims, dims, st.integers(0, 99))
def test_shape_ops(a, b, c, seed):
    shape = (a, b, c)
    compare("reshape", [shape], {"shape": (c, a * b)}, lambda x: x.reshape(c, a * b), seed=seed)
    compare("transpose", [shape], {"dim0": 0, "dim1": 2}, lambda x: x.transpose(0, 2), seed=seed)
    compare("permute", [shape], {"dims": (1, 2, 0)}, lambda x: x.permute(1, 2, 0), seed=seed)
    compare("concat", [shape, (a, b + 1, c)], {"axis": 1}, lambda x, y: torch.cat([x, y], 1), seed=seed)
    compare("slice", [shape], {"axis": 2, "start": 0, "end": c, "step": 2}, lambda x: x[:, :, 0:c:2], seed=seed)
    compare("expand", [(a, 1, c)], {"shape": (a, b, c)}, lambda x: x.expand(a, b, c), seed=seed)
    compare("flatten", [shape], {}, lambda x: x.flatten(1), seed=seed)


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm(training):
    mean, var = np.array([0.1, -0.2, 0.3]), np.array([1.5, 0.7, 1.1])

    def arrange(b, names, _):
        stats = [b.param(n, T((3,), "f64"), Init("given"), trainable=False, value=v)
                 for n, v in (("m", mean), ("v", var))]
        return [names[0], *stats, names[1], names[2]]

    compare("batch_norm", [(4, 3, 2, 2), (3,), (3,)], {"training": training},
            lambda x, w, b: F.batch_norm(x, torch.tensor(mean), torch.tensor(var), w, b, training=training, eps=1e-5),
            seed=5, tol=1e-8, arrange=arrange)
