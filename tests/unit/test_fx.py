"""Torch frontends vs torch: from_torch (torch.export) and from_fx (symbolic trace) on an MLP, a CNN with
batch norm and a TransformerEncoderLayer; weights, names, errors located at the user's line.

Tolerances: the interpreter runs the imported graph in float64 on the module's float32 weights and is
compared with ``module.double()`` — relative error <= 1e-10 (measured ~1e-16); in float32 against the
float32 module (which may take torch's fused fast paths), <= 1e-5 relative (max-abs error / max-abs).
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nncompile as nnc
from nncompile.errors import InputError, UnsupportedError
from nncompile.frontend.fx import from_fx, from_torch, state_dict_names, trace
from nncompile.ir import parse_graph, print_graph, run, verify

PATHS = ("export", "export_decomposed", "fx")


def import_graph(module: nn.Module, inputs: tuple, path: str):
    if path == "export":
        return from_torch(module, inputs)
    if path == "export_decomposed":
        return from_torch(module, inputs, decompose=True)
    return from_fx(module, inputs)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def torch_outputs(module: nn.Module, inputs: tuple, double: bool) -> list[np.ndarray]:
    module = copy.deepcopy(module)
    if double:
        module = module.double()
        inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        out = module(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def check_against_torch(graph, module: nn.Module, inputs: tuple, f64_tol: float = 1e-10, f32_tol: float = 1e-5):
    """The graph verifies, and its interpreter output matches torch in float64 and float32."""
    verify(graph)
    feeds = {item.name: x.numpy() for item, x in zip(graph.inputs, inputs)}
    got64 = run(graph, feeds, dtype=np.float64)
    got32 = run(graph, feeds)
    want64 = torch_outputs(module, inputs, double=True)
    want32 = torch_outputs(module, inputs, double=False)
    assert len(graph.outputs) == len(want64)
    for name, w64, w32 in zip(graph.outputs, want64, want32):
        assert got64[name].shape == w64.shape
        assert relative_error(got64[name], w64) <= f64_tol, (name, relative_error(got64[name], w64))
        assert got32[name].dtype == np.float32
        assert relative_error(got32[name], w32) <= f32_tol, (name, relative_error(got32[name], w32))


def check_weights(graph, module: nn.Module):
    """Every parameter/buffer the graph uses carries the module's value under its state_dict name."""
    state = module.state_dict()
    names = state_dict_names(graph)
    buffers = {name for name, _ in module.named_buffers()}
    for param in graph.params:
        if param.name not in names:  # a constant made at import time
            assert not param.trainable
            continue
        source = names[param.name]
        assert np.array_equal(graph.weights[param.name], state[source].numpy())
        assert param.trainable == (source not in buffers)
    return names


def mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval(), \
        (torch.randn(8, 20),)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.head(x.view(x.size(0), -1))


def cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(1)
    model = SmallCNN()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics and affine terms
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval(), (torch.randn(2, 3, 16, 16),)


def encoder_layer() -> tuple[nn.Module, tuple]:
    torch.manual_seed(2)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True).eval(), (torch.randn(2, 7, 32),)


MODELS = {"mlp": mlp, "cnn": cnn, "encoder_layer": encoder_layer}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", MODELS)
def test_matches_torch(model, path):
    module, inputs = MODELS[model]()
    graph = import_graph(module, inputs, path)
    check_against_torch(graph, module, inputs)
    names = check_weights(graph, module)
    expected = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(names.values()) == expected


def test_names_inputs_and_ops():
    module, inputs = mlp()
    graph = from_torch(module, inputs)
    assert graph.input_names == ("input",)
    assert [n.op for n in graph.nodes] == ["linear", "relu", "linear", "tanh", "linear"]
    assert graph.param_names == ("v0.weight", "v0.bias", "v2.weight", "v2.bias", "v4.weight", "v4.bias")
    assert state_dict_names(graph)["v0.weight"] == "0.weight"
    traced = from_fx(fx.symbolic_trace(module), inputs)
    assert traced.input_names == ("input",)
    public = nnc.from_torch(module, inputs)  # the package-level API routes here
    assert public.param_names == graph.param_names and nnc.from_fx(module, inputs).param_names == graph.param_names
    assert [n.op for n in traced.nodes] == [n.op for n in graph.nodes]
    assert traced.param_names == graph.param_names


