"""Recomputation model and simulator: hand-made cases, loaders, budgets."""
from __future__ import annotations

import json

import pytest

from nncompile.errors import InputError
from nncompile.solvers.remat_graph import graph_from_node_link, load_graph, make_graph, parse_budget
from nncompile.solvers.remat_sim import (buffer_lifetimes, copy_inputs, plain_peak, plain_schedule, schedule_from_sequence,
                                         schedule_to_json, sequence_profile, simulate)


def chain(mems, costs=None):
    n = len(mems)
    return make_graph(costs or [1] * n, mems, [(i, i + 1) for i in range(n - 1)])


def test_chain_plain_schedule_by_hand():
    g = chain([1, 2, 3])
    steps = plain_schedule(g)
    assert steps == [("compute", 0), ("compute", 1), ("free", 0), ("compute", 2), ("free", 1), ("free", 2)]
    result = simulate(g, steps)
    # after compute 2: outputs of 1 (2 bytes) and 2 (3 bytes) are resident
    assert result.valid and result.peak == 5 and result.compute == 3 and result.recomputed == ()


def test_skip_connection_keeps_the_early_output():
    # 0 -> 1 -> 2 -> 3 and 0 -> 3: output 0 stays resident until 3 runs
    g = make_graph([1, 1, 1, 1], [10, 1, 1, 1], [(0, 1), (1, 2), (2, 3), (0, 3)])
    result = simulate(g, plain_schedule(g))
    # after compute 2: {0, 1, 2} = 12; after compute 3: {0, 2, 3} = 12
    assert result.valid and result.peak == 12 == plain_peak(g)


def test_recompute_sequence_lowers_peak_and_costs_compute():
    # 0 is big and used at the start and the end; recomputing it before 4 frees it in between
    g = make_graph([5, 1, 1, 1, 1], [10, 1, 9, 1, 1], [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)])
    plain = simulate(g, plain_schedule(g))
    assert plain.peak == 20  # after compute 2: {0, 1, 2}
    steps = schedule_from_sequence(g, [0, 1, 2, 3, 0, 4])
    assert steps[:3] == [("compute", 0), ("compute", 1), ("free", 0)]
    result = simulate(g, steps)
    assert result.valid and result.recomputed == (0,)
    assert result.compute == plain.compute + 5
    # after the recompute of 0: {3, 0} = 11; after compute 4: {3, 0, 4} = 12
    assert result.peak == 12 == sequence_profile(g, [0, 1, 2, 3, 0, 4]).peak


def test_simulator_rejects_invalid_schedules():
    g = chain([1, 1, 1])
    missing_input = simulate(g, [("compute", 0), ("free", 0), ("compute", 1), ("compute", 2)])
    assert not missing_input.valid and "needs [0]" in missing_input.errors[0]
    double_free = simulate(g, [("compute", 0), ("free", 0), ("free", 0), ("compute", 0), ("compute", 1), ("compute", 2)])
    assert not double_free.valid and "not resident" in double_free.errors[0]
    never = simulate(g, [("compute", 0), ("compute", 1)])
    assert not never.valid and "never computed" in never.errors[-1]
    bad_node = simulate(g, [("compute", 7)])
    assert not bad_node.valid


def test_schedule_from_sequence_rejects_unmet_inputs():
    g = chain([1, 1, 1])
    with pytest.raises(ValueError):
        sequence_profile(g, [1, 0, 2])


