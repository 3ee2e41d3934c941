"""The CUDA emitter's sdpa_grad (one block per query row, atomics for dk and dv) run through the host
emulation == the NumPy interpreter, on the shapes of the C++ kernel test and in a GPT training graph."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from nncompile.ir import GraphBuilder, TensorType, run

pytestmark = [pytest.mark.backend, pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")]

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


emulated = _load("nnc_cuda_emulated_for_sdpa", Path(__file__).parent / "test_cuda_emulated.py")
cpu_cases = _load("nnc_sdpa_grad_codegen", ROOT / "tests" / "backend" / "test_sdpa_grad_codegen.py")


def test_sdpa_grad_matches_interpreter(tmp_path):
    b = GraphBuilder("attention_grad")
    for i, (batch, length, keys, d, dv, causal, scale) in enumerate(cpu_cases.CASES):
        if int(np.prod(batch)) * length > 140 or keys > 128:
            continue      # the emulation starts real threads for every query row's block
        q = b.input(f"q{i}", TensorType(batch + (length, d)))
        k = b.input(f"k{i}", TensorType(batch + (keys, d)))
        v = b.input(f"v{i}", TensorType(batch + (keys, dv)))
        g = b.input(f"g{i}", TensorType(batch + (length, dv)))
        b.output(b.op("sdpa_grad", [q, k, v, g], {"causal": causal, "scale": scale}))
    graph = b.build()
    model = emulated.Emulated(graph, tmp_path)
    inputs = emulated._inputs(graph, 0)
    status, got = model(inputs)
    assert status == 0
    emulated._compare(got, run(graph, inputs), rtol=1e-4, atol=1e-5)


def test_gpt_training_graph(tmp_path):
    import nncompile as nnc

    dims = {"B": 2, "T": 12, "d": 16, "heads": 2, "layers": 1, "vocab": 7}
    emulated._training(nnc.parse(ROOT / "examples" / "gpt.nn", set=dims), tmp_path, high=7)