def test_cnn_buffers_are_not_trainable():
    module, inputs = cnn()
    graph = from_torch(module, inputs)
    kinds = {p.name: p.trainable for p in graph.params}
    assert kinds["features.1.running_mean"] is False and kinds["features.1.running_var"] is False
    assert kinds["features.1.weight"] is True and kinds["features.0.weight"] is True
    assert "features.4.bias" not in kinds  # conv without bias
    ops = [n.op for n in graph.nodes]
    assert ops.count("batch_norm") == 2 and "global_avg_pool2d" in ops and ops.count("conv2d") == 2


def test_encoder_layer_uses_attention_op():
    module, inputs = encoder_layer()
    for path in ("export", "fx"):
        ops = [n.op for n in import_graph(module, inputs, path).nodes]
        assert ops.count("sdpa") == 1 and ops.count("layer_norm") == 2 and "dropout" not in ops
    decomposed = [n.op for n in from_torch(module, inputs, decompose=True).nodes]
    assert "softmax" in decomposed and decomposed.count("matmul") == 3


def test_encoder_layer_inside_traced_model():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True,
                                                    activation="gelu", norm_first=True)
            self.out = nn.Linear(32, 50)

        def forward(self, ids):
            return self.out(self.layer(self.embed(ids)))

    torch.manual_seed(3)
    module = Model().eval()
    inputs = (torch.randint(0, 50, (2, 6)),)
    for path in ("export", "fx"):
        graph = import_graph(module, inputs, path)
        assert graph.inputs[0].type.dtype == "i64"
        check_against_torch(graph, module, inputs)
        check_weights(graph, module)
    with pytest.raises(UnsupportedError, match="does not trace symbolically"):
        trace(module.layer)


def test_graph_text_round_trip_keeps_state_names():
    module, inputs = cnn()
    graph = from_torch(module, inputs)
    back = parse_graph(print_graph(graph), dict(graph.weights))
    assert state_dict_names(back) == state_dict_names(graph)


class TupleAndConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.register_buffer("shift", torch.linspace(-1, 1, 6), persistent=False)
        self.scale = torch.full((6,), 0.5)  # a plain tensor attribute: a lifted constant

    def forward(self, x, y):
        h = self.proj(x) * self.scale + self.shift + torch.ones(6) * 2.0
        return h.relu(), (h - y).sum(dim=1, keepdim=True) / x.size(1)


@pytest.mark.parametrize("path", PATHS)
def test_tuple_outputs_and_constants(path):
    torch.manual_seed(4)
    module = TupleAndConstants().eval()
    inputs = (torch.randn(3, 6), torch.randn(3, 6))
    graph = import_graph(module, inputs, path)
    assert graph.input_names == ("x", "y")
    assert len(graph.outputs) == 2
    check_against_torch(graph, module, inputs)
    constants = [p for p in graph.params if p.name not in state_dict_names(graph)]
    assert constants and all(not p.trainable for p in constants)
    state = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    assert set(state_dict_names(graph).values()) == state  # 'scale' is a plain attribute: a constant


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return self.drop(self.fc(x))


@pytest.mark.parametrize("path", ("export", "fx"))
def test_dropout_eval_identity_train_seeded(path):
    module = WithDropout()
    inputs = (torch.randn(4, 8),)
    assert "dropout" not in [n.op for n in import_graph(module.eval(), inputs, path).nodes]
    graph = import_graph(module.train(), inputs, path)
    drops = [n for n in graph.nodes if n.op == "dropout"]
    assert len(drops) == 1 and drops[0].attrs["p"] == 0.25 and drops[0].attrs["training"] is True
    out = run(graph, {"x": inputs[0].numpy()})[graph.outputs[0]]
    dense = torch_outputs(module.eval(), inputs, double=False)[0]
    kept = out != 0
    assert 0 < kept.sum() < out.size
    np.testing.assert_allclose(out[kept], dense[kept] / 0.75, rtol=1e-5, atol=1e-6)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
               "relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(-0.5, 0.7)}


@settings(max_examples=25)
@given(widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
       activations=st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=4, max_size=4),
       batch=st.integers(1, 5), seed=st.integers(0, 2**16), export=st.booleans())
def test_random_mlps(widths, activations, batch, seed, export):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), ACTIVATIONS[activations[i]]()]
    module = nn.Sequential(*layers[:-1]).eval()
    inputs = (torch.randn(batch, widths[0]) * 2,)
    paths = [from_fx(fx.symbolic_trace(module), inputs)] + ([from_torch(module, inputs)] if export else [])
    for graph in paths:
        check_against_torch(graph, module, inputs)
        check_weights(graph, module)
        assert [n.op for n in graph.nodes].count("linear") == len(widths) - 1


