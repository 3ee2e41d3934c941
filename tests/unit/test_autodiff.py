"""Every vjp rule against central finite differences (f64 interpreter), and a few against torch.autograd.

Each case builds ``loss = sum(op(params...) * R)`` for a fixed random R (so every output element
matters), differentiates it with ``nncompile.autodiff.differentiate`` and compares the interpreter's
gradients with finite differences of the interpreter itself, in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nncompile.autodiff import differentiate, training_graph
from nncompile.ir import GraphBuilder, Init, TensorType, run, verify
from nncompile.ops.base import OPS

T = TensorType


def _case(build, shapes, seed=0, positive=False, ints=None):
    """build(b, *param_names) -> output name; shapes are the float params' shapes."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("case")
    names = []
    values = {}
    for i, shape in enumerate(shapes):
        name = f"p{i}"
        value = rng.standard_normal(shape)
        if positive:
            value = np.abs(value) + 0.5
        names.append(b.param(name, T(shape, "f64"), Init("given"), value=value))
        values[name] = value
    extra = {}
    for name, (shape, high) in (ints or {}).items():
        extra[name] = rng.integers(0, high, shape)
        b.param(name, T(shape, "i64"), Init("given"), trainable=False, value=extra[name])
    out = build(b, *names)
    r = b.param("R", T(b.type_of(out).shape, "f64"), Init("given"), trainable=False,
                value=rng.standard_normal(b.type_of(out).shape))
    loss = b.op("sum", [b.op("mul", [out, r])], name="loss")
    b.output(loss)
    return b.build(), names


def check_grads(graph, names, eps=1e-6, rtol=1e-5, atol=1e-7):
    b, grads = differentiate(graph, "loss", names)
    b.outputs = ["loss"] + [grads[n] for n in names]
    full = verify(b.build())
    weights = dict(graph.weights)
    got = run(full, {}, weights, dtype=np.float64)
    for name in names:
        analytic = got[grads[name]]
        numeric = np.zeros_like(weights[name])
        flat = weights[name].reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + eps
            up = run(graph, {}, weights, dtype=np.float64)["loss"]
            flat[i] = keep - eps
            down = run(graph, {}, weights, dtype=np.float64)["loss"]
            flat[i] = keep
            numeric.reshape(-1)[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol, err_msg=f"gradient of {name}")


UNARY = ["relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu", "exp", "neg", "abs", "erf", "identity"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    graph, names = _case(lambda b, x: b.op(op, [x]), [(3, 5)], seed=1)
    check_grads(graph, names)


@pytest.mark.parametrize("op, attrs", [("gelu", {"approximate": "tanh"}), ("clamp", {"min": -0.3, "max": 0.4}),
                                       ("scale", {"factor": -1.7}), ("add_scalar", {"value": 2.0}),
                                       ("pow_scalar", {"exponent": 3.0}), ("pow_scalar", {"exponent": 2.0})])
def test_unary_with_attrs(op, attrs):
    graph, names = _case(lambda b, x: b.op(op, [x], attrs), [(4, 3)], seed=2)
    check_grads(graph, names)


@pytest.mark.parametrize("op", ["log", "sqrt", "rsqrt"])
def test_positive_domain(op):
    graph, names = _case(lambda b, x: b.op(op, [x]), [(2, 6)], positive=True)
    check_grads(graph, names)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "minimum"])
def test_binary_broadcast(op):
    graph, names = _case(lambda b, x, y: b.op(op, [x, y]), [(2, 3, 4), (3, 1)], seed=3, positive=op == "div")
    check_grads(graph, names)


def test_where():
    def build(b, x, y):
        cond = b.op("gt", [x, b.op("full", [], {"shape": (), "value": 0.1, "dtype": "f64"})])
        return b.op("where", [cond, x, y])
    graph, names = _case(build, [(3, 4), (4,)], seed=4)
    check_grads(graph, names)


@pytest.mark.parametrize("shapes", [[(2, 3), (3, 4)], [(2, 5, 3), (3, 4)], [(2, 1, 3, 4), (5, 4, 2)], [(3,), (3, 2)],
                                    [(2, 3), (3,)]])
def test_matmul(shapes):
    graph, names = _case(lambda b, x, y: b.op("matmul", [x, y]), shapes, seed=5)
    check_grads(graph, names)


def test_linear():
    graph, names = _case(lambda b, x, w, c: b.op("linear", [x, w, c]), [(2, 3, 4), (5, 4), (5,)], seed=6)
    check_grads(graph, names)


@pytest.mark.parametrize("op, attrs, shape", [
    ("reshape", {"shape": (6, -1)}, (2, 3, 4)), ("flatten", {}, (2, 3, 4)), ("transpose", {"dim0": 0, "dim1": 2}, (2, 3, 4)),
    ("permute", {"dims": (2, 0, 1)}, (2, 3, 4)), ("slice", {"axis": 1, "start": 1, "end": 5, "step": 2}, (2, 6)),
    ("expand", {"shape": (3, 2, 4)}, (2, 1)), ("squeeze", {"axes": (1,)}, (3, 1, 2)), ("unsqueeze", {"axis": 0}, (3, 2)),
    ("sum", {"axes": (0, 2)}, (2, 3, 4)), ("mean", {"axes": (1,), "keepdim": True}, (2, 3, 4)),
    ("max", {"axes": (1,)}, (3, 5)), ("softmax", {"axis": 1}, (3, 4)), ("log_softmax", {"axis": -1}, (3, 4)),
])
def test_shape_and_reduce(op, attrs, shape):
    graph, names = _case(lambda b, x: b.op(op, [x], attrs), [shape], seed=7)
    check_grads(graph, names)


