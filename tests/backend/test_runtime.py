"""The runtime: input checks, torch in/out, weights, threads, the build directory, the cache, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import nncompile as nnc
from nncompile.errors import BuildError, InputError
from nncompile.ir import GraphBuilder, Init, TensorType, run

pytestmark = pytest.mark.backend

SOURCE = """
dim B = 4
model small {
    input x: f32[B, 12]
    h = Linear(x, 16) |> relu
    y = Linear(h, 3)
    output y
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    graph = nnc.parse_text(SOURCE, "small.nn")
    out = tmp_path_factory.mktemp("build")
    return graph, nnc.compile(graph, out_dir=out), out


def test_numpy_and_torch_inputs(compiled):
    graph, model, _ = compiled
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    expected = run(graph, {"x": x}, model.parameters())["y"]
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    got = model(torch.from_numpy(x))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x=x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 11), np.float32), "input 'x' has shape [4, 11], expected f32[4,12]"),
    (np.zeros((4, 12), np.float64), "input 'x' has dtype float64, expected f32[4,12]"),
    (np.zeros((3, 4, 12), np.float32), "input 'x' has shape [3, 4, 12]"),
])
def test_bad_inputs_are_clear_errors(compiled, bad, message):
    _, model, _ = compiled
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model(bad)


def test_non_contiguous_input_is_accepted_by_copy_and_binding_rejects_raw(compiled):
    _, model, _ = compiled
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32))
    np.testing.assert_allclose(model(x), model(np.ascontiguousarray(x)), rtol=1e-6)
    # the binding itself checks contiguity before touching a pointer
    with pytest.raises(ValueError, match="not C-contiguous"):
        model._module.forward([x], [np.empty((4, 3), np.float32)], model._param_block, model._arena)
    with pytest.raises(ValueError, match="expected 1 inputs"):
        model._module.forward([], [np.empty((4, 3), np.float32)], model._param_block, model._arena)


def test_wrong_argument_count(compiled):
    _, model, _ = compiled
    with pytest.raises(InputError, match="expected 1 inputs"):
        model(np.zeros((4, 12), np.float32), np.zeros(1))
    with pytest.raises(InputError, match="missing input 'x'"):
        model(z=np.zeros((4, 12), np.float32))


def test_parameters_are_live_views(compiled):
    graph, model, _ = compiled
    x = np.ones((4, 12), np.float32)
    before = model(x)
    params = model.parameters()
    params["y.bias"][...] += 1.0
    np.testing.assert_allclose(model(x), before + 1.0, rtol=1e-5)
    params["y.bias"][...] -= 1.0
    with pytest.raises(InputError, match="unknown parameter 'nope'"):
        model.load_weights({"nope": np.zeros(3)})
    with pytest.raises(InputError, match="has shape"):
        model.load_weights({"y.bias": np.zeros(4)})


def test_threads_setting(compiled):
    _, model, _ = compiled
    x = np.random.default_rng(2).standard_normal((4, 12)).astype(np.float32)
    model.set_threads(1)
    one = model(x)
    assert model.get_threads() == 1
    model.set_threads(2)
    np.testing.assert_allclose(model(x), one, rtol=1e-6)
    with pytest.raises(InputError):
        model.set_threads(0)


