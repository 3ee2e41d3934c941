"""Exact packing by branch and bound (MiniMalloc-style), and arena minimisation on top of it.

``fits(problem, capacity, ...)`` answers whether the buffers fit under a capacity: ``found`` (with
offsets), ``infeasible`` (proven) or ``timeout``. The search enumerates canonical solutions only
(buffers placed in non-decreasing offset order, each at its lowest offset above what is placed)
and prunes with MiniMalloc's dominance rule, section inference and dynamic temporal
decomposition; see ``native/memplan/search.cpp`` for the details. The C++ core is used when it
builds; ``_PySearch`` is the same algorithm in Python (used without a compiler, and as a
cross-check in tests).

``minimize_arena`` turns the decision procedure into an optimiser: it probes the lower bound
first (real and hard instances alike often pack at exactly the max-live bound), then bisects
between the best proven bound and the best arena found, each probe under a slice of the
remaining time (a probe that times out counts as "unknown" and the bisection moves up).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from nncompile.solvers import packing_native
from nncompile.solvers.packing import Problem, SolveResult, arena_of

HEURISTICS = ("WAT", "TAW", "TWA")


class _Timeout(Exception):
    pass


class _PySearch:
    """The branch-and-bound search in plain Python (same pruning as the C++ core)."""

    def __init__(self, problem: Problem, capacity: int, deadline: float, heuristics=HEURISTICS):
        self.p = problem
        self.capacity = int(capacity)
        self.deadline = deadline
        self.heuristics = heuristics
        self.size = [int(x) for x in problem.size]
        self.align = [int(x) for x in problem.align]
        self.nodes = 0
        self.backtracks = 0
        self._sweep()

    def _sweep(self) -> None:
        n = self.p.n
        events = sorted([(int(self.p.end[b]), 0, b) for b in range(n)] +
                        [(int(self.p.start[b]), 1, b) for b in range(n)])
        self.sections: list[list[int]] = []
        self.lo = [0] * n
        self.hi = [0] * n
        self.overlaps: list[list[int]] = [[] for _ in range(n)]
        active: list[int] = []
        last = events[0][0] if events else 0
        for t, kind, b in events:
            if kind == 0:
                if last < t:
                    last = t
                    self.sections.append(list(active))
                active.remove(b)
                self.hi[b] = len(self.sections)
            else:
                for o in active:
                    self.overlaps[b].append(o)
                    self.overlaps[o].append(b)
                active.append(b)
                self.lo[b] = len(self.sections)
        self.cuts = [0] * max(len(self.sections) - 1, 0)
        for b in range(n):
            for s in range(self.lo[b], self.hi[b] - 1):
                self.cuts[s] += 1

    def solve(self) -> tuple[str, list[int]]:
        n = self.p.n
        self.offset = [-1] * n
        self.solution = [-1] * n
        self.min_offset = [0] * n
        self.floor = [0] * len(self.sections)
        self.total = [sum(self.size[b] for b in sec) for sec in self.sections]
        if any(z > self.capacity for z in self.size):
            return "infeasible", self.solution
        partitions, lo = [], 0
        for s in range(len(self.sections)):
            if s + 1 == len(self.sections) or self.cuts[s] == 0:
                partitions.append(([b for b in range(n) if lo <= self.lo[b] <= s], lo, s + 1))
                lo = s + 1
        limit = max(n, 64)
        while True:
            limit *= 2
            for h in self.heuristics:
                self.heuristic = h
                self.nodes_left = limit if len(self.heuristics) > 1 else float("inf")
                try:
                    ok = all(self._subsolve(part) for part in partitions)
                except _Timeout as stop:
                    if str(stop) == "deadline":
                        return "timeout", self.solution
                    continue
                return ("found" if ok else "infeasible"), self.solution

    def _subsolve(self, part) -> bool:
        buffers, slo, shi = part

        def key(b):
            width = int(self.p.end[b] - self.p.start[b])
            total = max(self.total[s] for s in range(self.lo[b], self.hi[b]))
            values = {"W": width, "A": width * self.size[b], "T": total, "Z": self.size[b]}
            return tuple(-values[c] for c in self.heuristic) + (b,)

        pre = sorted((b for b in buffers if self.offset[b] < 0), key=key)
        return self._node(part, [(0, r, b) for r, b in enumerate(pre)], 0, 0)

    def _node(self, part, previous, last_offset, last_rank) -> bool:
        self.nodes_left -= 1
        if self.nodes_left < 0:
            raise _Timeout("nodes")
        self.nodes += 1
        if self.nodes % 256 == 0 and time.perf_counter() > self.deadline:
            raise _Timeout("deadline")
        ordering = sorted((self.min_offset[b], r, b) for _, r, b in previous if self.offset[b] < 0)
        if not ordering:
            for b in part[0]:
                self.solution[b] = self.offset[b]
            return True
        min_height = min(off + self.size[b] for off, _, b in ordering)
        for off, rank, b in ordering:
            if (off, rank) < (last_offset, last_rank):
                continue
            if off >= min_height:
                break
            if self._place(part, ordering, off, rank, b):
                return True
        self.backtracks += 1
        return False

    def _place(self, part, ordering, off, rank, b) -> bool:
        height = off + self.size[b]
        self.offset[b] = off
        offset_changes, affected = [], set()
        for o in self.overlaps[b]:
            if self.offset[o] >= 0 or self.min_offset[o] >= height:
                continue
            offset_changes.append((o, self.min_offset[o]))
            self.min_offset[o] = -(-height // self.align[o]) * self.align[o]
            affected.update(range(self.lo[o], self.hi[o]))
        floor_changes = []
        for s in range(self.lo[b], self.hi[b]):
            floor_changes.append((s, self.floor[s]))
            self.floor[s] = height
            self.total[s] -= self.size[b]
        for s in affected:
            least = min((self.min_offset[o] for o in self.sections[s] if self.offset[o] < 0), default=None)
            if least is not None and self.floor[s] < least:
                floor_changes.append((s, self.floor[s]))
                self.floor[s] = least
        ok = False
        try:
            if all(max(off, self.floor[s]) + self.total[s] <= self.capacity for s in range(part[1], part[2])):
                ok = self._decompose(part, ordering, off, rank, b)
        finally:
            for s, value in reversed(floor_changes):
                self.floor[s] = value
            for s in range(self.lo[b], self.hi[b]):
                self.total[s] += self.size[b]
            for o, value in reversed(offset_changes):
                self.min_offset[o] = value
            self.offset[b] = -1
        return ok

    def _decompose(self, part, ordering, off, rank, b) -> bool:
        self.solution[b] = off
        cutpoints = [part[1]]
        for s in range(self.lo[b], self.hi[b] - 1):
            self.cuts[s] -= 1
            if self.cuts[s] == 0:
                cutpoints.append(s + 1)
        try:
            if len(cutpoints) == 1:
                return self._node(part, ordering, off, rank)
            cutpoints.append(part[2])
            for lo, hi in zip(cutpoints, cutpoints[1:]):
                sub = [o for o in part[0] if self.offset[o] < 0 and not (self.hi[o] <= lo or hi <= self.lo[o])]
                if sub and not self._subsolve((sub, lo, hi)):
                    return False
            return True
        finally:
            for s in range(self.lo[b], self.hi[b] - 1):
                self.cuts[s] += 1


def fits(problem: Problem, capacity: int, deadline: float, *, native: bool | None = None,
         heuristics=HEURISTICS) -> tuple[str, np.ndarray, dict]:
    """Decide whether ``problem`` fits under ``capacity``: ('found' | 'infeasible' | 'timeout',
    offsets (valid only when found), details)."""
    remaining = max(deadline - time.perf_counter(), 0.0)
    module = packing_native.load() if native in (None, True) else None
    if native and module is None:
        raise RuntimeError(f"native packing search unavailable: {packing_native.build_error()}")
    if module is not None:
        status, offsets, nodes, backtracks = module.solve(
            problem.start, problem.end, problem.size, problem.align, int(capacity), remaining, list(heuristics))
        return status, np.asarray(offsets, np.int64), {"nodes": int(nodes), "backtracks": int(backtracks),
                                                         "engine": "c++"}
    search = _PySearch(problem, capacity, time.perf_counter() + remaining, heuristics)
    status, offsets = search.solve()
    return status, np.asarray(offsets, np.int64), {"nodes": search.nodes, "backtracks": search.backtracks,
                                                     "engine": "python"}


def minimize_arena(problem: Problem, *, upper: int, hint: np.ndarray, capacity: int | None,
                   deadline: float, bound: int, progress: Callable[[str], None] | None = None,
                   native: bool | None = None) -> SolveResult:
    """Smallest arena the search can prove within the deadline, starting from the feasible ``hint``
    (arena ``upper``); with ``capacity``, just decide whether the buffers fit under it."""
    details: dict = {"probes": []}

    def probe(cap: int, share: float):
        limit = time.perf_counter() + share * max(deadline - time.perf_counter(), 0.0)
        status, offsets, info = fits(problem, cap, min(limit, deadline), native=native)
        details["probes"].append((cap, status, info["nodes"]))
        details["engine"] = info["engine"]
        if progress:
            progress(f"search: capacity {cap} -> {status} ({info['nodes']} nodes)")
        return status, offsets

    if capacity is not None:
        status, offsets = probe(capacity, 1.0)
        if status == "found":
            return SolveResult(offsets, "optimal", bound, "search", details)
        return SolveResult(hint, status, capacity + 1 if status == "infeasible" else bound, "search", details)

    # every offset and top is a multiple of the gcd of the sizes and alignments: bisect on that grid
    grid = int(np.gcd.reduce(np.concatenate([problem.size[problem.size > 0], problem.align])))
    best, best_arena, proven = hint, upper, bound
    low, high = -(-bound // grid), (upper - 1) // grid
    first = True
    while low <= high and time.perf_counter() < deadline:
        step = low if first else (low + high) // 2
        cap = step * grid
        # infeasibility proofs are the slow probes: keep each probe short so a timeout costs little
        status, offsets = probe(cap, 0.25 if first else 1.0 / 6.0)
        first = False
        if status == "found":
            best, best_arena = offsets, arena_of(problem, offsets)
            high = (best_arena - 1) // grid
        elif status == "infeasible":
            proven = max(proven, cap + grid)
            low = step + 1
        else:
            low = step + 1  # unknown: look higher, but the bound stays unproven
    if proven >= best_arena:
        status = "optimal"
    else:
        status = "timeout" if time.perf_counter() >= deadline else "feasible"
    return SolveResult(best, status, min(proven, best_arena), "search", details)
