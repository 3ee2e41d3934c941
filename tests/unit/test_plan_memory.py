"""plan_memory on compiled training graphs, judged by a checker written here from scratch.

The checker recomputes liveness from the node order alone (a value lives from the step that makes
it to the last step that reads it), then looks at every pair of arena values: if their bytes and
their lives intersect, they must be the same data (one is a view of the other) or a legal in-place
step (an elementwise node writing over an input of its shape and dtype that it reads for the last
time). Scratch of a node must not touch any value live at that step. Offsets are aligned and
inside the arena.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.codegen.cpp_ops_nn import workspace_bytes
from nncompile.passes.pipeline import PipelineOptions, run_pipeline
from nncompile.passes.plan_memory import INPLACE_OPS, VIEW_OPS, MemoryOptions, param_layout
from nncompile.passes.schedule import ScheduleOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GPT = {"B": 2, "T": 16, "d": 32, "heads": 2, "layers": 2, "vocab": 64}
CASES = [("mlp", {"B": 8}), ("lenet", {"B": 4}), ("gpt", GPT)]


class PlanError(AssertionError):
    pass


def check_plan(graph, plan, alignment=64):
    """Raise PlanError unless ``plan`` is a safe layout for ``graph``'s node order."""
    step = {n.name: i for i, n in enumerate(graph.nodes)}
    last = {n.name: i for i, n in enumerate(graph.nodes)}
    for i, node in enumerate(graph.nodes):
        for src in node.inputs:
            if src in last:
                last[src] = max(last[src], i)
    values = []
    for node in graph.nodes:
        kind, where, _ = plan.storage[node.name]
        if kind != "arena":
            continue
        lo, hi = where, where + node.type.nbytes
        if lo % alignment or hi > plan.arena_bytes or lo < 0:
            raise PlanError(f"{node.name}: [{lo}, {hi}) misaligned or outside the arena {plan.arena_bytes}")
        values.append((node.name, lo, hi, step[node.name], last[node.name]))

    def base(name):           # the value whose data ``name`` shows through views only
        node = graph.node(name)
        while node.op in VIEW_OPS and node.inputs[0] in step:
            node = graph.node(node.inputs[0])
        return node.name

    def same_data(a, b):      # one reads the other through views, or both are views of one value
        return base(a) == base(b)

    def in_place(a, b, a_last, b_first, lo, hi, a_lo, a_hi):
        node = graph.node(b)
        ok_op = node.op in INPLACE_OPS or (node.op == "fused" and node.attrs["body"][0][0] not in
                                           ("linear", "matmul", "conv2d"))
        t = graph.type_of(a)
        return (ok_op and a in node.inputs and a_last == b_first and (lo, hi) == (a_lo, a_hi)
                and t.shape == node.type.shape and t.dtype == node.type.dtype)

    for i, (a, alo, ahi, afirst, alast) in enumerate(values):
        for b, blo, bhi, bfirst, blast in values[i + 1:]:
            if not (alo < bhi and blo < ahi and afirst <= blast and bfirst <= alast):
                continue
            if same_data(a, b):
                continue
            if in_place(a, b, alast, bfirst, blo, bhi, alo, ahi) or in_place(b, a, blast, afirst, alo, ahi, blo, bhi):
                continue
            raise PlanError(f"{a} [{alo}, {ahi}) steps {afirst}..{alast} overlaps {b} [{blo}, {bhi}) "
                            f"steps {bfirst}..{blast}")
    for name, offset in plan.workspace.items():
        s = step[name]
        size = workspace_bytes(graph, graph.node(name))
        if offset % alignment or offset + size > plan.arena_bytes:
            raise PlanError(f"scratch of {name} misaligned or outside the arena")
        for v, lo, hi, first, lastuse in values:
            if first <= s <= lastuse and lo < offset + size and offset < hi:
                raise PlanError(f"scratch of {name} overlaps {v} at step {s}")


def compiled_training_plan(name, dims, **memory):
    from nncompile.codegen import register_rules

    register_rules()
    graph = nnc.parse(EXAMPLES / f"{name}.nn", set=dims)
    tg = training_graph(graph, None)
    options = PipelineOptions(memory=MemoryOptions(**memory))
    return run_pipeline(tg.graph, options, workspace_bytes, param_layout(graph.params), True)


