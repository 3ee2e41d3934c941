"""Recomputation solvers: exact == brute force on tiny graphs, fast never over budget and monotone,
both against the reference overheads of the remat-graphs dataset."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompile.errors import SolverError
from nncompile.solvers.remat import plan_recompute
from nncompile.solvers.remat_fast import solve_fast, walk_path
from nncompile.solvers.remat_graph import load_graph, make_graph
from nncompile.solvers.remat_sim import plain_peak, schedule_from_sequence, sequence_profile, simulate

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "remat-graphs"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="remat-graphs dataset not present")

# README of the dataset: exact Checkmate MILP overheads at 0.9 / 0.7 / 0.5 of the plain peak
REFERENCE = {
    ("unet_b32", 0.9): 1.011, ("unet_b32", 0.7): 1.030, ("unet_b32", 0.5): 1.070,
    ("mobilenet_b512", 0.9): 1.002, ("mobilenet_b512", 0.7): 1.006, ("mobilenet_b512", 0.5): 1.016,
    ("fcn8_b32", 0.9): 1.000, ("fcn8_b32", 0.7): 1.009,
    ("segnet_b32", 0.9): 1.001, ("segnet_b32", 0.7): 1.003,
    ("vgg16_b256", 0.9): 1.020,
}


def brute_force(graph, budget):
    """Least compute over every stage-structured sequence (stage t: any earlier ops again, then t)."""
    best = None
    choices = [list(itertools.chain.from_iterable(itertools.combinations(range(t), k) for k in range(t + 1)))
               for t in range(graph.n)]
    for picks in itertools.product(*choices):
        sequence = []
        for t, again in enumerate(picks):
            sequence.extend(again)
            sequence.append(t)
        try:
            profile = sequence_profile(graph, sequence)
        except ValueError:
            continue
        if profile.peak <= budget and (best is None or profile.compute < best):
            best = profile.compute
    return best


def random_dag(rng, n):
    edges = [(u, v) for v in range(1, n) for u in range(v) if rng.random() < 0.45]
    for v in range(1, n):  # keep it connected in order
        if not any(e[1] == v for e in edges):
            edges.append((v - 1, v))
    return make_graph([rng.randint(1, 9) for _ in range(n)], [rng.randint(1, 9) for _ in range(n)], edges)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(3, 5), slack=st.floats(0.0, 1.0))
def test_exact_matches_brute_force_on_tiny_graphs(seed, n, slack):
    graph = random_dag(random.Random(seed), n)
    peak0 = plain_peak(graph)
    budget = int(graph.floor_bytes() + slack * (peak0 - graph.floor_bytes()))
    optimum = brute_force(graph, budget)
    if optimum is None:
        with pytest.raises(SolverError):
            plan_recompute(graph, budget, method="exact", time_limit=10, use_packing=False)
        return
    plan = plan_recompute(graph, budget, method="exact", time_limit=10, use_packing=False)
    assert plan.compute == pytest.approx(optimum)
    assert plan.status == "optimal"
    check = simulate(graph, plan.steps)
    assert check.valid and check.peak <= budget
    fast = solve_fast(graph, budget)
    if fast is not None:  # a heuristic may miss tight budgets, but never beats the optimum
        assert fast.peak <= budget and fast.compute >= optimum - 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 30))
def test_fast_path_is_valid_never_over_budget_and_monotone(seed, n):
    graph = random_dag(random.Random(seed), n)
    previous = None
    for plan in walk_path(graph):
        steps = schedule_from_sequence(graph, plan.sequence)
        check = simulate(graph, steps)
        assert check.valid and check.peak == plan.peak and check.compute == pytest.approx(plan.compute)
        assert plan.peak >= graph.floor_bytes()
        if previous is not None:
            assert plan.peak < previous
        previous = plan.peak
    # every budget on the way gets the first path plan that fits, so peaks follow the budget down
    peak0 = plain_peak(graph)
    peaks = []
    for fraction in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]:
        plan = solve_fast(graph, int(fraction * peak0))
        if plan is None:
            break
        assert plan.peak <= fraction * peak0
        peaks.append(plan.peak)
    assert peaks == sorted(peaks, reverse=True)


def test_infeasible_budget_names_the_floor_and_the_least_found():
    # 0 (big) feeds 1 and 3; no schedule fits below op 3's inputs + output
    graph = make_graph([1, 1, 1, 1], [10, 1, 1, 1], [(0, 1), (1, 2), (2, 3), (0, 3)])
    with pytest.raises(SolverError) as info:
        plan_recompute(graph, 5, use_packing=False)
    text = info.value.format()
    assert "infeasible" in text and str(graph.floor_bytes()) in text


@needs_data
@pytest.mark.parametrize("name", ["unet_b32", "mobilenet_b512"])
def test_fast_sweep_with_planned_arena_is_monotone(name):
    graph = load_graph(DATA / f"{name}_train.json")
    peak0 = plain_peak(graph)
    arenas = []
    for step in range(0, 27):
        budget = int((1.0 - 0.025 * step) * peak0)
        try:
            plan = plan_recompute(graph, budget, method="fast")
        except SolverError:
            break
        check = simulate(graph, plan.steps)
        assert check.valid and check.peak <= plan.arena <= budget
        arenas.append(plan.arena)
    assert len(arenas) >= 15
    assert arenas == sorted(arenas, reverse=True)


@needs_data
@pytest.mark.parametrize("name, fraction", sorted(REFERENCE))
def test_fast_within_one_percent_of_reference(name, fraction):
    graph = load_graph(DATA / f"{name}_train.json")
    plan = plan_recompute(graph, int(fraction * plain_peak(graph)), method="fast")
    assert plan.arena <= plan.budget and simulate(graph, plan.steps).valid
    assert plan.overhead <= REFERENCE[name, fraction] * 1.01


@needs_data
def test_resnet50_fast_at_half_budget():
    graph = load_graph(DATA / "resnet50_b256_train.json")
    plan = plan_recompute(graph, int(0.5 * plain_peak(graph)), method="fast")
    check = simulate(graph, plan.steps)
    assert check.valid and check.peak <= plan.arena <= plan.budget
    assert 1.0 < plan.overhead < 1.05


@needs_data
def test_vgg16_below_floor_is_infeasible():
    graph = load_graph(DATA / "vgg16_b256_train.json")
    with pytest.raises(SolverError) as info:
        plan_recompute(graph, int(0.7 * plain_peak(graph)))
    assert str(graph.floor_bytes()) in info.value.format()


@needs_data
def test_exact_vgg16_matches_reference():
    graph = load_graph(DATA / "vgg16_b256_train.json")
    plan = plan_recompute(graph, int(0.9 * plain_peak(graph)), method="exact", time_limit=20)
    assert plan.status == "optimal"
    assert plan.overhead <= 1.020 + 5e-4
    assert simulate(graph, plan.steps).peak <= plan.budget


@needs_data
@pytest.mark.slow
def test_exact_unet_matches_reference():
    graph = load_graph(DATA / "unet_b32_train.json")
    plan = plan_recompute(graph, int(0.7 * plain_peak(graph)), method="exact", time_limit=120)
    assert simulate(graph, plan.steps).peak <= plan.arena <= plan.budget
    fast = plan_recompute(graph, plan.budget, method="fast")
    assert plan.overhead <= fast.overhead + 1e-9
    if plan.status == "optimal":  # proved within the limit (about 20 s on an idle core)
        assert plan.overhead <= 1.030 + 5e-4


def test_without_packing_the_budget_is_judged_by_max_live_bytes():
    graph = random_dag(random.Random(7), 12)
    budget = list(walk_path(graph))[-1].peak  # the least peak the fast path reaches
    assert budget < plain_peak(graph)
    plan = plan_recompute(graph, budget, use_packing=False)
    assert plan.arena_method == "max-live" and plan.arena == plan.peak <= budget
    assert any("max-live" in note for note in plan.notes)


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_bilevel_tightens_when_the_planned_arena_misses(monkeypatch, method):
    """A planner that wastes 10% forces a plan whose max-live bytes leave room for the waste."""
    from nncompile.solvers import remat

    def wasteful_arena(self, sequence, budget=None):
        return int(sequence_profile(self.graph, sequence).peak * 1.1)

    monkeypatch.setattr(remat.ArenaChecker, "arena", wasteful_arena)
    graph = make_graph([3, 1, 2, 1, 1, 2, 1], [8, 2, 6, 1, 3, 5, 2],
                       [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (0, 6), (1, 5), (2, 4)])
    peak0 = plain_peak(graph)
    budget = int(0.95 * peak0)
    plan = plan_recompute(graph, budget, method=method, time_limit=20)
    assert plan.arena <= budget and plan.peak * 1.1 <= budget + 1
    direct = solve_fast(graph, budget)
    assert direct is None or direct.peak * 1.1 > budget or plan.compute <= direct.compute
