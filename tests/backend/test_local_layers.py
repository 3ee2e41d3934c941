"""Locally connected layers compiled to C++ (``linear`` with a ``local`` sparsity pattern) against the NumPy
interpreter, on the forced sparse kernel and under the default chooser, and trained against PyTorch.

The torch model is written independently of the pattern: ``F.unfold`` plus one weight matrix per output
position, gathered from the dense weight with index tables built by explicit loops. Its gradient reaches
the dense weight only inside the windows, so no gradient masking is needed on the torch side.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.codegen import cpp_sparse
from nncompile.ir.interp import run

pytestmark = pytest.mark.backend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MODEL = """
dim B = {batch}
model local_net {{
    input x: f32[B, 3, 10, 9]
    input s: f32[B, 2, 12]
    h = relu(LocallyConnected2d(x, 6, 3, stride=[1, 2], padding=1))
    g = LocallyConnected2d(h, 4, [2, 3], stride=2, bias=false)
    t = LocallyConnected1d(s, 3, 4, stride=2)
    y = Linear(reshape(g, [B, 40]), 5) + Linear(reshape(tanh(t), [B, 15]), 5)
    output y
}}
"""
LOCAL = ("h.weight", "g.weight", "t.weight")


@pytest.mark.parametrize("batch", [5, 70])
@pytest.mark.parametrize("kernel", ["sparse", "auto"])
def test_compiled_local_layers_match_interpreter(batch, kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("NNC_SPARSE_KERNEL", kernel)
    graph = nnc.parse_text(MODEL.format(batch=batch))
    model = nnc.compile(graph, out_dir=tmp_path)
    weights = model.parameters()
    for name in LOCAL:
        t = graph.type_of(name)
        assert t.sparsity.kind == "local"
        assert np.all(weights[name][~t.sparsity.mask(t.shape)] == 0), name
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, 10, 9)).astype(np.float32)
    s = rng.standard_normal((batch, 2, 12)).astype(np.float32)
    ref = run(graph, {"x": x, "s": s}, weights)["y"]
    np.testing.assert_allclose(model(x, s), ref, rtol=1e-4, atol=1e-5)
    decisions = {d["weight"]: d for d in cpp_sparse.DECISIONS[model.manifest["module_name"]]}
    assert set(LOCAL) <= set(decisions)
    for name in LOCAL:
        assert decisions[name]["pattern"].startswith("local(")
        if kernel == "sparse":
            assert decisions[name]["kernel"] == "sparse" and "forced" in decisions[name]["why"]
    if kernel == "sparse":
        assert (tmp_path / "kernels.cpp").read_text().count("nnc::sparse::linear(") >= len(LOCAL)


# Training against torch -------------------------------------------------------------------------------

TRAIN = """
dim B = 16
model local_train {{
    input x: f32[B, 2, 8, 8]
    h = LocallyConnected2d(x, 4, 3, padding=1)
    g = LocallyConnected2d(relu(h), 3, 3, stride=2)
    logits = Linear(reshape(relu(g), [B, 27]), 10)
    output logits
    train {{
        input labels: i64[B]
        loss = cross_entropy(logits, labels)
        optimizer {optimizer}
    }}
}}
"""
TRAIN_LOCAL = ("h.weight", "g.weight")


def window_gather(channels, size, out, kernel, stride, padding):
    """Index tables for the per-position weights: local[q, o, j] = W.flat[index[q, o, j]] where valid."""
    out_h = (size[0] + 2 * padding - kernel) // stride + 1
    out_w = (size[1] + 2 * padding - kernel) // stride + 1
    positions = out_h * out_w
    index = np.zeros((positions, out, channels * kernel * kernel), np.int64)
    valid = np.zeros(index.shape, bool)
    width = channels * size[0] * size[1]
    for oy, ox, o, c, ky, kx in itertools.product(range(out_h), range(out_w), range(out), range(channels),
                                                  range(kernel), range(kernel)):
        iy, ix = oy * stride - padding + ky, ox * stride - padding + kx
        if 0 <= iy < size[0] and 0 <= ix < size[1]:
            q, j = oy * out_w + ox, (c * kernel + ky) * kernel + kx
            index[q, o, j] = (o * positions + q) * width + (c * size[0] + iy) * size[1] + ix
            valid[q, o, j] = True
    return torch.from_numpy(index), torch.from_numpy(valid), (out_h, out_w)


def torch_local(x, weight, bias, gather, kernel, stride, padding):
    index, valid, out_size = gather
    local = weight.reshape(-1)[index] * valid
    columns = F.unfold(x, kernel, padding=padding, stride=stride)
    y = torch.einsum("bjq,qoj->boq", columns, local) + bias.reshape(local.shape[1], -1)
    return y.reshape(x.shape[0], local.shape[1], *out_size)


def torch_forward(p, x, gathers):
    h = torch_local(x, p["h.weight"], p["h.bias"], gathers[0], 3, 1, 1)
    g = torch_local(F.relu(h), p["g.weight"], p["g.bias"], gathers[1], 3, 2, 0)
    return F.linear(F.relu(g).reshape(x.shape[0], 27), p["logits.weight"], p["logits.bias"])


@pytest.mark.parametrize("optimizer, kernel", [("sgd(lr=0.05, momentum=0.9, weight_decay=0.001)", "sparse"),
                                               ("adamw(lr=0.003, weight_decay=0.01)", "sparse"),
                                               ("sgd(lr=0.05, momentum=0.9, weight_decay=0.001)", "auto")])
def test_local_layers_train_like_torch(optimizer, kernel, monkeypatch):
    steps = 30
    monkeypatch.setenv("NNC_SPARSE_KERNEL", kernel)
    graph = nnc.parse_text(TRAIN.format(optimizer=optimizer))
    model = nnc.compile(graph, train=True)
    pattern = {name: graph.type_of(name).sparsity.mask(graph.type_of(name).shape) for name in TRAIN_LOCAL}
    gathers = [window_gather(2, (8, 8), 4, 3, 1, 1), window_gather(4, (8, 8), 3, 3, 2, 0)]
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.parameters().items()}
    if optimizer.startswith("sgd"):
        opt = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(list(params.values()), lr=3e-3, weight_decay=1e-2)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((16, 2, 8, 8)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(4)]
    ours, theirs = [], []
    for step in range(steps):
        x, labels = data[step % 4]
        ours.append(model.train_step(x, labels))
        opt.zero_grad()
        loss = F.cross_entropy(torch_forward(params, torch.from_numpy(x), gathers), torch.from_numpy(labels))
        loss.backward()
        for name, mask in pattern.items():
            assert torch.all(params[name].grad[torch.from_numpy(~mask)] == 0), f"{name}: torch gradient off the windows"
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert ours[-1] < 0.9 * ours[0]
    final = model.parameters()
    for name, value in final.items():
        np.testing.assert_allclose(value, params[name].detach().numpy(), atol=1e-4, rtol=0, err_msg=name)
    grads = model._trainer.grads()
    for name, mask in pattern.items():
        assert np.all(final[name][~mask] == 0), f"{name}: a weight off the windows moved"
        assert np.all(final[name][mask] != 0), f"{name}: a weight in a window became exactly zero"
        assert np.all(grads[name][~mask] == 0), f"{name}: gradient off the windows"


def test_local_training_graph_uses_pattern_only_gradients():
    graph = nnc.parse_text(TRAIN.format(optimizer="sgd(lr=0.1)"))
    tg = training_graph(graph)
    producers = {n.name: n for n in tg.graph.nodes}
    for name in TRAIN_LOCAL:
        node = producers[tg.grads[name]]
        while node.op == "identity":
            node = producers[node.inputs[0]]
        assert node.op == "sparse_weight_grad", (name, node.op)


def test_local_mnist_example_trains_like_torch():
    """examples/local_mnist.nn under the default chooser, 10 steps against the unfold formulation."""
    graph = nnc.parse(EXAMPLES / "local_mnist.nn", set={"B": 8})
    model = nnc.compile(graph, train=True)
    gathers = [window_gather(1, (28, 28), 4, 5, 2, 0), window_gather(4, (12, 12), 8, 3, 2, 0)]
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.parameters().items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(3)
    data = [(rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)) for _ in range(2)]
    ours, theirs = [], []
    for step in range(10):
        x, labels = data[step % 2]
        ours.append(model.train_step(x, labels))
        opt.zero_grad()
        h = F.relu(torch_local(torch.from_numpy(x), params["lc1.weight"], params["lc1.bias"], gathers[0], 5, 2, 0))
        g = F.relu(torch_local(h, params["lc2.weight"], params["lc2.bias"], gathers[1], 3, 2, 0))
        logits = F.linear(g.reshape(8, 200), params["fc.weight"], params["fc.bias"])
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    final = model.parameters()
    for name in ("lc1.weight", "lc2.weight"):
        t = graph.type_of(name)
        np.testing.assert_allclose(final[name], params[name].detach().numpy(), atol=1e-4, rtol=0, err_msg=name)
        assert np.all(final[name][~t.sparsity.mask(t.shape)] == 0)
