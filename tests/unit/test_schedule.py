"""The schedule pass: memory-aware topological orders.

References: brute force over every topological order of small random graphs, with the bound
computed by ``plan_memory``'s own liveness analysis (``memory_buffers``) on the reordered graph;
the NumPy interpreter for values; the order the graph came in for "never worse".
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.ir import GraphBuilder, TensorType, run
from nncompile.ir.builder import prune
from nncompile.ir.verify import verify
from nncompile.passes.fuse import fuse
from nncompile.passes.plan_memory import memory_buffers
from nncompile.passes.schedule import (ScheduleOptions, dp_order, eager_order, greedy_order, memory_model, order_peak,
                                       schedule, sink_order)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
T = TensorType


def random_graph(data) -> "nnc.Graph":
    """A random DAG of elementwise ops (in place candidates), matmuls that change the size, and
    reductions; several outputs."""
    b = GraphBuilder("random")
    x = b.input("x", T((4, 8)))
    w1 = b.input("w1", T((8, 16)))
    w2 = b.input("w2", T((16, 8)))
    values = {(4, 8): [x], (4, 16): []}
    n = data.draw(st.integers(3, 7), label="nodes")
    made = []
    for k in range(n):
        kind = data.draw(st.sampled_from(["relu", "exp", "add", "mul", "up", "down", "sum"]), label=f"op{k}")
        shape = data.draw(st.sampled_from([s for s, v in values.items() if v]), label=f"shape{k}")
        a = data.draw(st.sampled_from(values[shape]), label=f"a{k}")
        if kind in ("relu", "exp"):
            out = b.op(kind, [a], name=f"n{k}")
        elif kind in ("add", "mul"):
            out = b.op(kind, [a, data.draw(st.sampled_from(values[shape]), label=f"b{k}")], name=f"n{k}")
        elif kind == "up" and shape == (4, 8):
            out = b.op("matmul", [a, w1], name=f"n{k}")
        elif kind == "down" and shape == (4, 16):
            out = b.op("matmul", [a, w2], name=f"n{k}")
        else:
            out = b.op("sum", [a], {"axes": [1], "keepdim": False}, name=f"n{k}")
        made.append(out)
        if b.type_of(out).shape in values:
            values[b.type_of(out).shape].append(out)
    users = {s for name in made for s in b.build().node(name).inputs} if made else set()
    outs = [m for m in made if m not in users] or made[-1:]
    b.output(*outs)
    return b.build()


def topological_orders(graph):
    names = [n.name for n in graph.nodes]
    deps = {n.name: {s for s in n.inputs if s in names} for n in graph.nodes}

    def extend(done, order):
        if len(order) == len(names):
            yield list(order)
            return
        for name in names:
            if name not in done and deps[name] <= done:
                done.add(name)
                order.append(name)
                yield from extend(done, order)
                order.pop()
                done.discard(name)

    yield from extend(set(), [])


def bound_of(graph, names, workspace=None):
    reordered = graph.replace(nodes=tuple(graph.node(n) for n in names))
    return memory_buffers(reordered, workspace).lower_bound


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_dp_matches_brute_force_and_model_matches_liveness(data):
    graph = random_graph(data)
    workspace = {n.name: data.draw(st.sampled_from([0, 0, 64, 512]), label="ws") for n in graph.nodes}
    model = memory_model(graph, workspace)
    names = [n.name for n in graph.nodes]
    index = {n: i for i, n in enumerate(names)}
    best = None
    for order in topological_orders(graph):
        bound = bound_of(graph, order, workspace)
        # the scheduler's incremental model agrees with plan_memory's liveness on every order
        assert order_peak(model, [index[n] for n in order]) == bound
        best = bound if best is None else min(best, bound)
    exact = dp_order(model, max_states=10_000)
    assert exact is not None and sorted(exact) == list(range(model.n))
    assert bound_of(graph, [names[i] for i in exact], workspace) == best
    for heuristic in (greedy_order(model), greedy_order(model, lookahead=False), eager_order(model, list(range(model.n))),
                      sink_order(model, list(range(model.n)))):
        verify(graph.replace(nodes=tuple(graph.nodes[i] for i in heuristic)))   # topological
        assert bound_of(graph, [names[i] for i in heuristic], workspace) >= best
    scheduled, report = schedule(graph, ScheduleOptions(), workspace)
    assert report.figures["peak_after"] == best == memory_buffers(scheduled, workspace).lower_bound


def wide_graph(branches=8, n=64):
    """All branch heads first, then their reductions: the given order holds every head at once."""
    b = GraphBuilder("wide")
    x = b.input("x", T((n, n)))
    heads = [b.op("exp", [b.op("scale", [x], {"factor": float(i + 1)}, name=f"s{i}")], name=f"e{i}")
             for i in range(branches)]
    sums = [b.op("sum", [h], {"axes": [1], "keepdim": False}, name=f"r{i}") for i, h in enumerate(heads)]
    total = sums[0]
    for i, s in enumerate(sums[1:]):
        total = b.op("add", [total, s], name=f"t{i}")
    b.output(total)
    return b.build()


def test_schedule_lowers_the_peak_where_the_graph_allows_and_keeps_values():
    graph = wide_graph()
    scheduled, report = schedule(graph)
    verify(scheduled)
    assert sorted(n.name for n in scheduled.nodes) == sorted(n.name for n in graph.nodes)
    size = 64 * 64 * 4
    assert report.figures["peak_before"] >= 8 * size
    assert report.figures["peak_after"] <= 2 * size + 1024
    assert memory_buffers(scheduled).lower_bound == report.figures["peak_after"]
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 0.1
    np.testing.assert_allclose(run(scheduled, {"x": x})["t6"], run(graph, {"x": x})["t6"], rtol=1e-6)


@pytest.mark.parametrize("name,dims", [("mlp", {"B": 8}), ("lenet", {"B": 4}),
                                       ("gpt", {"B": 2, "T": 16, "d": 32, "heads": 2, "layers": 2, "vocab": 64})])
def test_training_graphs_never_worse_and_same_values(name, dims):
    graph = nnc.parse(EXAMPLES / f"{name}.nn", set=dims)
    tg = training_graph(graph, None).graph
    fused, _ = fuse(prune(tg, keep_inputs=True))
    scheduled, report = schedule(fused)
    verify(scheduled)
    model = memory_model(fused)
    assert order_peak(model, list(range(model.n))) == memory_buffers(fused).lower_bound == report.figures["peak_before"]
    assert report.figures["peak_after"] <= report.figures["peak_before"]
    assert memory_buffers(scheduled).lower_bound == report.figures["peak_after"]
    rng = np.random.default_rng(1)
    inputs = {}
    for item in scheduled.inputs:
        if item.type.dtype == "i64":
            inputs[item.name] = rng.integers(0, 10 if name != "gpt" else dims["vocab"], item.type.shape)
        else:
            inputs[item.name] = rng.standard_normal(item.type.shape).astype(np.float32)
    if name == "gpt":
        inputs["positions"] = np.arange(dims["T"])
    want, got = run(fused, inputs), run(scheduled, inputs)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_bad_method_is_a_clear_error():
    with pytest.raises(nnc.NNError, match="unknown method"):
        schedule(wide_graph(2), ScheduleOptions(method="bogus"))
