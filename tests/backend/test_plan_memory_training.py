"""Gradients are unchanged with the memory planner on: the training graph (loss + one gradient per
parameter) compiled through the whole pipeline (schedule, in-place reuse, bi-level blocks, one
arena) against the NumPy interpreter on the same graph, inputs and weights. The plan itself is
checked by the independent checker of tests/unit/test_plan_memory.py; here the build folder must
hold the picture of the arena."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.driver import CompileOptions, compile_graph
from nncompile.ir import run
from nncompile.ir.init import materialize
from nncompile.passes.pipeline import PipelineOptions
from nncompile.passes.plan_memory import MemoryOptions

pytestmark = pytest.mark.backend
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GPT = {"B": 2, "T": 16, "d": 32, "heads": 2, "layers": 2, "vocab": 64}


def inputs_for(name, graph, dims, rng):
    values = {}
    for item in graph.inputs:
        if item.type.dtype == "i64":
            values[item.name] = rng.integers(0, dims.get("vocab", 10), item.type.shape)
        else:
            values[item.name] = rng.standard_normal(item.type.shape).astype(np.float32)
    if name == "gpt":
        values["positions"] = np.arange(dims["T"])
    return values


@pytest.mark.parametrize("name,dims,memory", [
    ("mlp", {"B": 8}, {}),
    ("lenet", {"B": 4}, {}),
    ("gpt", GPT, {}),
])
def test_training_gradients_with_the_planner_match_the_interpreter(name, dims, memory, tmp_path):
    graph = nnc.parse(EXAMPLES / f"{name}.nn", set=dims)
    tg = training_graph(graph, None).graph
    options = CompileOptions(pipeline=PipelineOptions(memory=MemoryOptions(**memory)))
    model = compile_graph(tg, options, out_dir=tmp_path)
    weights = materialize(graph, 0)
    values = inputs_for(name, tg, dims, np.random.default_rng(0))
    want = run(tg, values, weights)
    got = model(*[values[n] for n in model.input_names])
    got = dict(zip(model.output_names, got if isinstance(got, tuple) else (got,)))
    assert set(got) == set(want)
    for key, expected in want.items():
        scale = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(got[key], expected, atol=2e-4 * scale, rtol=2e-3, err_msg=key)
    figures = model.manifest["figures"]["plan_memory"]
    assert figures["arena_bytes"] <= 1.01 * figures["lower_bound"]
    if name == "gpt":
        assert figures["method"] == "blocks"      # the layers' buffers went through the bi-level plan
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
