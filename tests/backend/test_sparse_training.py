"""Training with a fixed sparsity pattern: the compiled training step against PyTorch training the same
dense MLP with masked weights and masked gradients (``W.grad *= mask`` before every optimizer step).

Losses agree within 1e-4 (relative) at each of 100 steps, the final weights within 1e-4, and the pattern
never changes: weights off the pattern stay exactly zero, the optimizer state there stays zero, and the
training graph's weight gradients come from the pattern-only kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.ir.interp import run

pytestmark = pytest.mark.backend

SPARSE_MLP = """
dim B = 32
model sparse_mlp {{
    input x: f32[B, 48]
    fc1 = Linear(x, 64)
    param w2: f32[64, 64] = kaiming_uniform() sparse(density=0.1, seed=3)
    param b2: f32[64] = zeros()
    h2 = relu(linear(relu(fc1), w2, b2))
    fc3 = Linear(h2, 32, sparse=sparse(nm=2:4))
    param w4: f32[10, 32] = kaiming_uniform() sparse(block=[2, 4], density=0.5, seed=1)
    logits = linear(relu(fc3), w4)
    output logits
    train {{
        input labels: i64[B]
        loss = cross_entropy(logits, labels)
        optimizer {optimizer}
    }}
}}
"""

SPARSE = ("w2", "fc3.weight", "w4")


def masks(graph):
    return {name: graph.type_of(name).sparsity.mask(graph.type_of(name).shape) for name in SPARSE}


def torch_forward(p, x):
    h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["w2"], p["b2"]))
    h = F.relu(F.linear(h, p["fc3.weight"], p["fc3.bias"]))
    return F.linear(h, p["w4"])


def torch_optimizer(text, params):
    if text.startswith("sgd"):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)


@pytest.mark.parametrize("optimizer", ["sgd(lr=0.05, momentum=0.9, weight_decay=0.001)",
                                       "adamw(lr=0.003, weight_decay=0.01)"])
@pytest.mark.parametrize("kernel", ["sparse", "unrolled", pytest.param("auto", marks=pytest.mark.slow)])
def test_sparse_mlp_trains_like_torch_with_masked_grads(optimizer, kernel, monkeypatch):
    steps = 100
    monkeypatch.setenv("NNC_SPARSE_KERNEL", kernel)
    graph = nnc.parse_text(SPARSE_MLP.format(optimizer=optimizer))
    model = nnc.compile(graph, train=True)
    pattern = masks(graph)
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.parameters().items()}
    for name, mask in pattern.items():
        assert np.all(model.parameters()[name][~mask] == 0), f"{name} is not masked at initialization"
    opt = torch_optimizer(optimizer, list(params.values()))
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((32, 48)).astype(np.float32), rng.integers(0, 10, 32)) for _ in range(4)]
    ours, theirs = [], []
    for step in range(steps):
        x, labels = data[step % 4]
        if step % 30 == 1:
            # inference between steps sees the trained weights (its packed sparse values are refreshed)
            expected = run(graph, {"x": x, "labels": labels}, model.parameters())["logits"]
            np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-5, err_msg=f"step {step}")
        ours.append(model.train_step(x, labels))
        opt.zero_grad()
        loss = F.cross_entropy(torch_forward(params, torch.from_numpy(x)), torch.from_numpy(labels))
        loss.backward()
        with torch.no_grad():
            for name, mask in pattern.items():
                params[name].grad *= torch.from_numpy(mask)
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert ours[-1] < 0.8 * ours[0]
    final = model.parameters()
    for name, value in final.items():
        np.testing.assert_allclose(value, params[name].detach().numpy(), atol=1e-4, rtol=0, err_msg=name)
    for name, mask in pattern.items():
        assert np.all(final[name][~mask] == 0), f"{name}: a pruned weight moved"
        assert np.all(final[name][mask] != 0), f"{name}: a kept weight became exactly zero"
    grads = model._trainer.grads()
    for name, mask in pattern.items():
        assert np.all(grads[name][~mask] == 0)
    for state in model.optimizer_state.values():
        if state.ndim:
            for name, mask in pattern.items():
                start = next(p["offset"] for p in model.manifest["params"] if p["name"] == name) // 4
                block = state[start:start + mask.size].reshape(mask.shape)
                assert np.all(block[~mask] == 0), f"{name}: optimizer state off the pattern"


def test_training_graph_uses_pattern_only_gradients():
    graph = nnc.parse_text(SPARSE_MLP.format(optimizer="sgd(lr=0.1)"))
    tg = training_graph(graph)
    producers = {n.name: n for n in tg.graph.nodes}
    for name in SPARSE:
        node = producers[tg.grads[name]]
        while node.op == "identity":
            node = producers[node.inputs[0]]
        assert node.op == "sparse_weight_grad", (name, node.op)
    assert {n.inputs[1] for n in tg.graph.nodes if n.op == "sparse_input_grad"} == set(SPARSE)
    # the interpreter agrees with the masked dense gradient
    rng = np.random.default_rng(1)
    from nncompile.ir.init import materialize

    weights = materialize(graph, 0)
    x = rng.standard_normal((32, 48)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    env = run(tg.graph, {"x": x, "labels": labels}, weights)
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in weights.items()}
    F.cross_entropy(torch_forward(params, torch.from_numpy(x)), torch.from_numpy(labels)).backward()
    for name, mask in masks(graph).items():
        np.testing.assert_allclose(env[tg.grads[name]], params[name].grad.numpy() * mask, atol=1e-5)


@pytest.mark.slow
def test_sparse_conv_weight_gradient_is_masked():
    """A sparse weight used outside linear (conv2d) gets its gradient masked (sparse_mask)."""
    graph = nnc.parse_text("""
dim B = 2
model sconv {
    input x: f32[B, 3, 8, 8]
    c = Conv2d(x, 4, 3, sparse=0.3)
    y = mean(c)
    output y
    train {
        loss = y
        optimizer sgd(lr=0.1)
    }
}
""")
    tg = training_graph(graph)
    name = next(p.name for p in graph.params if p.type.sparsity is not None)
    assert any(n.op == "sparse_mask" and n.inputs[1] == name for n in tg.graph.nodes)
    model = nnc.compile(graph, train=True)
    mask = graph.type_of(name).sparsity.mask(graph.type_of(name).shape)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for _ in range(3):
        model.train_step(x)
    assert np.all(model.parameters()[name][~mask] == 0)
    assert np.all(model._trainer.grads()[name][~mask] == 0)