def test_build_dir_round_trip(compiled):
    graph, model, out = compiled
    for name in ("model.json", "kernels.cpp", "binding.cpp", "graph.ir", "plan.json", "weights.npz"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": [4, 12], "dtype": "f32"}]
    loaded = nnc.load(out)
    x = np.random.default_rng(3).standard_normal((4, 12)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="holds no compiled model"):
        nnc.load(out / "missing")


def test_cache_hit_is_fast(compiled):
    graph, _, _ = compiled
    start = time.perf_counter()
    again = nnc.compile(graph)
    assert again.manifest["timings"]["cache_hit"] is True
    assert time.perf_counter() - start < 5.0   # generous bound for a loaded CI machine; typically ~0.05 s


def test_binding_object_follows_the_native_headers(monkeypatch, tmp_path):
    """The shared pybind11 binding inlines native code (the optimizer sweeps): a change to native/*.h
    must give it a new cache entry, not reuse the object compiled against the old headers."""
    from types import SimpleNamespace

    from nncompile.codegen import build

    compiled_count = []

    def fake_compile(cxx, flags, src, obj):
        compiled_count.append(obj)
        obj.write_bytes(b"")
        return subprocess.CompletedProcess([cxx], 0, "", "")

    monkeypatch.setattr(build, "_compile", fake_compile)
    source = SimpleNamespace(binding="// the binding")
    options = build.BuildOptions()
    monkeypatch.setattr(build, "native_digest", lambda: "headers v1")
    first = build._binding_object(source, options, tmp_path)
    assert build._binding_object(source, options, tmp_path) == first and len(compiled_count) == 1
    monkeypatch.setattr(build, "native_digest", lambda: "headers v2")
    second = build._binding_object(source, options, tmp_path)
    assert second != first and len(compiled_count) == 2


def test_index_errors_from_kernels_are_value_errors():
    b = GraphBuilder("emb")
    ids = b.input("ids", TensorType((3,), "i64"))
    w = b.param("w", TensorType((5, 2)), Init("normal"))
    b.output(b.op("embedding", [ids, w]))
    model = nnc.compile(b.build())
    np.testing.assert_array_equal(model(np.array([0, 4, 2])), model.parameters()["w"][[0, 4, 2]])
    with pytest.raises(ValueError, match="embedding node 'embedding'.*out of range"):
        model(np.array([0, 5, 2]))


def test_compiler_errors_name_the_node(monkeypatch):
    from nncompile.codegen import register_rules
    from nncompile.ops.base import get_op, set_rule

    register_rules()
    original = get_op("tanh").emit_cpp
    set_rule("tanh", "emit_cpp", lambda ctx, node: "this is not C++;")
    try:
        b = GraphBuilder("broken")
        b.output(b.op("tanh", [b.input("x", TensorType((3,)))]))
        with pytest.raises(BuildError, match=r"in the code of node tanh = tanh\(x\)"):
            nnc.compile(b.build())
    finally:
        set_rule("tanh", "emit_cpp", original)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nncompile", *args], capture_output=True, text=True)


def test_cli_compile_json(tmp_path):
    src = tmp_path / "small.nn"
    src.write_text(SOURCE)
    result = run_cli(str(src), "-o", str(tmp_path / "out"), "--set", "B=2", "--benchmark", "3", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["inputs"] == {"x": "f32[2,12]"} and figures["median_latency_ms"] > 0
    assert (tmp_path / "out" / "model.json").exists()


def test_cli_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.nn"
    bad.write_text("model m {\n    input x: f32[4, 3]\n    y = relu(z)\n    output y\n}\n")
    result = run_cli(str(bad), "-o", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "bad.nn:3:" in result.stderr and "Traceback" not in result.stderr
    assert run_cli(str(tmp_path / "none.nn")).returncode == 2
    assert run_cli(str(bad), "--set", "B").returncode == 2


TRAIN_SOURCE = SOURCE.replace("    output y\n}", """    output y
    train {
        input labels: i64[B]
        loss = cross_entropy(y, labels)
        optimizer adam(lr=0.01)
    }
}""")


def test_cli_train_builds_a_training_module_that_loads_and_learns(tmp_path):
    src = tmp_path / "small.nn"
    src.write_text(TRAIN_SOURCE)
    out = tmp_path / "out"
    result = run_cli(str(src), "--train", "-o", str(out), "--benchmark", "30", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["train"]["optimizer"] == "adam" and figures["train"]["inputs"] == ["x", "labels"]
    assert figures["loss_last"] < 0.5 * figures["loss_first"]      # one batch, 30 Adam steps: memorized
    m = nnc.load(out)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((4, 12)).astype(np.float32), rng.integers(0, 3, 4)
    before = m(x).copy()
    losses = [m.train_step(x, labels) for _ in range(10)]
    assert losses[-1] < losses[0] and not np.allclose(m(x), before)
    assert (out / "kernels_train.cpp").exists() and (out / "graph_train.ir").exists()


def test_cli_train_without_a_training_section_exits_2(tmp_path):
    src = tmp_path / "small.nn"
    src.write_text(SOURCE)
    result = run_cli(str(src), "--train", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "needs a 'train { ... }' section" in result.stderr
    assert "Traceback" not in result.stderr
