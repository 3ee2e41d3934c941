"""Recomputation selection under a memory budget: the entry point shared by the pass and the CLI.

``plan_recompute(graph, budget)`` chooses a compute sequence (which ops run again, and when) whose
memory fits ``budget`` bytes at the least added compute.  The budget is judged against the arena
the memory planner (``solvers/packing``) actually produces for the schedule's buffer lifetimes,
not just the max-live bytes: if the planned arena does not fit, the internal target is tightened
and the plan re-solved (bi-level, as MEMO does).  Without the packing module the check falls back
to max-live bytes, and the plan says so in its notes.

Methods: ``"fast"`` (``remat_fast``, any size, never over budget, peak monotone in the budget) and
``"exact"`` (``remat_exact``: Checkmate's MILP with a time limit; it starts from the fast plan and
never returns anything worse).  An infeasible budget raises ``SolverError`` naming the smallest
budget found feasible and the floor no plan can beat.

For the compiler pass (analysis -> solver -> apply): build the model from the training IR with
``make_graph(cost=FLOPs per node, mem=output bytes, edges=(producer, consumer) index pairs in
schedule order, backward=flags)``, call ``plan_recompute(g, budget, alignment=64)``, then create
one IR node per compute step of ``plan.sequence``; ``remat_sim.copy_inputs(g, plan.sequence)``
says which copy each step reads, so recomputed nodes are plain duplicates.

Example::

    g = load_graph("unet_b32_train.json")
    plan = plan_recompute(g, parse_budget("0.7", plain_peak(g)), method="exact", time_limit=30)
    plan.overhead, plan.peak, plan.arena, plan.steps
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from nncompile.errors import SolverError
from nncompile.solvers.remat_fast import FastPlan, min_feasible_peak, walk_path
from nncompile.solvers.remat_graph import RematGraph
from nncompile.solvers.remat_sim import (Step, buffer_lifetimes, plain_peak, schedule_from_sequence,
                                         sequence_profile, simulate)


@dataclass(frozen=True)
class RematPlan:
    """A checked recomputation plan and its figures."""

    sequence: list[int]
    steps: list[Step]
    budget: int
    peak0: int               # peak of the plain schedule
    peak: int                # simulated max-live bytes of the plan
    arena: int               # planned arena for the plan's buffers (= peak without the packer)
    arena_method: str
    compute: float
    overhead: float          # compute / one plain forward + backward
    recomputed: tuple[int, ...]
    status: str              # optimal | feasible | heuristic
    gap: float | None
    method: str
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def figures(self, graph: RematGraph) -> dict:
        """The numbers ``nncompile remat --json`` prints."""
        return {
            "nodes": graph.n,
            "peak0_bytes": self.peak0,
            "budget_bytes": self.budget,
            "peak_bytes": self.arena,
            "max_live_bytes": self.peak,
            "overhead": round(self.overhead, 6),
            "recomputed_ops": len(self.recomputed),
            "recompute_steps": len(self.sequence) - graph.n,
            "status": self.status,
            "gap": None if self.gap is None else round(self.gap, 6),
            "method": self.method,
            "arena_method": self.arena_method,
            "seconds": round(self.seconds, 3),
        }


class ArenaChecker:
    """Planned arena of a compute sequence's buffers (packing solver), or max-live bytes."""

    def __init__(self, graph: RematGraph, use_packing: bool = True, alignment: int | None = None,
                 time_limit: float = 2.0):
        self.graph = graph
        self.alignment = alignment
        self.time_limit = time_limit
        self.packing = None
        self.note = ""
        if use_packing:
            try:
                from nncompile.solvers import packing
                self.packing = packing
            except ImportError as err:
                self.note = f"packing solver unavailable ({err}); budget judged by max-live bytes"
        else:
            self.note = "budget judged by max-live bytes (packing disabled)"
        self.method = "packing" if self.packing is not None else "max-live"

    def arena(self, sequence: list[int], budget: int | None = None) -> int:
        """Greedy-planned arena; if that misses ``budget`` the full planner tries to fit it."""
        profile = sequence_profile(self.graph, sequence)
        if self.packing is None:
            return profile.peak
        buffers = [self.packing.Buffer(c, start, end, size)
                   for c, (start, end, size) in enumerate(buffer_lifetimes(self.graph, sequence))
                   if size > 0]
        if not buffers:
            return 0
        if budget is None:
            # no budget to meet: minimise the arena within the time limit
            return self.packing.plan_offsets(buffers, method="auto", time_limit=self.time_limit,
                                             alignment=self.alignment).arena
        greedy = self.packing.plan_offsets(buffers, method="greedy", alignment=self.alignment)
        if greedy.arena <= budget or profile.peak > budget:
            return greedy.arena
        placed = self.packing.plan_offsets(buffers, method="auto", capacity=budget,
                                           time_limit=self.time_limit, alignment=self.alignment)
        if placed.status == "optimal" and placed.arena <= budget:
            return placed.arena
        return greedy.arena