def test_concat():
    graph, names = _case(lambda b, x, y: b.op("concat", [x, y, x], {"axis": 1}), [(2, 3), (2, 1)], seed=8)
    check_grads(graph, names)


def test_layer_norm():
    graph, names = _case(lambda b, x, w, c: b.op("layer_norm", [x, w, c], {"normalized_ndim": 2}),
                         [(2, 3, 4), (3, 4), (3, 4)], seed=9)
    check_grads(graph, names, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(training):
    def build(b, x, w, c):
        mean = b.param("m", T((3,), "f64"), Init("given"), trainable=False, value=np.array([0.1, -0.2, 0.3]))
        var = b.param("v", T((3,), "f64"), Init("given"), trainable=False, value=np.array([1.5, 0.7, 1.1]))
        return b.op("batch_norm", [x, mean, var, w, c], {"training": training})
    graph, names = _case(build, [(4, 3, 2), (3,), (3,)], seed=10)
    check_grads(graph, names, rtol=1e-4, atol=1e-6)


def test_cross_entropy_and_mse():
    def build(b, logits, pred, target):
        ce = b.op("cross_entropy", [logits, "labels"])
        mse = b.op("mse_loss", [pred, target])
        return b.op("add", [ce, mse])
    graph, names = _case(build, [(5, 4), (3, 2), (3, 2)], seed=11, ints={"labels": ((5,), 4)})
    check_grads(graph, names)


def test_embedding():
    graph, names = _case(lambda b, w: b.op("embedding", ["ids", w]), [(6, 3)], seed=12, ints={"ids": ((2, 4), 6)})
    check_grads(graph, names)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa(causal):
    graph, names = _case(lambda b, q, k, v: b.op("sdpa", [q, k, v], {"causal": causal}),
                         [(2, 4, 3), (2, 5, 3), (2, 5, 2)], seed=13)
    check_grads(graph, names)


def test_dropout_uses_the_same_mask():
    graph, names = _case(lambda b, x: b.op("dropout", [x], {"p": 0.4, "seed": 3}), [(4, 7)], seed=14)
    check_grads(graph, names)


def test_global_avg_pool():
    graph, names = _case(lambda b, x: b.op("global_avg_pool2d", [x]), [(2, 3, 2, 3)], seed=15)
    check_grads(graph, names)


def test_every_forward_op_has_a_vjp():
    backward_only = {"fused", "cross_entropy_grad", "embedding_grad", "slice_scatter", "sdpa_grad",
                     "conv2d_grad_input", "conv2d_grad_weight", "max_pool2d_grad", "avg_pool2d_grad",
                     "sparse_weight_grad", "sparse_mask", "sparse_input_grad"}
    missing = [name for name, opdef in OPS.items() if opdef.vjp is None and name not in backward_only]
    assert not missing, f"ops without a vjp rule: {missing}"


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["relu", "tanh", "gelu", "silu"]))
def test_mlp_matches_torch_autograd(batch, hidden, classes, act):
    """A two-layer MLP with cross-entropy: nncompile gradients == torch.autograd."""
    rng = np.random.default_rng(batch * 100 + hidden * 10 + classes)
    b = GraphBuilder("mlp")
    x = b.input("x", T((batch, 3), "f64"))
    labels = b.input("labels", T((batch,), "i64"))
    w1 = b.param("w1", T((hidden, 3), "f64"), Init("given"), value=rng.standard_normal((hidden, 3)))
    b1 = b.param("b1", T((hidden,), "f64"), Init("given"), value=rng.standard_normal(hidden))
    w2 = b.param("w2", T((classes, hidden), "f64"), Init("given"), value=rng.standard_normal((classes, hidden)))
    h = b.op(act, [b.op("linear", [x, w1, b1])])
    loss = b.op("cross_entropy", [b.op("linear", [h, w2]), labels], name="loss")
    b.output(loss)
    from nncompile.ir.graph import TrainSpec

    b.train = TrainSpec("loss", ("labels",), "sgd")
    tg = training_graph(b.build())
    xv, yv = rng.standard_normal((batch, 3)), rng.integers(0, classes, batch)
    got = run(tg.graph, {"x": xv, "labels": yv}, dict(tg.graph.weights), dtype=np.float64)
    tw = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in tg.graph.weights.items()}
    th = getattr(torch.nn.functional, act)(torch.tensor(xv) @ tw["w1"].T + tw["b1"])
    tloss = torch.nn.functional.cross_entropy(th @ tw["w2"].T, torch.tensor(yv))
    tloss.backward()
    np.testing.assert_allclose(got["loss"], tloss.item(), rtol=1e-10)
    for name in ("w1", "b1", "w2"):
        np.testing.assert_allclose(got[tg.grads[name]], tw[name].grad.numpy(), rtol=1e-8, atol=1e-10)
