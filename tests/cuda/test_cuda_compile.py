"""The CUDA target without a GPU: generated CUDA compiles with nvcc, the build directory is complete and
loadable, errors are clear. Skipped when nvcc is missing.

Every module is compiled cold (a fresh cache directory per test module), for one architecture
(sm_80), so the times printed are nvcc's. The GPU results (values against the interpreter and torch)
are in test_cuda_ops.py.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from nncompile.codegen.build_cuda import find_nvcc
from nncompile.driver import CompileOptions, TrainOptions, compile_graph
from nncompile.errors import BuildError, NNError
from nncompile.frontend.dsl import parse
from nncompile.ir import GraphBuilder, Init, TensorType

T = TensorType
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ARCH = "sm_80"

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="module", autouse=True)
def cold_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNCOMPILE_CACHE_DIR", str(tmp_path_factory.mktemp("cuda_cache")))
        yield


def _options(**kw) -> CompileOptions:
    return CompileOptions(target="cuda", cuda_arch=ARCH, **kw)


def _check_module(path: Path, manifest: dict, spec: dict) -> None:
    """The library loads on a machine without a GPU (static cudart) and agrees with the manifest."""
    lib = ctypes.CDLL(str(path))
    lib.nnc_arena_bytes.restype = ctypes.c_longlong
    lib.nnc_param_bytes.restype = ctypes.c_longlong
    assert lib.nnc_arena_bytes() == spec["device_arena_bytes"] >= spec["arena_bytes"]
    assert lib.nnc_param_bytes() == manifest["param_bytes"]
    for symbol in ("nnc_forward", "nnc_sgd_step", "nnc_adam_step", "nnc_error_message"):
        assert hasattr(lib, symbol)


def _tiny_graph(name: str = "tiny", rows: int = 4) -> object:
    """x[rows, 8] -> relu(linear(x, w)); ``rows`` tells the tests' modules apart in the cache."""
    b = GraphBuilder(name)
    x = b.input("x", T((rows, 8)))
    w = b.param("w", T((3, 8)), Init("normal", {"std": 0.3}))
    b.output(b.op("relu", [b.op("linear", [x, w])]))
    return b.build()


@pytest.mark.parametrize("name", ["mlp", "lenet", pytest.param("gpt", marks=pytest.mark.slow)])
def test_example_compiles_for_inference_and_training(name, tmp_path):
    graph = parse(EXAMPLES / f"{name}.nn")
    start = time.perf_counter()
    model = compile_graph(graph, _options(), out_dir=tmp_path, train=TrainOptions.from_graph(graph))
    seconds = time.perf_counter() - start
    timings = model.manifest["timings"]
    print(f"\n{name}: nvcc inference {timings['nvcc_s']:.1f} s, training {timings['train_nvcc_s']:.1f} s, side by side "
          f"(compile_graph total {seconds:.1f} s)")
    assert not timings["cache_hit"] and not timings["train_cache_hit"]
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["target"] == "cuda" and manifest["cuda_arch"] == ARCH
    for suffix, spec in (("", manifest), ("_train", manifest["train"])):
        source = (tmp_path / f"kernels{suffix}.cu").read_text()
        assert "int nnc_forward(" in source and "nnc::cuda::" in source
        _check_module(tmp_path / spec["module_file"], manifest, spec)


def _zoo_module():
    """The C++ backend's op zoo (tests/backend/test_codegen_ops.py): every forward op, odd shapes."""
    spec = importlib.util.spec_from_file_location("nnc_cpu_op_zoo", ROOT / "tests" / "backend" / "test_codegen_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backward_zoo_graph():
    """A small model (with an mse loss) whose training graph holds the backward ops lenet and gpt do
    not: avg-pool and grouped / strided / dilated conv gradients, batch norm in training mode, global
    pooling, silu."""
    from nncompile.autodiff import with_loss

    b = GraphBuilder("backward_zoo")
    x = b.input("x", T((3, 4, 11, 10)))
    w0 = b.param("w0", T((4, 4, 3, 3)), Init("normal", {"std": 0.3}))
    x = b.op("conv2d", [x, w0], {"padding": (1, 1)})      # so the next conv needs its input gradient
    w1 = b.param("w1", T((6, 2, 3, 3)), Init("normal", {"std": 0.3}))
    b1 = b.param("b1", T((6,)), Init("normal", {"std": 0.1}))
    h = b.op("conv2d", [x, w1, b1], {"groups": 2, "padding": (1, 2), "stride": (2, 1), "dilation": (1, 2)})
    mean = b.param("bn_mean", T((6,)), Init("zeros"), trainable=False)
    var = b.param("bn_var", T((6,)), Init("ones"), trainable=False)
    g = b.param("bn_w", T((6,)), Init("ones"))
    beta = b.param("bn_b", T((6,)), Init("zeros"))
    h = b.op("silu", [b.op("batch_norm", [h, mean, var, g, beta], {"training": True})])
    p = b.op("avg_pool2d", [h], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False})
    q = b.op("max_pool2d", [h], {"kernel": (2, 2), "stride": (2, 2), "ceil_mode": True})
    s = b.op("add", [b.op("global_avg_pool2d", [p]), b.op("global_avg_pool2d", [q])])
    w2 = b.param("w2", T((5, 6)), Init("normal", {"std": 0.3}))
    b.output(b.op("linear", [b.op("flatten", [s]), w2]))
    return with_loss(b.build(), "mse")


