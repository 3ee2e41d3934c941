"""Static memory planning: place buffers with known lifetimes in one arena (offline DSA).

A ``Buffer`` lives during the half-open step interval ``[start, end)`` and occupies ``size`` bytes.
Two buffers whose lifetimes overlap must not overlap in the arena. ``plan_offsets`` chooses an
offset for every buffer so that the arena (max of offset + size) is as small as possible, or, with
``capacity``, so that everything fits below it. The max-live lower bound (largest total size live at
one instant) bounds every answer from below; ``Placement`` reports both and the gap between them.

Methods behind the one entry point:

- ``greedy``: best-fit / first-fit with several orderings, the best kept (``packing_greedy``);
- ``search``: MiniMalloc-style branch and bound on canonical solutions (``packing_search``);
- ``cpsat``: OR-Tools CP-SAT with NoOverlap2D, warm-started from greedy (``packing_cpsat``);
- ``decompose``: temporal decomposition for very large traces (``packing_decompose``);
- ``auto``: greedy first, stop if it meets the bound, then search within the time limit.

Example::

    bufs = [Buffer("a", 0, 2, 4), Buffer("b", 1, 3, 4), Buffer("c", 2, 4, 4)]
    p = plan_offsets(bufs, alignment=1)
    assert p.arena == p.lower_bound == 8 and validate(bufs, p.offsets) == 8
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from nncompile.errors import SolverError

METHODS = ("auto", "greedy", "search", "cpsat", "decompose")


@dataclass(frozen=True)
class Buffer:
    """A buffer alive during ``[start, end)`` (schedule steps) needing ``size`` bytes at an offset
    that is a multiple of ``align``."""

    id: Hashable
    start: int
    end: int
    size: int
    align: int = 1


@dataclass
class Placement:
    """The answer of a planner: offsets, arena size, the lower bound and how good the answer is.

    ``status`` is ``optimal`` (arena proven minimal, or proven to fit under ``capacity``),
    ``feasible`` (valid, not proven optimal), ``timeout`` (the limit was hit; offsets are the best
    found, possibly over ``capacity``) or ``infeasible`` (proven not to fit under ``capacity``).
    ``gap`` is ``(arena - proven_bound) / arena``.
    """

    offsets: dict
    arena: int
    lower_bound: int
    status: str
    gap: float
    seconds: float
    method: str
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.arena / self.lower_bound if self.lower_bound else 1.0


@dataclass
class Problem:
    """Buffers as parallel int64 arrays (the form every solver works on)."""

    ids: list
    start: np.ndarray
    end: np.ndarray
    size: np.ndarray
    align: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ids)

    @classmethod
    def from_buffers(cls, buffers: Sequence[Buffer], alignment: int | None = None) -> "Problem":
        ids = [b.id for b in buffers]
        if len(set(ids)) != len(ids):
            raise SolverError("memory plan: duplicate buffer ids")
        start = np.array([b.start for b in buffers], dtype=np.int64)
        end = np.array([b.end for b in buffers], dtype=np.int64)
        size = np.array([b.size for b in buffers], dtype=np.int64)
        align = np.array([b.align for b in buffers], dtype=np.int64)
        if alignment is not None:
            if alignment < 1:
                raise SolverError(f"memory plan: alignment must be >= 1, got {alignment}")
            align = np.maximum(align, alignment)
        problem = cls(ids, start, end, size, align)
        problem.check()
        return problem

    def check(self) -> None:
        for i in range(self.n):
            if self.size[i] < 0:
                raise SolverError(f"memory plan: buffer {self.ids[i]!r} has negative size {self.size[i]}")
            if self.end[i] <= self.start[i]:
                raise SolverError(
                    f"memory plan: buffer {self.ids[i]!r} has an empty lifetime [{self.start[i]}, {self.end[i]})")
            if self.align[i] < 1:
                raise SolverError(f"memory plan: buffer {self.ids[i]!r} has alignment {self.align[i]} < 1")

    def subset(self, index: np.ndarray) -> "Problem":
        return Problem([self.ids[i] for i in index], self.start[index], self.end[index],
                       self.size[index], self.align[index])


@dataclass
class SolveResult:
    """What an exact/improving solver hands back to ``plan_problem``."""

    offsets: np.ndarray
    status: str
    proven_bound: int
    method: str
    details: dict = field(default_factory=dict)


def live_bytes_profile(start, end, size) -> tuple[np.ndarray, np.ndarray]:
    """Distinct event times and the bytes live just after each (sweep over [start, end))."""
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    size = np.asarray(size, dtype=np.int64)
    if len(start) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    times = np.unique(np.concatenate([start, end]))
    delta = np.zeros(len(times) + 1, dtype=np.int64)
    np.add.at(delta, np.searchsorted(times, start), size)
    np.add.at(delta, np.searchsorted(times, end), -size)
    return times, np.cumsum(delta[:-1])


def max_live_bytes(start, end, size) -> int:
    """The max-live lower bound: the largest total size of buffers alive at one instant."""
    _, live = live_bytes_profile(start, end, size)
    return int(live.max()) if len(live) else 0


def lower_bound(buffers: Sequence[Buffer]) -> int:
    """Max-live lower bound of a list of buffers."""
    p = Problem.from_buffers(buffers)
    return max_live_bytes(p.start, p.end, p.size)


def arena_of(problem: Problem, offsets: np.ndarray) -> int:
    return int((offsets + problem.size).max()) if problem.n else 0


def validate(buffers: Sequence[Buffer], offsets: dict, capacity: int | None = None) -> int:
    """Check a plan independently of any solver; return its arena or raise ``SolverError``.

    Checks: every buffer has an integer offset >= 0 that is a multiple of its alignment; no two
    buffers alive at the same time share a byte; every offset + size <= capacity when given.
    """
    rows = []
    for b in buffers:
        if b.id not in offsets:
            raise SolverError(f"memory plan: buffer {b.id!r} has no offset")
        off = offsets[b.id]
        if int(off) != off or off < 0:
            raise SolverError(f"memory plan: buffer {b.id!r} has a bad offset {off!r}")
        if off % b.align:
            raise SolverError(f"memory plan: buffer {b.id!r} offset {off} is not a multiple of {b.align}")
        rows.append((int(b.start), int(b.end), int(off), int(off) + int(b.size), b.id))
    arena = max((r[3] for r in rows), default=0)
    if capacity is not None and arena > capacity:
        raise SolverError(f"memory plan: arena {arena} exceeds capacity {capacity}")
    # sweep over time; the live set is kept sorted by offset so a new buffer checks two neighbours
    import bisect
    events = sorted([(r[1], 0, i) for i, r in enumerate(rows)] + [(r[0], 1, i) for i, r in enumerate(rows)])
    live: list[tuple[int, int, int]] = []  # (offset, end_address, index), sorted
    for _, kind, i in events:
        lo, hi = rows[i][2], rows[i][3]
        if kind == 0:
            if hi > lo:
                live.pop(bisect.bisect_left(live, (lo, hi, i)))
            continue
        if hi == lo:
            continue
        pos = bisect.bisect_left(live, (lo, hi, i))
        for j in (pos - 1, pos):
            if 0 <= j < len(live):
                olo, ohi, other = live[j]
                if olo < hi and lo < ohi:
                    raise SolverError(
                        f"memory plan: buffers {rows[i][4]!r} [{lo}, {hi}) and {rows[other][4]!r} "
                        f"[{olo}, {ohi}) overlap in address while both are live")
        live.insert(pos, (lo, hi, i))
    return arena


def _finish(problem: Problem, offsets: np.ndarray, bound: int, proven: int, status: str,
            method: str, started: float, details: dict) -> Placement:
    arena = arena_of(problem, offsets)
    proven = max(proven, bound)
    if status == "optimal" and details.get("capacity") is None:
        proven = arena
    gap = (arena - proven) / arena if arena else 0.0
    return Placement({problem.ids[i]: int(offsets[i]) for i in range(problem.n)}, arena, bound, status,
                     max(gap, 0.0), time.perf_counter() - started, method, details)


def plan_problem(problem: Problem, *, method: str = "auto", capacity: int | None = None,
                 time_limit: float = 10.0, progress: Callable[[str], None] | None = None,
                 greedy_shortcut: bool = True) -> Placement:
    """``plan_offsets`` on a ``Problem`` (arrays); see there."""
    from nncompile.solvers import packing_cpsat, packing_decompose, packing_greedy, packing_search

    if method not in METHODS:
        raise SolverError(f"memory plan: unknown method {method!r} (one of {', '.join(METHODS)})")
    started = time.perf_counter()
    deadline = started + max(time_limit, 0.0)
    bound = max_live_bytes(problem.start, problem.end, problem.size)
    details: dict = {"capacity": capacity, "buffers": problem.n}
    if problem.n == 0:
        return _finish(problem, np.zeros(0, np.int64), 0, 0, "optimal", method, started, details)
    if capacity is not None and bound > capacity:
        # the bound alone proves it cannot fit; still return the greedy layout for inspection
        offsets = packing_greedy.greedy_offsets(problem, bound=bound).offsets
        details["reason"] = f"max-live bytes {bound} > capacity {capacity}"
        return _finish(problem, offsets, bound, bound, "infeasible", "bound", started, details)

    if method in ("search", "cpsat") and problem.n > packing_decompose.FLAT_LIMIT:
        raise SolverError(f"memory plan: method {method!r} handles up to {packing_decompose.FLAT_LIMIT} buffers "
                          f"(this trace has {problem.n}); use 'auto' or 'decompose'")
    if method == "decompose" or (method == "auto" and problem.n > packing_decompose.FLAT_LIMIT):
        result = packing_decompose.plan_decomposed(problem, bound=bound, deadline=deadline, progress=progress,
                                                   target=capacity)
        details.update(result.details)
        arena = arena_of(problem, result.offsets)
        status = "optimal" if arena <= bound else "feasible"
        if capacity is not None:
            status = "optimal" if arena <= capacity else "timeout"
        return _finish(problem, result.offsets, bound, bound, status, "decompose", started, details)

    greedy = packing_greedy.greedy_offsets(problem, bound=bound)
    details["greedy_arena"] = greedy.arena
    details["greedy_ordering"] = greedy.ordering
    if progress:
        progress(f"greedy arena {greedy.arena} (bound {bound})")
    target = capacity if capacity is not None else bound
    if method == "greedy" or (greedy.arena <= target and (greedy_shortcut or method == "auto")):
        status = "optimal" if greedy.arena <= target else "feasible"
        if capacity is not None and greedy.arena > capacity:
            status = "timeout"  # greedy alone proves nothing about infeasibility
        return _finish(problem, greedy.offsets, bound, bound, status, "greedy", started, details)

    if method == "cpsat":
        result = packing_cpsat.solve_cpsat(problem, hint=greedy.offsets, capacity=capacity,
                                           deadline=deadline, bound=bound, progress=progress)
    else:
        result = packing_search.minimize_arena(problem, upper=greedy.arena, hint=greedy.offsets,
                                               capacity=capacity, deadline=deadline, bound=bound,
                                               progress=progress)
    details.update(result.details)
    return _finish(problem, result.offsets, bound, result.proven_bound, result.status, result.method,
                   started, details)


def plan_offsets(buffers: Sequence[Buffer], *, method: str = "auto", capacity: int | None = None,
                 time_limit: float = 10.0, alignment: int | None = 64,
                 progress: Callable[[str], None] | None = None, greedy_shortcut: bool = True) -> Placement:
    """Choose an arena offset for every buffer.

    ``alignment`` raises every buffer's own ``align`` to at least this value (None keeps them).
    Without ``capacity`` the arena is minimised within ``time_limit`` seconds; with it, the answer
    says whether the buffers fit (``optimal`` = proven to fit, ``infeasible`` = proven not to,
    ``timeout`` = neither). ``progress`` receives short status strings during long solves.
    With ``greedy_shortcut=False`` an explicit ``search``/``cpsat`` method runs even when the greedy
    answer already meets the bound (to time or test the exact model itself).
    """
    problem = Problem.from_buffers(buffers, alignment)
    return plan_problem(problem, method=method, capacity=capacity, time_limit=time_limit, progress=progress,
                        greedy_shortcut=greedy_shortcut)
