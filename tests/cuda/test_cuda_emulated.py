"""Generated CUDA run on the CPU, against the interpreter (needs g++, not a GPU or nvcc).

``kernels.cu`` compiled as C++ with ``-DNNC_CUDA_HOST_EMULATION`` (``native/cuda/nnc_host_emulation.h``)
runs every launch on CPU threads: up to 2 blocks of up to 64 real threads, barriers for
``__syncthreads``, warp shuffles through an exchange buffer; GEMMs and implicit-GEMM convolutions run
the GPU kernel's tiles thread after thread over the real loaders and epilogue. So the generated index
math, block reductions, fusion, broadcasting, memory plan (arena offsets, in-place reuse) and error
reporting are checked for the op zoo, the backward ops and the examples' training graphs, in float32
against ``nncompile.ir.run``. Not covered: timing-dependent races, the TF32 kernel, real launch sizes
(test_cuda_ops.py on a GPU).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nncompile.codegen.build_cuda import CUDA_NATIVE_DIR
from nncompile.ir import GraphBuilder, Init, TensorType, run
from nncompile.ir.init import materialize
from nncompile.ir.types import numpy_dtype

pytestmark = [pytest.mark.backend, pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Emulated:
    """A graph lowered, planned and emitted exactly as for the GPU, compiled for the CPU emulation."""

    def __init__(self, graph, out_dir: Path, keep_inputs: bool = False, weights: dict | None = None):
        from nncompile.codegen.cuda import CudaEmitter, device_arena_bytes
        from nncompile.codegen.cuda_ops_nn import register_cuda_rules, workspace_bytes
        from nncompile.passes.pipeline import PipelineOptions, run_pipeline
        from nncompile.passes.plan_memory import param_layout

        register_cuda_rules()
        options = PipelineOptions()
        offsets, param_bytes = param_layout(graph.params, options.memory.alignment)
        self.graph, _, self.plan = run_pipeline(graph, options, workspace_bytes, (offsets, param_bytes), keep_inputs)
        source = CudaEmitter(self.graph, self.plan, "emulated").emit()
        name = hashlib.sha256(source.kernels.encode()).hexdigest()[:12]
        src = out_dir / f"kernels_{name}.cu"
        src.write_text(source.kernels)
        lib = out_dir / f"emulated_{name}.so"
        result = subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", "-DNNC_CUDA_HOST_EMULATION", "-x", "c++",
                                 f"-I{CUDA_NATIVE_DIR}", str(src), "-o", str(lib)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[:3000]
        self.lib = ctypes.CDLL(str(lib))
        self.lib.nnc_forward.restype = ctypes.c_int
        self.lib.nnc_error_message.restype = ctypes.c_char_p
        self.arena = np.zeros(device_arena_bytes(self.plan.arena_bytes) + 64, np.uint8)
        self.block = np.zeros(max(param_bytes, 1), np.uint8)
        self.weights = weights if weights is not None else materialize(graph, 0)
        for p in graph.params:
            t = p.type
            view = self.block[offsets[p.name]:offsets[p.name] + t.nbytes].view(numpy_dtype(t.dtype)).reshape(t.shape)
            view[...] = self.weights[p.name]

    def __call__(self, inputs: dict) -> tuple[int, dict]:
        arrays = [np.ascontiguousarray(inputs[i.name], dtype=numpy_dtype(i.type.dtype)) for i in self.graph.inputs]
        outs = {o: np.full(self.graph.type_of(o).shape, np.nan, numpy_dtype(self.graph.type_of(o).dtype))
                for o in self.graph.outputs}
        P = ctypes.c_void_p
        ins = (P * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])
        outp = (P * max(len(outs), 1))(*[o.ctypes.data for o in outs.values()])
        self.arena[:] = 0xFF      # garbage: nothing may read the arena before writing it
        status = self.lib.nnc_forward(ins, outp, P(self.block.ctypes.data), P(self.arena.ctypes.data), None)
        return status, outs


def _inputs(graph, seed: int, high: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    found = {}
    for item in graph.inputs:
        t = item.type
        if t.dtype in ("i64", "i32"):
            found[item.name] = rng.integers(0, high, t.shape).astype(numpy_dtype(t.dtype))
        else:
            found[item.name] = rng.standard_normal(t.shape).astype(numpy_dtype(t.dtype))
    return found


def _compare(got: dict, expected: dict, rtol=2e-4, atol=2e-5):
    for name, value in got.items():
        ref = np.asarray(expected[name])
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        np.testing.assert_allclose(value, ref, rtol=rtol, atol=atol * scale, err_msg=f"output {name}")


def test_op_zoo(tmp_path):
    cpu_zoo = _load("nnc_cpu_op_zoo", ROOT / "tests" / "backend" / "test_codegen_ops.py")
    b = GraphBuilder("zoo")
    b.output(*[build(b) for _, build in cpu_zoo._zoo_cases()])
    graph = b.build()
    model = Emulated(graph, tmp_path)
    for seed in (0, 1):
        inputs = cpu_zoo.random_inputs(graph, seed)
        status, got = model(inputs)
        assert status == 0
        _compare(got, run(graph, inputs, model.weights))


def test_bad_index_reports_the_node(tmp_path):
    b = GraphBuilder("ids")
    w = b.param("w", TensorType((5, 3)), Init("normal"))
    b.output(b.op("embedding", [b.input("ids", TensorType((4,), "i64")), w]))
    model = Emulated(b.build(), tmp_path)
    status, got = model({"ids": np.array([0, 4, 2, 1])})
    assert status == 0
    np.testing.assert_array_equal(list(got.values())[0], model.weights["w"][[0, 4, 2, 1]])
    status, _ = model({"ids": np.array([0, 5, 2, 1])})
    assert status > 0 and b"embedding" in model.lib.nnc_error_message(status)


def _training(graph, tmp_path, seed=0, high=5):
    """The training graph (loss, gradients, running stats) emulated == interpreted."""
    from nncompile.autodiff import training_graph

    tg = training_graph(graph)
    model = Emulated(tg.graph, tmp_path, keep_inputs=True, weights=materialize(graph, 0))
    inputs = _inputs(model.graph, seed, high)
    if tg.step_input is not None:
        inputs[tg.step_input] = np.array(3, np.int64)
    status, got = model(inputs)
    assert status == 0
    _compare(got, run(tg.graph, inputs, model.weights), rtol=1e-3, atol=1e-4)
    assert set(tg.grads.values()) <= set(got)


def test_backward_ops(tmp_path):
    compile_test = _load("nnc_cuda_compile_test", Path(__file__).parent / "test_cuda_compile.py")
    _training(compile_test.backward_zoo_graph(), tmp_path)


@pytest.mark.parametrize("name, dims", [
    pytest.param("mlp", {"B": 4}, marks=pytest.mark.slow),          # ~30 s: 1024-wide layers
    ("lenet", {"B": 2}),
    pytest.param("gpt", {"B": 2, "T": 8, "d": 32, "heads": 4, "layers": 1, "vocab": 11}, marks=pytest.mark.slow),
])
def test_example_training_graphs(name, dims, tmp_path):
    import nncompile as nnc

    graph = nnc.parse(EXAMPLES / f"{name}.nn", set=dims)
    _training(graph, tmp_path, high=min(dims.get("T", 10), 10))


def test_sparse_weight_training_graph(tmp_path):
    """sparse_input_grad / sparse_weight_grad / sparse_mask through the CUDA emitter."""
    import nncompile as nnc

    graph = nnc.parse_text("""
    model sparse_small {
        input x: f32[3, 12]
        param w: f32[8, 12] = kaiming_uniform() sparse(density=0.3, seed=1)
        h = relu(linear(x, w))
        logits = Linear(h, 4, sparse=sparse(nm=2:4))
        output logits
        train {
            input labels: i64[3]
            loss = cross_entropy(logits, labels)
            optimizer sgd(lr=0.1)
        }
    }
    """)
    from nncompile.autodiff import training_graph

    ops = {n.op for n in training_graph(graph).graph.nodes}
    assert {"sparse_weight_grad", "sparse_input_grad"} & ops, ops
    _training(graph, tmp_path, high=4)