@pytest.mark.parametrize("name,dims", CASES)
@pytest.mark.parametrize("memory", [{}, {"inplace": False, "blocks": "off"}, {"blocks": "on"}])
def test_training_plan_passes_the_independent_checker(name, dims, memory):
    lowered, reports, plan = compiled_training_plan(name, dims, **memory)
    check_plan(lowered, plan)
    figures = reports[-1].figures
    assert plan.arena_bytes <= 1.01 * plan.lower_bound
    assert plan.lower_bound <= plan.arena_bytes <= figures["no_reuse_bytes"]
    assert figures["greedy_arena"] >= plan.lower_bound
    # plan.json holds every buffer with its lifetime, size and offset, consistent with the storage
    for b in plan.buffers:
        assert b["end"] > b["start"] and b["size"] > 0 and b["offset"] + b["size"] <= plan.arena_bytes
        for value in b["values"] if b["kind"] == "value" else ():
            assert plan.storage[value] == ("arena", b["offset"], 0)
    if memory.get("inplace", True) and name == "gpt":
        assert plan.inplace, "training graphs have elementwise steps that can run in place"


def test_checker_catches_a_bad_plan():
    lowered, _, plan = compiled_training_plan("mlp", {"B": 8})
    check_plan(lowered, plan)
    arena = [n for n in lowered.nodes if plan.storage[n.name][0] == "arena" and n.op not in VIEW_OPS]
    # two values live at the same time put at the same offset
    first = next(n for n in arena if any(n.name in m.inputs for m in lowered.nodes[lowered.nodes.index(n) + 2:]))
    later = lowered.nodes[lowered.nodes.index(first) + 1]
    assert plan.storage[later.name][0] == "arena" or later.op in VIEW_OPS
    bad = dict(plan.storage)
    victim = next(n for n in lowered.nodes[lowered.nodes.index(first) + 1:]
                  if plan.storage[n.name][0] == "arena" and n.op not in VIEW_OPS and n.name not in plan.inplace)
    bad[victim.name] = plan.storage[first.name]
    plan.storage = bad
    with pytest.raises(PlanError):
        check_plan(lowered, plan)


def test_inplace_lowers_the_bound_or_keeps_it():
    _, _, with_inplace = compiled_training_plan("gpt", GPT)
    _, _, without = compiled_training_plan("gpt", GPT, inplace=False)
    assert with_inplace.lower_bound <= without.lower_bound
    assert with_inplace.figures["no_reuse_bytes"] < without.figures["no_reuse_bytes"]


@pytest.mark.slow
def test_gpt_12_layers_bilevel_plan_is_fast_and_tight():
    dims = {"B": 4, "T": 64, "d": 128, "heads": 4, "layers": 12, "vocab": 512}
    from nncompile.solvers.packing_blocks import plan_with_blocks, transformer_trace

    plan_with_blocks(*transformer_trace(48))        # load the numba-compiled packers once
    started = time.perf_counter()
    lowered, reports, plan = compiled_training_plan("gpt", dims, blocks="on")
    figures = reports[-1].figures
    assert figures["method"] == "blocks" and figures["block_kinds"] >= 2
    assert figures["blocks_seconds"] < 2.0, figures
    assert plan.arena_bytes <= 1.01 * plan.lower_bound
    check_plan(lowered, plan)
    assert time.perf_counter() - started < 60


def test_memory_png_draws_buffers_where_they_are(tmp_path):
    PIL = pytest.importorskip("PIL.Image")       # an independent PNG decoder
    from nncompile.report_png import write_memory_png

    memory = {"arena_bytes": 1000, "lower_bound": 1000, "buffers": [
        {"start": 0, "end": 5, "offset": 0, "size": 500, "kind": "value"},
        {"start": 5, "end": 10, "offset": 500, "size": 500, "kind": "work"},
    ]}
    path = write_memory_png(tmp_path / "m.png", memory, width=208, height=108)
    image = np.asarray(PIL.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    assert image.shape == (108, 208, 3)
    inner = (245, 245, 245)
    # pad 8, inner 192 x 92: buffer 0 covers x 8..104, y 54..100 (bottom half, left half)
    assert tuple(image[80, 50]) != inner and tuple(image[80, 50]) != (170, 170, 170)
    assert tuple(image[30, 150]) == (170, 170, 170)          # the scratch buffer, top right, grey
    assert tuple(image[30, 50]) == inner                     # nothing lives there
    assert tuple(image[80, 150]) == inner
    assert tuple(image[2, 2]) == (255, 255, 255)             # margin
