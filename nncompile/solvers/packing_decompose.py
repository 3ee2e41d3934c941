"""Temporal decomposition for large traces (thousands to tens of thousands of buffers).

The trace is cut at instants where few bytes are live. A buffer that lives entirely between two
cuts is *local* to that window; the others *cross* a cut. Local buffers of different windows never
live together, so once the crossing buffers have offsets, each window is an independent problem:
place its local buffers around the crossing buffers alive there. The plan is:

1. a whole-trace greedy (gravity by area, best fit by size, first fit) gives every offset;
2. windows are cut at local minima of the live-bytes profile, each holding at most
   ``WINDOW_BUFFERS`` local buffers;
3. the windows spanned by a buffer that reaches the arena are re-solved: the buffers local to that
   span are re-placed with every greedy ordering around the fixed buffers crossing into it, or,
   when nothing crosses into it, by the exact search at its lower bound first; the best answer is
   stitched back if it lowers the arena. A span that does not improve is widened by one window on
   each side (overlapping windows) and tried again, until the time is up or it covers the trace.

Window pieces are independent, so the stitched plan is valid by construction (and tests check it).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from nncompile.solvers import packing_greedy, packing_search
from nncompile.solvers.packing import Problem, SolveResult, arena_of, live_bytes_profile, max_live_bytes

FLAT_LIMIT = 4000  # above this many buffers, ``auto`` plans by decomposition
WINDOW_BUFFERS = 1500
WINDOW_SECONDS = 2.0  # the window phase gets this, or a fifth of the remaining time if more
FAST_ORDERINGS = ("gravity-area", "size", "size-ff")


def choose_cuts(problem: Problem, window_buffers: int = WINDOW_BUFFERS) -> np.ndarray:
    """Cut instants: scanning time forward, each window closes at the instant of least live bytes
    among those where it has collected between half and all of ``window_buffers`` starts."""
    times, live = live_bytes_profile(problem.start, problem.end, problem.size)
    starts_before = np.searchsorted(np.sort(problem.start), times, side="left")
    cuts = []
    opened = 0  # number of buffers started before the current window
    i = 0
    while i < len(times):
        in_window = starts_before - opened
        lo = np.searchsorted(in_window, window_buffers // 2, side="left")
        hi = np.searchsorted(in_window, window_buffers, side="right")
        if lo >= len(times) or hi <= lo:
            if hi <= lo < len(times):
                hi = lo + 1
            else:
                break
        best = lo + int(np.argmin(live[lo:hi]))
        if best <= i:
            best = i + 1
            if best >= len(times):
                break
        cuts.append(times[best])
        opened = starts_before[best]
        i = best
    return np.array(cuts, dtype=np.int64)


def windows_of(problem: Problem, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window index of each buffer's first and last live instant."""
    first = np.searchsorted(cuts, problem.start, side="right")
    last = np.searchsorted(cuts, problem.end - 1, side="right")
    return first, last


def _resolve_window(problem: Problem, offsets: np.ndarray, local: np.ndarray, crossing: np.ndarray,
                    deadline: float) -> tuple[np.ndarray, str]:
    """Best re-placement of the ``local`` buffers around the fixed ``crossing`` ones."""
    fixed = np.full(problem.n, -1, np.int64)
    fixed[crossing] = offsets[crossing]
    current = offsets.copy()
    best_top = int((offsets[local] + problem.size[local]).max())
    how = "kept"
    if len(crossing) == 0 and len(local) <= FLAT_LIMIT and time.perf_counter() < deadline:
        sub = problem.subset(local)
        bound = max_live_bytes(sub.start, sub.end, sub.size)
        status, found, _ = packing_search.fits(sub, bound, min(deadline, time.perf_counter() + 1.0))
        if status == "found" and arena_of(sub, found) < best_top:
            current[local] = found
            return current, "search"
    for name in packing_greedy.ORDERINGS:
        if time.perf_counter() >= deadline:
            break
        order, best_fit = packing_greedy.ordering(problem, name, local)
        placed = packing_greedy.place(problem, order, best_fit, fixed)
        top = int((placed[local] + problem.size[local]).max())
        if top < best_top:
            best_top = top
            current[local] = placed[local]
            how = name
    return current, how


def plan_decomposed(problem: Problem, *, bound: int, deadline: float, target: int | None = None,
                    progress: Callable[[str], None] | None = None) -> SolveResult:
    """Plan a large trace: whole-trace greedy, then re-solve the window at the top, repeatedly;
    stop as soon as the arena is at most ``target`` (default: the lower bound ``bound``)."""
    started = time.perf_counter()
    target = bound if target is None else target
    base = packing_greedy.greedy_offsets(problem, orderings=FAST_ORDERINGS, bound=target)
    offsets = base.offsets
    details = {"greedy_arena": base.arena, "greedy_ordering": base.ordering,
               "greedy_seconds": time.perf_counter() - started}
    if progress:
        progress(f"greedy arena {base.arena} (bound {bound})")
    cuts = choose_cuts(problem)
    first, last = windows_of(problem, cuts)
    details["windows"] = len(cuts) + 1
    improved = 0
    tried: set[tuple[int, int]] = set()
    last_window = len(cuts)
    now = time.perf_counter()
    deadline = min(deadline, now + max(WINDOW_SECONDS, 0.2 * (deadline - now)))
    while time.perf_counter() < deadline:
        arena = arena_of(problem, offsets)
        if arena <= target:
            break
        critical = np.nonzero(offsets + problem.size == arena)[0]
        # the span of windows covering a buffer at the top, widened one window per side on each
        # failed attempt (overlapping windows), until it improves or covers the whole trace
        span = None
        for b in critical:
            lo, hi = int(first[b]), int(last[b])
            while (lo, hi) in tried and (lo > 0 or hi < last_window):
                lo, hi = max(lo - 1, 0), min(hi + 1, last_window)
            if (lo, hi) not in tried:
                span = (lo, hi)
                break
        if span is None:
            break
        tried.add(span)
        lo, hi = span
        local = np.nonzero((first >= lo) & (last <= hi))[0]
        window_lo = cuts[lo - 1] if lo > 0 else problem.start.min()
        window_hi = cuts[hi] if hi < len(cuts) else problem.end.max()
        crossing = np.nonzero(((first < lo) | (last > hi)) & (problem.start < window_hi)
                              & (problem.end > window_lo))[0]
        new_offsets, how = _resolve_window(problem, offsets, local, crossing, deadline)
        if arena_of(problem, new_offsets) < arena:
            offsets = new_offsets
            improved += 1
            if progress:
                progress(f"windows {lo}..{hi} re-solved by {how}: arena {arena_of(problem, offsets)}")
    details["windows_improved"] = improved
    return SolveResult(offsets, "feasible", bound, "decompose", details)
