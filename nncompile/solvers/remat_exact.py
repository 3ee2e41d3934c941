"""Exact recomputation selection: Checkmate's MILP (Jain et al., MLSys 2020).

The schedule has one stage per op ``t`` (frontier advancing): stage ``t`` computes ``t`` for the
first time, after recomputing any earlier ops it chooses.  Variables (all binary but ``U``):

* ``R[t,i]`` op ``i`` is computed in stage ``t`` (``i <= t``, ``R[t,t] = 1``);
* ``S[t,i]`` ``i``'s output is resident at the start of stage ``t`` (``i < t``);
* ``FREE[t,i,k]`` ``i`` is freed right after op ``k`` runs in stage ``t`` (``i`` an input of
  ``k``, or ``k`` itself);
* ``U[t,k]`` resident bytes right after op ``k`` of stage ``t`` (≤ the budget).

Constraints: inputs resident (``R[t,j] <= R[t,i] + S[t,i]`` per edge), outputs kept only if they
existed (``S[t+1,i] <= R[t,i] + S[t,i]``), the memory recurrence
``U[t,k] = U[t,k-1] + mem_k R[t,k] - sum_i mem_i FREE[t,i,k-1]`` and Checkmate's linearization of
``FREE[t,i,k] = R[t,k] (1 - S[t+1,i]) prod_{j > k, j uses i} (1 - R[t,j])``.  Objective: the total
compute ``sum cost_i R[t,i]``.

Solved with OR-Tools' MPSolver (HiGHS by default, SCIP as fallback) under a time limit; on timeout
the best feasible plan is returned with its gap.  The compute sequence is judged afterwards by the
simulator (whose earlier frees can only lower the peak).

Example::

    answer = solve_exact(g, budget_bytes, time_limit=30)
    answer.sequence, answer.status, answer.gap
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

from nncompile.errors import SolverError
from nncompile.solvers.remat_graph import RematGraph


@dataclass(frozen=True)
class ExactAnswer:
    """A compute sequence from the MILP, or none when no feasible plan was found."""

    sequence: list[int] | None
    status: str            # "optimal", "feasible" (time limit), "infeasible", "unknown"
    objective: float | None
    bound: float | None
    seconds: float
    backend: str

    @property
    def gap(self) -> float | None:
        if self.objective is None or self.bound is None or self.objective <= 0:
            return None
        return max(0.0, (self.objective - self.bound) / self.objective)


def solve_exact(graph: RematGraph, budget: int, time_limit: float = 60.0, backend: str = "HIGHS",
                threads: int = 1, relative_gap: float = 1e-4, cutoff: float | None = None) -> ExactAnswer:
    """Solve Checkmate's MILP for ``graph`` under ``budget`` bytes within ``time_limit`` seconds.

    ``cutoff`` (the compute of a known plan) bounds the objective from above, which prunes the
    search; the MILP then only looks for plans at least as cheap.
    """
    from ortools.linear_solver import pywraplp

    start = time.perf_counter()
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None and backend != "SCIP":
        backend = "SCIP"
        solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise SolverError("no MILP back end (HiGHS or SCIP) is available in OR-Tools")
    n = graph.n
    scale = float(max(max(graph.mem), 1))
    mem = [m / scale for m in graph.mem]
    cap = budget / scale
    users = [list(graph.succs[i]) for i in range(n)]

    R = {}
    S = {}
    for t in range(n):
        for i in range(t + 1):
            if i == t:
                R[t, i] = 1  # frontier advancing: stage t computes t
            else:
                R[t, i] = solver.BoolVar(f"R_{t}_{i}")
        for i in range(t):
            S[t, i] = solver.BoolVar(f"S_{t}_{i}")

    def lin(*terms):
        """Sum of variables/constants as an MPSolver expression (constants fold in)."""
        return solver.Sum(list(terms))

    # an output kept into stage t existed in stage t-1 (computed there or kept)
    for t in range(1, n):
        for i in range(t):
            if i == t - 1:
                continue  # S[t, t-1] <= R[t-1, t-1] = 1
            solver.Add(S[t, i] <= R[t - 1, i] + S[t - 1, i])
    # inputs resident: R[t,j] <= R[t,i] + S[t,i] for every edge i -> j with j <= t
    for t in range(n):
        for j in range(t + 1):
            for i in graph.preds[j]:
                if isinstance(R[t, j], int):
                    solver.Add(R[t, i] + S[t, i] >= 1)
                else:
                    solver.Add(R[t, j] <= R[t, i] + S[t, i])

    def kept_next(t, i):
        return S[t + 1, i] if t + 1 < n else 0

    # FREE and the memory recurrence
    for t in range(n):
        if time.perf_counter() - start > 0.5 * time_limit:
            # building the model alone would eat the time limit: give up rather than overrun it
            return ExactAnswer(None, "unknown", None, None, time.perf_counter() - start, backend)
        previous = None
        for k in range(t + 1):
            frees = []
            candidates = list(graph.preds[k]) + [k]
            for i in candidates:
                later = [j for j in users[i] if k < j <= t]
                free = solver.BoolVar(f"F_{t}_{i}_{k}")
                hazards = [1 - R[t, k] if not isinstance(R[t, k], int) else 0, kept_next(t, i)]
                hazards += [R[t, j] for j in later]
                count = 2 + len(later)
                # FREE = 1 exactly when no hazard holds
                solver.Add(free + lin(*hazards) >= 1)
                solver.Add(count * free + lin(*hazards) <= count)
                frees.append((i, free))
            u = solver.NumVar(0.0, cap, f"U_{t}_{k}")
            if previous is None:
                solver.Add(u == lin(*[mem[i] * S[t, i] for i in range(t)]) + mem[k] * R[t, k])
            else:
                prev_u, prev_frees = previous
                solver.Add(u == prev_u + mem[k] * R[t, k] - lin(*[mem[i] * f for i, f in prev_frees]))
            previous = (u, frees)

    objective = lin(*[graph.cost[i] * R[t, i] for (t, i) in R])
    if cutoff is not None:
        solver.Add(objective <= cutoff * (1 + 1e-9) + 1e-6)
    solver.Minimize(objective)
    solver.SuppressOutput()
    solver.SetNumThreads(max(1, threads))
    remaining = max(0.5, time_limit - (time.perf_counter() - start))
    solver.SetTimeLimit(int(remaining * 1000))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, relative_gap)
    with _quiet_stdout():
        result = solver.Solve(params)
    seconds = time.perf_counter() - start

    if result == pywraplp.Solver.INFEASIBLE:
        return ExactAnswer(None, "infeasible", None, None, seconds, backend)
    if result not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return ExactAnswer(None, "unknown", None, _bound(solver), seconds, backend)
    sequence = []
    for t in range(n):
        for i in range(t + 1):
            r = R[t, i]
            if isinstance(r, int) or r.solution_value() > 0.5:
                sequence.append(i)
    objective = sum(graph.cost[i] for i in sequence)
    bound = _bound(solver)
    status = "optimal" if result == pywraplp.Solver.OPTIMAL else "feasible"
    if status == "optimal" and bound is not None and objective > 0 and (objective - bound) / objective > 2 * relative_gap:
        status = "feasible"
    return ExactAnswer(sequence, status, objective, bound, seconds, backend)


def _bound(solver) -> float | None:
    try:
        value = solver.Objective().BestBound()
    except Exception:  # some back ends do not report a bound
        return None
    if value != value or abs(value) == float("inf"):
        return None
    return float(value)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the native solver's banner, which it writes straight to file descriptor 1."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
