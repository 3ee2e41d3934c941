"""The fused attention kernels (nnc::attention, nnc::attention_backward) in generated C++: sdpa and
sdpa_grad == the NumPy interpreter over shapes that cross the kernels' row blocks (a GPT trained through
them == torch: tests/backend/test_training.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import nncompile as nnc
from nncompile.driver import compile_graph
from nncompile.ir import GraphBuilder, TensorType, run

pytestmark = pytest.mark.backend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# (batch dims, Lq, Lk, D, Dv, causal, scale): one block of 32 query rows and less, several blocks with a
# ragged last one, Lq > Lk and Lq < Lk under the causal mask, the gpt head shape, and keys so many that
# the backward works through the query rows in several panels.
CASES = [
    ((1,), 1, 1, 1, 1, True, None),
    ((2, 3), 70, 70, 16, 8, True, None),
    ((2,), 33, 65, 8, 12, False, 0.3),
    ((2,), 65, 30, 8, 12, True, None),
    ((3,), 31, 97, 5, 3, True, 1.7),
    ((), 32, 32, 64, 64, True, None),
    ((2, 2), 128, 128, 64, 64, True, None),
    ((2,), 45, 45, 24, 40, False, None),
    ((1,), 70, 2100, 4, 3, False, None),
    ((1,), 70, 2100, 4, 3, True, None),
]


def attention_graph():
    b = GraphBuilder("attention")
    for i, (batch, length, keys, d, dv, causal, scale) in enumerate(CASES):
        q = b.input(f"q{i}", TensorType(batch + (length, d)))
        k = b.input(f"k{i}", TensorType(batch + (keys, d)))
        v = b.input(f"v{i}", TensorType(batch + (keys, dv)))
        g = b.input(f"g{i}", TensorType(batch + (length, dv)))
        attrs = {"causal": causal, "scale": scale}
        b.output(b.op("sdpa", [q, k, v], attrs), b.op("sdpa_grad", [q, k, v, g], attrs))
    return b.build()


@pytest.fixture(scope="module")
def compiled():
    graph = attention_graph()
    return graph, compile_graph(graph)


@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_interpreter(compiled, seed):
    graph, model = compiled
    rng = np.random.default_rng(seed)
    inputs = {i.name: (2 * rng.standard_normal(i.type.shape)).astype(np.float32) for i in graph.inputs}
    expected = run(graph, inputs)
    got = model(**inputs)
    for name, value in zip(graph.outputs, got):
        ref = expected[name]
        np.testing.assert_allclose(np.asarray(value), ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=name)


def test_no_attention_matrix_in_the_training_step():
    """The backward of a 128-token causal attention keeps no [.., 128, 128] tensor: one sdpa_grad per layer."""
    from nncompile.autodiff import training_graph

    dims = {"B": 2, "T": 128, "d": 64, "heads": 2, "layers": 2, "vocab": 32}
    tg = training_graph(nnc.parse(EXAMPLES / "gpt.nn", set=dims))
    ops = [node.op for node in tg.graph.nodes]
    assert ops.count("sdpa_grad") == 2
    assert not [node.name for node in tg.graph.nodes if node.type.shape[-2:] == (128, 128)]
