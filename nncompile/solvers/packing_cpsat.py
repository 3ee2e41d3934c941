"""Exact packing on OR-Tools CP-SAT: rectangles in (time x address) with NoOverlap2D.

Each buffer is a fixed time interval ``[start, end)`` and an address interval ``[k*align,
k*align + size)`` with integer ``k``; ``AddNoOverlap2D`` keeps rectangles apart. The objective is
the arena (an upper variable above every buffer's top), bounded below by the max-live bytes; with
a capacity the model is a feasibility problem with every top <= capacity. The greedy answer is
given as a hint (``AddHint``) so the solver starts from a good solution. The result reports
CP-SAT's own status and best bound, so the gap is the solver's proven gap.

Pairs of buffers that never live together need no constraint, which ``AddNoOverlap2D`` handles
through the time intervals.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from nncompile.solvers.packing import Problem, SolveResult, arena_of


def solve_cpsat(problem: Problem, *, hint: np.ndarray | None, capacity: int | None, deadline: float,
                bound: int, progress: Callable[[str], None] | None = None, workers: int = 2) -> SolveResult:
    """Minimise the arena (or decide ``capacity``) with CP-SAT under the deadline."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    upper = int(problem.size.sum() + problem.align.max() * problem.n) if problem.n else 0
    if hint is not None and len(hint):
        upper = min(upper, arena_of(problem, hint))
    if capacity is not None:
        upper = int(capacity)
    arena = model.NewIntVar(int(bound), max(int(bound), upper), "arena")
    offsets = []
    x_intervals, y_intervals = [], []
    for i in range(problem.n):
        size, align = int(problem.size[i]), int(problem.align[i])
        top_slot = max((upper - size) // align, 0)
        slot = model.NewIntVar(0, top_slot, f"k{i}")
        offset = model.NewIntVar(0, top_slot * align, f"o{i}")
        model.Add(offset == align * slot)
        offsets.append((offset, slot))
        x_intervals.append(model.NewFixedSizeIntervalVar(int(problem.start[i]),
                                                         int(problem.end[i] - problem.start[i]), f"t{i}"))
        y_intervals.append(model.NewFixedSizeIntervalVar(offset, size, f"a{i}"))
        model.Add(offset + size <= arena)
    model.AddNoOverlap2D(x_intervals, y_intervals)
    if capacity is None:
        model.Minimize(arena)
    if hint is not None and len(hint):
        for i, (offset, slot) in enumerate(offsets):
            model.AddHint(offset, int(hint[i]))
            model.AddHint(slot, int(hint[i]) // int(problem.align[i]))
        model.AddHint(arena, arena_of(problem, hint))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(deadline - time.perf_counter(), 0.01)
    solver.parameters.num_workers = workers
    if progress:
        progress(f"cp-sat: {problem.n} rectangles, time limit {solver.parameters.max_time_in_seconds:.1f}s")
    code = solver.Solve(model)
    details = {"cpsat_status": solver.StatusName(code), "cpsat_bound": None,
               "cpsat_wall": solver.WallTime()}
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = np.array([solver.Value(o) for o, _ in offsets], dtype=np.int64)
        best_bound = int(solver.BestObjectiveBound()) if capacity is None else int(bound)
        details["cpsat_bound"] = best_bound
        if hint is not None and len(hint) and arena_of(problem, hint) < arena_of(problem, found):
            found = hint
        status = "optimal" if code == cp_model.OPTIMAL else "timeout"
        return SolveResult(found, status, max(best_bound, int(bound)), "cpsat", details)
    fallback = hint if hint is not None else np.zeros(problem.n, np.int64)
    if code == cp_model.INFEASIBLE:
        return SolveResult(fallback, "infeasible", (capacity or 0) + 1, "cpsat", details)
    return SolveResult(fallback, "timeout", int(bound), "cpsat", details)