def plan_recompute(graph: RematGraph, budget: int, method: str = "fast", time_limit: float = 60.0,
                   use_packing: bool = True, alignment: int | None = None,
                   progress=None) -> RematPlan:
    """Choose what to recompute so that ``graph`` runs in ``budget`` bytes (see module doc)."""
    if method not in ("fast", "exact"):
        raise SolverError(f"remat: unknown method {method!r} (fast or exact)")
    started = time.perf_counter()
    peak0 = plain_peak(graph)
    floor = graph.floor_bytes()
    # the fast path may try several plans against the planner: keep each try short there
    checker = ArenaChecker(graph, use_packing, alignment, time_limit=0.5 if method == "fast" else 5.0)
    notes = [checker.note] if checker.note else []
    if budget < floor:
        raise _infeasible(graph, budget, peak0, floor, None)

    deadline = started + max(time_limit, 1.0) if method == "exact" else None
    fast = _first_fitting(graph, budget, checker, deadline)
    if method == "fast":
        if fast is None:
            raise _infeasible(graph, budget, peak0, floor, _least_arena(graph, checker))
        plan, arena = fast
        return _finish(graph, plan.sequence, budget, peak0, arena, checker, "heuristic", None, "fast",
                       started, notes)
    return _exact(graph, budget, peak0, floor, fast, checker, time_limit, started, notes, progress)


def _first_fitting(graph, budget, checker, deadline=None) -> tuple[FastPlan, int] | None:
    """The first plan on the fast path whose planned arena fits ``budget``."""
    for plan in walk_path(graph):
        if plan.peak <= budget:
            arena = checker.arena(plan.sequence, budget)
            if arena <= budget:
                return plan, arena
        if deadline is not None and time.perf_counter() > deadline:
            return None
    return None


def _least_arena(graph, checker) -> int | None:
    """The planned arena of the least-peak plan on the fast path (the least budget it meets)."""
    plan = min_feasible_peak(graph)
    return None if plan is None else checker.arena(plan.sequence)


def _exact(graph, budget, peak0, floor, fast, checker, time_limit, started, notes, progress):
    from nncompile.solvers.remat_exact import solve_exact

    target = budget
    best = None                    # (compute, sequence, arena)
    if fast is not None:
        best = (fast[0].compute, fast[0].sequence, fast[1])
    status, bound = "feasible", None
    for round_index in range(6):
        remaining = time_limit - (time.perf_counter() - started)
        if remaining <= 0.5:
            notes.append("time limit reached")
            break
        if progress:
            progress(f"MILP round {round_index + 1}, target {target} bytes")
        cutoff = best[0] if best is not None else None
        answer = solve_exact(graph, target, time_limit=remaining, cutoff=cutoff)
        if answer.sequence is None:
            if answer.status == "infeasible" and best is None and target == budget:
                raise _infeasible(graph, budget, peak0, floor, _least_arena(graph, checker), proven=True)
            if answer.status == "infeasible":
                notes.append("MILP: no plan cheaper than the fast plan")
            else:
                notes.append(f"MILP: {answer.status} after {answer.seconds:.1f} s")
            bound = answer.bound if answer.bound is not None else bound
            break
        arena = checker.arena(answer.sequence, budget)
        if arena <= budget:
            if best is None or answer.objective < best[0] - 1e-9:
                best = (answer.objective, answer.sequence, arena)
            elif answer.objective > best[0] + 1e-9:
                notes.append("MILP answer worse than the fast plan; kept the fast plan")
            status = answer.status
            bound = answer.bound
            break
        # bi-level: the planned arena missed the budget; tighten the MILP's target and re-solve
        notes.append(f"planned arena {arena} > budget with MILP target {target}; tightening")
        target -= max(arena - budget, 1)
        if target < floor:
            break
    if best is None:
        raise _infeasible(graph, budget, peak0, floor, _least_arena(graph, checker), searched=time_limit)
    compute, sequence, arena = best
    if status == "optimal" and bound is not None:
        bound = min(bound, compute)
    # every op runs at least once, so one plain forward+backward is a lower bound too
    bound = graph.total_cost if bound is None else max(bound, graph.total_cost)
    if target != budget:
        status = "feasible" if status == "optimal" else status  # optimal only for the tightened target
    gap = None if bound is None or compute <= 0 else max(0.0, (compute - bound) / compute)
    return _finish(graph, sequence, budget, peak0, arena, checker, status, gap, "exact", started, notes)


def _finish(graph, sequence, budget, peak0, arena, checker, status, gap, method, started, notes) -> RematPlan:
    steps = schedule_from_sequence(graph, sequence)
    result = simulate(graph, steps)
    if not result.valid or result.peak > budget or arena > budget:
        # never hand out a plan the simulator rejects
        raise SolverError(f"remat: internal error, plan failed its own check: "
                          f"{'; '.join(result.errors) or f'peak {result.peak} > budget {budget}'}")
    return RematPlan(
        sequence=list(sequence),
        steps=steps,
        budget=budget,
        peak0=peak0,
        peak=result.peak,
        arena=arena,
        arena_method=checker.method,
        compute=result.compute,
        overhead=result.compute / graph.total_cost if graph.total_cost else 1.0,
        recomputed=result.recomputed,
        status=status,
        gap=gap,
        method=method,
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


def _infeasible(graph, budget, peak0, floor, least, proven=False, searched=None) -> SolverError:
    """The error for a budget no plan was found for, naming the smallest budget known to work."""
    fraction = budget / peak0 if peak0 else 0.0
    what = f"memory budget {budget} bytes ({fraction:.3f} of the plain peak {peak0})"
    if budget < floor or proven:
        message = f"{what} is infeasible"
    elif searched is not None:
        message = f"{what}: no plan found within the {searched:g} s time limit"
    else:
        message = f"{what} cannot be met by the fast planner"
    notes = [f"no schedule can use less than {floor} bytes ({floor / peak0:.3f} of the plain peak): "
             f"the largest op's inputs plus its output"]
    if least is not None:
        message += f"; the smallest feasible budget found is {least} bytes ({least / peak0:.3f} of the plain peak)"
        if budget >= floor and not proven:
            notes.append("the exact solver (--exact) may find a plan between the two")
    return SolverError(message, notes=tuple(notes))
