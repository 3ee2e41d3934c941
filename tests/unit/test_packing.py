"""Memory-plan solvers against brute force on tiny instances and the lower bound on real traces."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompile.errors import SolverError
from nncompile.solvers import packing_decompose, packing_greedy, packing_native, packing_search
from nncompile.solvers.packing import Buffer, Problem, lower_bound, max_live_bytes, plan_offsets, validate

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
MINIMALLOC = DATASETS / "minimalloc"
TRACES = DATASETS / "dsa-traces"


def load_csv(path: Path) -> list[Buffer]:
    rows = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.int64, usecols=(1, 2, 3), ndmin=2)
    return [Buffer(i, int(lo), int(hi), int(size)) for i, (lo, hi, size) in enumerate(rows)]


def brute_force_arena(buffers: list[Buffer]) -> int:
    """Optimum by enumeration: every order, each buffer at its lowest free aligned offset.

    Placing the buffers of an optimal plan in order of their offsets, each at its lowest free
    offset, never puts one higher than in that plan, so the best order reaches the optimum.
    """
    best = None
    for order in itertools.permutations(range(len(buffers))):
        placed: list[tuple[int, int, int, int]] = []  # start, end, offset, top
        for i in order:
            b = buffers[i]
            busy = sorted((o, t) for s, e, o, t in placed if s < b.end and b.start < e)
            offset = 0
            for lo, hi in busy:
                if offset + b.size <= lo:
                    break
                offset = max(offset, -(-hi // b.align) * b.align)
            placed.append((b.start, b.end, offset, offset + b.size))
        arena = max(t for *_, t in placed)
        best = arena if best is None else min(best, arena)
    return best


@st.composite
def tiny_instances(draw, max_buffers=6):
    n = draw(st.integers(1, max_buffers))
    buffers = []
    for i in range(n):
        start = draw(st.integers(0, 5))
        end = draw(st.integers(start + 1, 7))
        size = draw(st.integers(1, 6))
        align = draw(st.sampled_from([1, 1, 2, 4]))
        buffers.append(Buffer(i, start, end, size, align))
    return buffers


def live_bytes_naive(buffers: list[Buffer]) -> int:
    times = {b.start for b in buffers}
    return max(sum(b.size for b in buffers if b.start <= t < b.end) for t in times)


# ---- interface, bound and checker -------------------------------------------------------------

def test_readme_example_and_bound():
    bufs = [Buffer("a", 0, 2, 4), Buffer("b", 1, 3, 4), Buffer("c", 2, 4, 4)]
    p = plan_offsets(bufs, alignment=1)
    assert p.arena == p.lower_bound == 8
    assert p.status == "optimal" and p.gap == 0.0
    assert validate(bufs, p.offsets) == 8


@given(tiny_instances(max_buffers=8))
@settings(max_examples=60, deadline=None)
def test_lower_bound_matches_naive_sweep(buffers):
    assert lower_bound(buffers) == live_bytes_naive(buffers)


def test_validate_rejects_bad_plans():
    bufs = [Buffer("a", 0, 2, 4), Buffer("b", 1, 3, 4, align=4)]
    assert validate(bufs, {"a": 0, "b": 4}) == 8
    with pytest.raises(SolverError, match="overlap"):
        validate(bufs, {"a": 0, "b": 0})
    with pytest.raises(SolverError, match="overlap"):
        validate([Buffer("a", 0, 2, 4), Buffer("b", 1, 3, 4)], {"a": 0, "b": 3})
    with pytest.raises(SolverError, match="multiple"):
        validate(bufs, {"a": 0, "b": 5})
    with pytest.raises(SolverError, match="capacity"):
        validate(bufs, {"a": 0, "b": 4}, capacity=7)
    with pytest.raises(SolverError, match="no offset"):
        validate(bufs, {"a": 0})
    # touching lifetimes do not conflict: [0, 2) and [2, 4)
    assert validate([Buffer("a", 0, 2, 4), Buffer("b", 2, 4, 4)], {"a": 0, "b": 0}) == 4


def test_bad_buffers_are_rejected():
    with pytest.raises(SolverError, match="empty lifetime"):
        plan_offsets([Buffer("a", 3, 3, 4)])
    with pytest.raises(SolverError, match="negative size"):
        plan_offsets([Buffer("a", 0, 3, -1)])
    with pytest.raises(SolverError, match="duplicate"):
        plan_offsets([Buffer("a", 0, 3, 1), Buffer("a", 1, 2, 1)])
    with pytest.raises(SolverError, match="unknown method"):
        plan_offsets([Buffer("a", 0, 3, 1)], method="magic")


def test_default_alignment_is_64():
    bufs = [Buffer(i, 0, 2, 10) for i in range(3)]
    p = plan_offsets(bufs)
    assert all(off % 64 == 0 for off in p.offsets.values())
    assert validate([Buffer(b.id, b.start, b.end, b.size, 64) for b in bufs], p.offsets) == p.arena == 138


# ---- exact solvers against brute force ------------------------------------------------------

@given(tiny_instances())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_search_matches_brute_force(buffers):
    p = plan_offsets(buffers, method="search", alignment=None, time_limit=5, greedy_shortcut=False)
    assert validate(buffers, p.offsets) == p.arena
    assert p.status == "optimal"
    assert p.arena == brute_force_arena(buffers)


@given(tiny_instances(max_buffers=5))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_cpsat_matches_brute_force(buffers):
    p = plan_offsets(buffers, method="cpsat", alignment=None, time_limit=5, greedy_shortcut=False)
    assert validate(buffers, p.offsets) == p.arena
    assert p.status == "optimal" and p.method == "cpsat"
    assert p.arena == brute_force_arena(buffers)


@given(tiny_instances(), st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fits_decides_capacity_both_engines(buffers, native):
    if native and packing_native.load() is None:
        pytest.skip(f"no native search: {packing_native.build_error()}")
    optimum = brute_force_arena(buffers)
    problem = Problem.from_buffers(buffers)
    deadline = time.perf_counter() + 5
    status, offsets, _ = packing_search.fits(problem, optimum, deadline, native=native)
    assert status == "found"
    assert validate(buffers, dict(zip(problem.ids, offsets.tolist())), capacity=optimum) <= optimum
    status, _, _ = packing_search.fits(problem, optimum - 1, deadline, native=native)
    assert status == "infeasible"


@given(tiny_instances(max_buffers=9))
@settings(max_examples=40, deadline=None)
def test_native_incremental_order_explores_the_same_tree(buffers):
    """The C++ core keeps large partitions in an incremental order and re-sorts small ones; both
    must walk exactly the same search tree."""
    module = packing_native.load()
    if module is None:
        pytest.skip(f"no native search: {packing_native.build_error()}")
    p = Problem.from_buffers(buffers)
    for capacity in (lower_bound(buffers), packing_greedy.greedy_offsets(p).arena - 1):
        args = (p.start, p.end, p.size, p.align, capacity, 5.0, [])
        sorted_run = module.solve(*args, indexed_min=10**9)
        indexed_run = module.solve(*args, indexed_min=0)
        assert sorted_run[0] == indexed_run[0]
        assert sorted_run[2:] == indexed_run[2:]
        assert list(sorted_run[1]) == list(indexed_run[1])


@given(tiny_instances(max_buffers=8))
@settings(max_examples=40, deadline=None)
def test_greedy_orderings_are_valid(buffers):
    problem = Problem.from_buffers(buffers)
    for name in packing_greedy.ORDERINGS:
        order, best_fit = packing_greedy.ordering(problem, name)
        offsets = packing_greedy.place(problem, order, best_fit, gravity=name.startswith("gravity"))
        arena = validate(buffers, dict(zip(problem.ids, offsets.tolist())))
        assert arena >= lower_bound(buffers)


def test_capacity_answers():
    bufs = load_csv(MINIMALLOC / "input.12.csv") if MINIMALLOC.exists() else [
        Buffer("b1", 0, 3, 4), Buffer("b2", 3, 9, 4), Buffer("b3", 0, 9, 4), Buffer("b4", 9, 21, 4),
        Buffer("b5", 0, 21, 4)]
    for method in ("auto", "search", "cpsat"):
        p = plan_offsets(bufs, capacity=12, method=method, alignment=None)
        assert p.status == "optimal", method
        assert validate(bufs, p.offsets, capacity=12) <= 12
        assert plan_offsets(bufs, capacity=11, method=method, alignment=None).status == "infeasible"


def test_greedy_alone_is_not_a_proof():
    # greedy by size cannot pack this at the bound, but the search can
    bufs = [Buffer(0, 0, 2, 2), Buffer(1, 1, 3, 1), Buffer(2, 2, 4, 2), Buffer(3, 0, 1, 1), Buffer(4, 3, 4, 1)]
    optimum = brute_force_arena(bufs)
    p = plan_offsets(bufs, method="search", alignment=None)
    assert p.arena == optimum and p.status == "optimal"


# ---- decomposition ---------------------------------------------------------------------------

def synthetic_trace(n: int, seed: int) -> list[Buffer]:
    rng = np.random.default_rng(seed)
    bufs = []
    for i in range(n):
        start = int(rng.integers(0, n // 4))
        length = int(rng.choice([1, 2, 3, 5, 8, 40, 400], p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.07, 0.03]))
        bufs.append(Buffer(i, start, start + length, int(rng.integers(1, 64)) * 256))
    return bufs


def test_decomposition_is_valid_and_near_the_bound():
    bufs = synthetic_trace(6000, seed=1)
    problem = Problem.from_buffers(bufs)
    cuts = packing_decompose.choose_cuts(problem, window_buffers=500)
    assert len(cuts) > 3 and np.all(np.diff(cuts) > 0)
    p = plan_offsets(bufs, method="decompose", alignment=None, time_limit=5)
    assert validate(bufs, p.offsets) == p.arena
    assert p.lower_bound <= p.arena <= 1.1 * p.lower_bound
    assert p.details["windows"] == len(packing_decompose.choose_cuts(problem)) + 1


def test_window_resolve_keeps_crossing_buffers():
    bufs = synthetic_trace(3000, seed=2)
    problem = Problem.from_buffers(bufs)
    base = packing_greedy.greedy_offsets(problem, orderings=("start",))
    cuts = packing_decompose.choose_cuts(problem, window_buffers=300)
    first, last = packing_decompose.windows_of(problem, cuts)
    w = 2
    local = np.nonzero((first == w) & (last == w))[0]
    crossing = np.nonzero(first != last)[0]
    new, _ = packing_decompose._resolve_window(problem, base.offsets, local, crossing, time.perf_counter() + 5)
    assert np.array_equal(new[crossing], base.offsets[crossing])
    validate(bufs, dict(zip(problem.ids, new.tolist())))
    assert (new[local] + problem.size[local]).max() <= (base.offsets[local] + problem.size[local]).max()


# ---- real traces -----------------------------------------------------------------------------

@pytest.mark.skipif(not TRACES.exists(), reason="dsa-traces dataset absent")
def test_resnet50_trace_near_bound():
    bufs = load_csv(TRACES / "somas_tensors_resnet50.csv")
    p = plan_offsets(bufs, alignment=None, time_limit=10)
    assert p.lower_bound == 1515472556  # README figure
    assert validate(bufs, p.offsets) == p.arena
    assert p.lower_bound <= p.arena <= 1.02 * p.lower_bound


@pytest.mark.skipif(not MINIMALLOC.exists(), reason="minimalloc dataset absent")
def test_minimalloc_example_at_capacity_12():
    bufs = load_csv(MINIMALLOC / "input.12.csv")
    p = plan_offsets(bufs, capacity=12, alignment=None)
    assert p.status == "optimal" and validate(bufs, p.offsets, capacity=12) == 12


@pytest.mark.slow
@pytest.mark.skipif(not MINIMALLOC.exists(), reason="minimalloc dataset absent")
@pytest.mark.parametrize("name", ["C", "K"])
def test_minimalloc_hard_instance_fits(name):
    if packing_native.load() is None:
        pytest.skip(f"no native search: {packing_native.build_error()}")
    bufs = load_csv(MINIMALLOC / f"{name}.1048576.csv")
    p = plan_offsets(bufs, capacity=1 << 20, alignment=None, method="search", time_limit=20)
    assert p.status == "optimal"
    assert validate(bufs, p.offsets, capacity=1 << 20) <= 1 << 20
    assert max_live_bytes(*(np.array([getattr(b, f) for b in bufs]) for f in ("start", "end", "size"))) == p.lower_bound


@pytest.mark.slow
@pytest.mark.skipif(not TRACES.exists(), reason="dsa-traces dataset absent")
@pytest.mark.parametrize("name", ["somas_tensors_pangu_2.6B", "iopddl_S_1"])
def test_large_trace_within_one_percent(name):
    bufs = load_csv(TRACES / f"{name}.csv")
    started = time.perf_counter()
    p = plan_offsets(bufs, alignment=None, time_limit=5)
    assert time.perf_counter() - started < 20
    assert p.method == "decompose"
    assert validate(bufs, p.offsets) == p.arena
    assert p.lower_bound <= p.arena <= 1.01 * p.lower_bound


def test_exact_methods_refuse_huge_traces():
    bufs = [Buffer(i, i, i + 2, 1) for i in range(packing_decompose.FLAT_LIMIT + 1)]
    with pytest.raises(SolverError, match="handles up to"):
        plan_offsets(bufs, method="search")


@pytest.mark.skipif(not MINIMALLOC.exists(), reason="minimalloc dataset absent")
@pytest.mark.parametrize("method", ["search", "cpsat"])
def test_time_limit_is_respected(method):
    bufs = load_csv(MINIMALLOC / "J.1048576.csv")
    started = time.perf_counter()
    p = plan_offsets(bufs, method=method, alignment=None, time_limit=1.0)
    assert time.perf_counter() - started < 3.0
    assert validate(bufs, p.offsets) == p.arena
    assert p.status in ("timeout", "feasible", "optimal")
    assert p.lower_bound <= p.arena <= p.details["greedy_arena"]
    assert 0.0 <= p.gap < 1.0


def test_python_search_is_used_without_the_native_core(monkeypatch):
    monkeypatch.setattr(packing_native, "_tried", True)
    monkeypatch.setattr(packing_native, "_module", None)
    bufs = [Buffer(0, 0, 2, 2), Buffer(1, 1, 3, 1), Buffer(2, 2, 4, 2), Buffer(3, 0, 1, 1), Buffer(4, 3, 4, 1)]
    p = plan_offsets(bufs, method="search", alignment=None, greedy_shortcut=False)
    assert p.arena == brute_force_arena(bufs) and p.status == "optimal"
    if p.details.get("probes"):
        assert p.details["engine"] == "python"
    with pytest.raises(RuntimeError, match="unavailable"):
        packing_search.fits(Problem.from_buffers(bufs), 10, time.perf_counter() + 1, native=True)