def test_buffer_lifetimes_max_live_equals_peak():
    g = make_graph([1] * 5, [3, 1, 4, 1, 5], [(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (1, 4)])
    sequence = [0, 1, 2, 3, 1, 4]
    buffers = buffer_lifetimes(g, sequence)
    live = [sum(size for start, end, size in buffers if start <= t < end) for t in range(len(sequence))]
    assert max(live) == sequence_profile(g, sequence).peak == simulate(g, schedule_from_sequence(g, sequence)).peak


def test_floor_is_largest_inputs_plus_output():
    g = make_graph([1, 1, 1], [2, 3, 4], [(0, 2), (1, 2)])
    assert g.floor_bytes() == 9


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_checkmate_flavour(tmp_path):
    data = {"directed": True, "graph": {"name": "t"},
            "nodes": [{"id": 0, "name": "a", "backward": False, "cost_cpu": 3, "cost_ram": 10},
                      {"id": 1, "name": "loss", "backward": True, "cost_cpu": 1, "cost_ram": 1},
                      {"id": 2, "name": "a_grad", "backward": True, "cost_cpu": 4, "cost_ram": 10}],
            "links": [{"source": 0, "target": 1}, {"source": 0, "target": 2}, {"source": 1, "target": 2}]}
    g = load_graph(write(tmp_path, "g.json", data))
    assert g.n == 3 and g.cost == (3.0, 1.0, 4.0) and g.mem == (10, 1, 10)
    assert g.backward == (False, True, True) and g.preds[2] == (0, 1)


def test_load_random_layered_flavour_uses_given_order(tmp_path):
    # ids are not topological; graph.order is
    data = {"graph": {"order": [5, 3, 9]},
            "nodes": [{"name": 9, "duration": 1, "out_cost": 2}, {"name": 3, "duration": 2, "out_cost": 3},
                      {"name": 5, "duration": 4, "out_cost": 5}],
            "links": [{"0": 5, "1": 3}, {"0": 3, "1": 9}, {"0": 5, "1": 9}]}
    g = load_graph(write(tmp_path, "r.json", data))
    assert [g.source_id(v) for v in range(3)] == [5, 3, 9]
    assert g.mem == (5, 3, 2) and g.preds[2] == (0, 1)
    steps = schedule_to_json(g, plain_schedule(g))
    assert steps[0] == {"op": "compute", "node": 5, "name": "5"}


@pytest.mark.parametrize("text, fragment", [
    ('{"nodes": [1, 2', "invalid JSON"),
    ('[1, 2]', "not a node-link graph"),
    ('{"nodes": [{"id": 0, "cost_cpu": 1}], "links": []}', "cost_ram"),
    ('{"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 1}], "links": [{"source": 0, "target": 4}]}', "unknown node"),
    ('{"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 1}, {"id": 1, "cost_cpu": 1, "cost_ram": 1}],'
     ' "links": [{"source": 0, "target": 1}, {"source": 1, "target": 0}]}', "cycle"),
    ('{"nodes": [{"id": 0, "cost_cpu": -1, "cost_ram": 1}], "links": []}', "non-negative"),
])
def test_bad_graph_files_raise_located_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_graph(path)
    assert fragment in info.value.format() and str(path) in info.value.format()


def test_non_topological_ids_are_sorted():
    data = {"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 1}, {"id": 1, "cost_cpu": 1, "cost_ram": 2}],
            "links": [{"source": 1, "target": 0}]}
    g = graph_from_node_link(data)
    assert [g.source_id(v) for v in range(2)] == [1, 0] and g.preds[1] == (0,)


@pytest.mark.parametrize("text, expected", [
    ("0.7", 700), ("70%", 700), ("1", 1000), ("1.5", 1500), ("250", 250), ("2e3", 2000),
    ("1KB", 1000), ("1KiB", 1024), ("0.001GB", 1000000),
])
def test_parse_budget(text, expected):
    assert parse_budget(text, 1000) == expected


@pytest.mark.parametrize("text", ["abc", "-0.5", "0", "10 parsecs", "0%"])
def test_parse_budget_rejects(text):
    with pytest.raises(InputError):
        parse_budget(text, 1000)


def test_copy_inputs_wires_recomputed_copies():
    g = make_graph([5, 1, 1, 1, 1], [10, 1, 9, 1, 1], [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)])
    wiring = copy_inputs(g, [0, 1, 2, 3, 0, 4])
    # op 4 reads op 0's second copy (position 4) and op 3 (position 3)
    assert g.preds[4] == (0, 3) and wiring[5] == (4, (4, 3))
    assert wiring[1] == (1, (0,))
    with pytest.raises(ValueError):
        copy_inputs(g, [1, 0])