@pytest.mark.parametrize("path", PATHS)
def test_every_activation_module(path):
    torch.manual_seed(5)
    layers = []
    for make in ACTIVATIONS.values():
        layers += [nn.Linear(6, 6), make()]
    module = nn.Sequential(*layers).eval()
    inputs = (torch.randn(4, 6) * 3,)
    check_against_torch(import_graph(module, inputs, path), module, inputs)


class UsesCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.cumsum(h, dim=1)  # the unsupported line


CUMSUM_LINE = inspect.getsourcelines(UsesCumsum.forward)[1] + 2


def test_unsupported_op_export_names_op_and_user_line():
    with pytest.raises(UnsupportedError) as info:
        from_torch(UsesCumsum(), (torch.randn(2, 4),))
    err = info.value
    assert "aten.cumsum.default" in err.message
    assert err.loc is not None and err.loc.file == __file__ and err.loc.line == CUMSUM_LINE
    text = err.format()
    assert f"{__file__}:{CUMSUM_LINE}:" in text and "torch.cumsum(h, dim=1)" in text and "^" in text


def test_unsupported_op_fx_names_op_and_user_line():
    with pytest.raises(UnsupportedError) as info:
        from_fx(UsesCumsum(), (torch.randn(2, 4),))  # traced by nncompile's tracer: stack traces kept
    err = info.value
    assert "torch.cumsum" in err.message and err.loc.file == __file__ and err.loc.line == CUMSUM_LINE
    with pytest.raises(UnsupportedError, match="torch.cumsum") as info:
        from_fx(fx.symbolic_trace(UsesCumsum()), (torch.randn(2, 4),))  # no stack traces recorded
    assert "nncompile.frontend.fx.trace" in info.value.format()


def test_unsupported_module_and_bad_arguments():
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(UnsupportedError, match=r"torch\.nn\.modules\.rnn\.GRU \(submodule 'rnn'\)"):
        from_fx(Holder(), (torch.randn(1, 3, 4),))
    with pytest.raises(InputError):
        from_torch(lambda x: x, (torch.randn(2),))
    with pytest.raises(InputError):
        from_fx(Custom(), "not a tensor")
    with pytest.raises(UnsupportedError, match="output 0"):
        from_fx(_ReturnsSize(), (torch.randn(2, 3),))


class _ReturnsSize(nn.Module):
    def forward(self, x):
        return x.size(0), x


@pytest.mark.parametrize("path", ("export", "fx"))
def test_batch_norm_in_training_mode_uses_batch_statistics(path):
    module, inputs = cnn()
    module.train()
    graph = import_graph(copy.deepcopy(module), inputs, path)
    assert all(n.attrs["training"] is True for n in graph.nodes if n.op == "batch_norm")
    check_against_torch(graph, module, inputs)  # torch_outputs runs deep copies: running stats untouched


class UsesRandom(nn.Module):
    def forward(self, x):
        return x + torch.rand(x.shape[1])


@pytest.mark.parametrize("path", ("export", "fx"))
def test_random_op_in_forward_is_refused(path):
    with pytest.raises(UnsupportedError, match="rand"):
        import_graph(UsesRandom(), (torch.randn(2, 3),), path)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on values: neither tracer can capture it
            return x * 2
        return x


def test_capture_failures_are_unsupported_errors_at_the_user_line():
    line = inspect.getsourcelines(DataDependent.forward)[1] + 1
    with pytest.raises(UnsupportedError, match="torch.export could not capture DataDependent") as info:
        from_torch(DataDependent(), (torch.randn(3),))
    assert (info.value.loc.file, info.value.loc.line) == (__file__, line)
    with pytest.raises(UnsupportedError, match="torch.fx could not trace DataDependent") as info:
        from_fx(DataDependent(), (torch.randn(3),))
    assert f"{__file__}:{line}" in info.value.format()


class InPlace(nn.Module):
    def forward(self, x):
        y = x * 2
        y.add_(1)                       # later uses of y see the update
        z = y * 3
        z += y
        F.relu(z, inplace=True)         # result unused: z itself is updated
        return z, y.mul_(0.5)


@pytest.mark.parametrize("path", PATHS)
def test_in_place_updates(path):
    inputs = (torch.randn(3, 4),)
    check_against_torch(import_graph(InPlace(), inputs, path), InPlace(), inputs)