@pytest.mark.slow
def test_every_op_compiles(tmp_path):
    """The forward op zoo and a training graph with the remaining backward ops compile with nvcc."""
    from nncompile.codegen.cuda_ops_nn import register_cuda_rules
    from nncompile.ops.base import OPS

    register_cuda_rules()
    missing = [name for name, opdef in OPS.items() if opdef.emit_cuda is None]
    assert not missing, f"ops without emit_cuda: {missing}"
    zoo = _zoo_module()
    b = GraphBuilder("zoo")
    b.output(*[build(b) for _, build in zoo._zoo_cases()])
    graph = b.build()
    start = time.perf_counter()
    model = compile_graph(graph, _options(), out_dir=tmp_path / "zoo")
    print(f"\nop zoo ({len(graph.nodes)} nodes): nvcc {time.perf_counter() - start:.1f} s")
    _check_module(tmp_path / "zoo" / model.manifest["module_file"], model.manifest, model.manifest)

    from nncompile.autodiff import training_graph

    graph = backward_zoo_graph()
    ops = {n.op for n in training_graph(graph).graph.nodes}
    assert {"conv2d_grad_input", "conv2d_grad_weight", "avg_pool2d_grad", "max_pool2d_grad"} <= ops
    model = compile_graph(graph, _options(), out_dir=tmp_path / "backward", train=TrainOptions.from_graph(graph))
    _check_module(tmp_path / "backward" / model.manifest["train"]["module_file"], model.manifest, model.manifest["train"])


def test_no_gpu_is_a_clear_error(tmp_path):
    if _gpu_available():
        pytest.skip("a GPU is present")
    import nncompile as nnc
    from nncompile.runtime_cuda import CudaUnavailableError

    graph = _tiny_graph()
    model = compile_graph(graph, _options(), out_dir=tmp_path)
    for call in (lambda: model(np.zeros((4, 8), np.float32)), lambda: model.parameters()):
        with pytest.raises(CudaUnavailableError) as info:
            call()
        assert isinstance(info.value, NNError) and isinstance(info.value, RuntimeError)
        assert "GPU" in str(info.value) and "target 'cuda'" in str(info.value)
    # inputs and weights are checked before the device is needed
    from nncompile.errors import InputError

    for bad, match in (((np.zeros((4, 7), np.float32),), r"input 'x' has shape \[4, 7\]"),
                       ((np.zeros((4, 8), np.float64),), "input 'x' has dtype float64"),
                       ((), "expected 1 inputs")):
        with pytest.raises(InputError, match=match):
            model(*bad)
    with pytest.raises(InputError, match="parameter 'w' has shape"):
        model.load_weights({"w": np.zeros((8, 3), np.float32)})
    # loading the build directory works without a GPU; weights stay on the host until a GPU is used
    loaded = nnc.load(tmp_path)
    assert type(loaded).__name__ == "CudaCompiledModel" and "cuda" in repr(loaded)
    assert np.array_equal(loaded.state_dict()["w"].numpy(), model.state_dict()["w"].numpy())
    with pytest.raises(CudaUnavailableError):
        loaded(np.zeros((4, 8), np.float32))


def test_cache_hit_and_arch_in_key(tmp_path):
    graph = _tiny_graph("cached", rows=5)
    first = compile_graph(graph, _options())
    again = compile_graph(graph, _options())
    assert not first.manifest["timings"]["cache_hit"] and again.manifest["timings"]["cache_hit"]
    assert again.module_path == first.module_path
    other = compile_graph(graph, CompileOptions(target="cuda", cuda_arch="sm_90"))
    assert other.module_path != first.module_path and other.manifest["cuda_arch"] == "sm_90"


def test_tf32_wmma_variant_compiles(monkeypatch, tmp_path):
    """NNCOMPILE_CUDA_TF32=1 builds the large-tile GEMM on TF32 tensor cores (WMMA): another module."""
    graph = _tiny_graph("tf32", rows=7)
    plain = compile_graph(graph, _options())
    monkeypatch.setenv("NNCOMPILE_CUDA_TF32", "1")
    tf32 = compile_graph(graph, _options(), out_dir=tmp_path)
    assert tf32.module_path != plain.module_path and not tf32.manifest["timings"]["cache_hit"]
    _check_module(tf32.module_path, tf32.manifest, tf32.manifest)


def test_nvcc_error_names_the_node(monkeypatch):
    from nncompile.codegen.cuda_ops_nn import register_cuda_rules
    from nncompile.ops.base import get_op, set_rule

    register_cuda_rules()
    original = get_op("fused").rule("emit_cuda")     # the tiny graph is one fused linear + relu
    set_rule("fused", "emit_cuda", lambda ctx, node: original(ctx, node) + "\nthis_is_not_cuda;")
    try:
        with pytest.raises(BuildError) as info:
            compile_graph(_tiny_graph("broken", rows=6), _options())
    finally:
        set_rule("fused", "emit_cuda", original)
    message = str(info.value)
    assert "nvcc rejected" in message and "fused(x, w)" in message and "this_is_not_cuda" in message
    assert "kernels.cu" in message


def test_cli_target_cuda(tmp_path, capsys):
    from nncompile.cli import main

    out = tmp_path / "build"
    code = main([str(EXAMPLES / "mlp.nn"), "--target", "cuda", "--cuda-arch", "sm_90", "-o", str(out),
                 "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["target"] == "cuda"
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["cuda_arch"] == "sm_90" and (out / "kernels.cu").exists() and (out / manifest["module_file"]).exists()
    assert main([str(EXAMPLES / "mlp.nn"), "--target", "cuda", "--cuda-arch", "gfx90a", "-o", str(out)]) == 2
    assert "--cuda-arch" in capsys.readouterr().err
