"""The example models: parse, verify, run, print -> parse round trip, and mlp/lenet against torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nncompile.frontend import parse, parse_text
from nncompile.ir import graphs_equal, materialize, parse_graph, print_graph, prune, run, run_all, verify
from nncompile.ops.base import OPS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "language.md"
# small sizes so the interpreter runs fast; the defaults are checked by shape only
SMALL = {"mlp": {"B": 4}, "lenet": {"B": 2}, "gpt": {"B": 2, "T": 16, "layers": 2}, "sparse_mlp": {"B": 4},
         "local_mnist": {"B": 2}}


def example_inputs(graph, seed=0):
    rng = np.random.default_rng(seed)
    inputs = {}
    for item in graph.inputs:
        shape = item.type.shape
        if item.type.dtype == "i64":
            high = 10
            if item.name == "positions":
                inputs[item.name] = np.arange(shape[0], dtype=np.int64)
                continue
            if item.name in ("tokens", "targets"):
                high = 512
            inputs[item.name] = rng.integers(0, high, size=shape, dtype=np.int64)
        else:
            inputs[item.name] = rng.normal(size=shape).astype(np.float32)
    return inputs


@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_parses_verifies_runs_and_round_trips(name):
    graph = parse(EXAMPLES / f"{name}.nn", set=SMALL[name])
    verify(graph)
    assert graph.train is not None and graph.outputs
    for node in graph.nodes:
        assert node.loc is not None and node.loc.file.endswith(f"{name}.nn") and node.loc.source_line
    text = print_graph(graph)
    back = parse_graph(text, dict(graph.weights))
    assert graphs_equal(graph, back)
    verify(back)
    assert print_graph(back) == text
    values = run_all(graph, example_inputs(graph))
    for out in graph.outputs:
        assert values[out].shape == graph.type_of(out).shape and np.all(np.isfinite(values[out]))
    assert values[graph.train.loss].shape == () and np.isfinite(values[graph.train.loss])


def test_example_default_sizes():
    mlp = parse(EXAMPLES / "mlp.nn")
    assert mlp.type_of("x").shape == (64, 784) and mlp.type_of(mlp.outputs[0]).shape == (64, 10)
    assert mlp.num_params() == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    lenet = parse(EXAMPLES / "lenet.nn")
    assert lenet.type_of("p2").shape == (32, 16, 5, 5)
    gpt = parse(EXAMPLES / "gpt.nn")
    assert gpt.type_of(gpt.outputs[0]).shape == (8, 128, 512)
    block_params = 2 * 2 * 256 + 4 * (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
    assert gpt.num_params() == 512 * 256 + 128 * 256 + 4 * block_params + 2 * 256 + 512 * 256
    assert {f"blocks.{i}.attn.q.weight" for i in range(4)} <= set(gpt.param_names)
    assert gpt.train.optimizer == "adamw"
    sparse = parse(EXAMPLES / "sparse_mlp.nn")
    w2 = sparse.param("w2")
    assert w2.type.sparsity.kind == "unstructured" and w2.type.sparsity.density == pytest.approx(0.1)
    values = materialize(sparse)
    assert np.count_nonzero(values["w2"]) == round(0.1 * 1024 * 1024)


def test_set_changes_shapes():
    gpt = parse(EXAMPLES / "gpt.nn", set={"B": 3, "T": 32, "layers": 1, "d": 64, "heads": 2})
    assert gpt.type_of("tokens").shape == (3, 32) and gpt.type_of("wte.weight").shape == (512, 64)
    assert not any(name.startswith("blocks.1.") for name in gpt.param_names)
    assert gpt.node("blocks.0.attn.a").type.shape == (3, 2, 32, 32)


def test_gpt_is_causal():
    graph = prune(parse(EXAMPLES / "gpt.nn", set=SMALL["gpt"]))
    weights = materialize(graph)
    inputs = example_inputs(graph)
    base = run(graph, inputs, weights)[graph.outputs[0]]
    changed = dict(inputs)
    changed["tokens"] = inputs["tokens"].copy()
    changed["tokens"][:, 10:] = (changed["tokens"][:, 10:] + 7) % 512
    after = run(graph, changed, weights)[graph.outputs[0]]
    np.testing.assert_allclose(after[:, :10], base[:, :10], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[:, 10:], base[:, 10:])


def test_docs_model_snippets_parse():
    text = DOCS.read_text()
    snippets = [block.split("\n", 1)[1] for block in text.split("```")[1::2] if "\nmodel " in "\n" + block and ":=" not in block and "..." not in block]
    assert len(snippets) >= 2
    for snippet in snippets:
        graph = parse_text(snippet, filename="language.md")
        verify(graph)


def test_docs_list_every_op_with_its_attributes_and_every_layer():
    from nncompile.frontend.layers import LAYERS

    text = DOCS.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for name, opdef in OPS.items():
        if name == "fused":
            assert "`fused`" in text
            continue
        row = next((r for r in rows if f"`{name}`" in r.split("|")[1]), None)
        assert row is not None, f"docs/language.md has no op table row for '{name}'"
        for attr in opdef.attrs:
            assert attr in row, f"docs row of '{name}' does not mention attribute '{attr}'"
        for input_name in opdef.inputs:
            assert input_name in row, f"docs row of '{name}' does not mention input '{input_name}'"
    for name, spec in LAYERS.items():
        row = next((r for r in rows if f"`{name}" in r.split("|")[1] or f"`{name}`" in r), None)
        assert row is not None, f"docs/language.md has no layer row for '{name}'"
        for arg in spec.args:
            assert arg in row, f"docs row of layer '{name}' does not mention '{arg}'"


# the same networks in torch ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
nn = torch.nn


class TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TorchLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("name, module_type, input_name, shape", [
    ("mlp", TorchMLP, "x", (4, 784)),
    ("lenet", TorchLeNet, "images", (2, 1, 28, 28)),
])
def test_same_network_as_torch(name, module_type, input_name, shape, tmp_path):
    torch.manual_seed(0)
    module = module_type().eval()
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    graph = prune(parse(EXAMPLES / f"{name}.nn", set=SMALL[name]))
    assert set(graph.param_names) == set(state)
    x = torch.randn(*shape)
    want = module(x).detach().numpy()
    got = run(graph, {input_name: x.numpy()}, state)[graph.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the same through a weights file written from the state_dict
    np.savez(tmp_path / "sd.npz", **state)
    source = (EXAMPLES / f"{name}.nn").read_text().replace("{", '{\n    weights "sd.npz"', 1)
    (tmp_path / f"{name}.nn").write_text(source)
    loaded = prune(parse(tmp_path / f"{name}.nn", set=SMALL[name]))
    assert all(p.init.kind == "given" for p in loaded.params)
    got = run(loaded, {input_name: x.numpy()})[loaded.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
