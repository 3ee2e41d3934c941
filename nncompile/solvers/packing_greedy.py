"""Greedy arena planners: best-fit and first-fit under several buffer orderings, the best kept.

Each ordering places buffers one at a time. A buffer goes into the free address gap (among the
buffers already placed that are live at the same time) that fits it most tightly (best fit,
TFLite's ``GreedyBySize``) or into the lowest gap that fits (first fit); with no gap it goes on
top. The placed buffers are kept sorted by offset, so one placement is a single linear scan
(numba-compiled from 200 buffers up): 60k buffers take about two seconds per ordering, and the loop over orderings
stops as soon as one reaches the lower bound.

Orderings (all descending unless said): size (ties by start time), size then lifetime length,
lifetime length, area (size x length), start time ascending, the largest tenth by size then the
rest by start time; best-fit everywhere plus a first-fit-decreasing variant of the size ordering.

``gravity-*`` orderings place differently: MiniMalloc's canonical order without backtracking.
Each step takes the buffer that can drop lowest (above the placed buffers it overlaps), ties
broken by area or size. It is O(n^2) but finds layouts the gap-filling greedy misses on traces
dominated by long-lived buffers (IOPDDL S_1: 1.002x the bound against 1.016x).

Example::

    res = greedy_offsets(Problem.from_buffers(bufs))
    res.arena, res.ordering, res.offsets
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nncompile.solvers.packing import Problem, max_live_bytes

# in the order they are tried; the first ones are the strongest on real traces
ORDERINGS = ("size", "size-ff", "gravity-area", "size-length", "length", "area", "start", "size-start",
             "gravity-size")


@dataclass
class GreedyResult:
    """The best ordering's offsets and arena, and the arena of every ordering tried."""

    offsets: np.ndarray
    arena: int
    ordering: str
    tried: dict


# Problems with fewer buffers than this run the placement loops as plain Python: importing numba
# (and the scipy it pulls in) costs about a second, more than these loops take on small graphs.
JIT_MIN_BUFFERS = 200
_jitted: dict = {}


def _kernels(n: int):
    """(place, gravity): numba-compiled for large problems, the same functions in Python for small."""
    if n < JIT_MIN_BUFFERS:
        return _place, _gravity
    if not _jitted:
        global _align_up
        import numba

        # numba resolves _place's call to _align_up through the module globals when it compiles
        _align_up = numba.njit(cache=True)(_align_up)
        _jitted["place"] = numba.njit(cache=True)(_place)
        _jitted["gravity"] = numba.njit(cache=True)(_gravity)
    return _jitted["place"], _jitted["gravity"]


def _align_up(value, align):
    rem = value % align
    return value if rem == 0 else value + align - rem


def _place(start, end, size, align, order, fixed_off, best_fit):
    """Place buffers ``order`` one by one; buffers with ``fixed_off >= 0`` are obstacles already
    placed. Returns the offsets of all buffers (obstacles keep theirs)."""
    n = start.shape[0]
    offsets = fixed_off.copy()
    # placed buffers sorted by offset: parallel arrays
    p_off = np.empty(n, np.int64)
    p_top = np.empty(n, np.int64)
    p_start = np.empty(n, np.int64)
    p_end = np.empty(n, np.int64)
    count = 0
    fixed = np.nonzero(fixed_off >= 0)[0]
    if fixed.shape[0] > 0:
        by_offset = fixed[np.argsort(fixed_off[fixed], kind="mergesort")]
        for i in by_offset:
            p_off[count] = fixed_off[i]
            p_top[count] = fixed_off[i] + size[i]
            p_start[count] = start[i]
            p_end[count] = end[i]
            count += 1
    for b in order:
        s = start[b]
        e = end[b]
        z = size[b]
        a = align[b]
        frontier = 0
        best_off = -1
        best_gap = np.int64(2) ** 62
        for j in range(count):
            if p_start[j] < e and p_end[j] > s:
                cand = _align_up(frontier, a)
                gap = p_off[j] - cand
                if gap >= z and gap < best_gap:
                    best_gap = gap
                    best_off = cand
                    if not best_fit or gap == z:
                        break
                if p_top[j] > frontier:
                    frontier = p_top[j]
        if best_off < 0:
            best_off = _align_up(frontier, a)
        offsets[b] = best_off
        # insert into the offset-sorted arrays (binary search, then shift right)
        lo = 0
        hi = count
        while lo < hi:
            mid = (lo + hi) // 2
            if p_off[mid] <= best_off:
                lo = mid + 1
            else:
                hi = mid
        for j in range(count, lo, -1):
            p_off[j] = p_off[j - 1]
            p_top[j] = p_top[j - 1]
            p_start[j] = p_start[j - 1]
            p_end[j] = p_end[j - 1]
        p_off[lo] = best_off
        p_top[lo] = best_off + z
        p_start[lo] = s
        p_end[lo] = e
        count += 1
    return offsets


def _gravity(start, end, size, align, rank):
    """Canonical "gravity" placement: repeatedly take the unplaced buffer with the lowest offset it
    can drop to (above every placed buffer it overlaps in time; ties by ``rank``) and place it there.
    One fused pass per step updates the drop offsets and picks the next buffer: O(n^2), over
    compact arrays of the unplaced buffers (swap-remove) so that every pass reads memory in order."""
    n = start.shape[0]
    u_start = start.copy()
    u_end = end.copy()
    u_size = size.copy()
    u_align = align.copy()
    u_rank = rank.copy()
    u_id = np.arange(n)
    u_min = np.zeros(n, np.int64)  # lowest offset each unplaced buffer can drop to
    offsets = np.zeros(n, np.int64)
    count = n
    pick = 0
    for k in range(1, count):
        if u_rank[k] < u_rank[pick]:
            pick = k
    while count > 0:
        offsets[u_id[pick]] = u_min[pick]
        height = u_min[pick] + u_size[pick]
        s = u_start[pick]
        e = u_end[pick]
        last = count - 1
        u_start[pick] = u_start[last]
        u_end[pick] = u_end[last]
        u_size[pick] = u_size[last]
        u_align[pick] = u_align[last]
        u_rank[pick] = u_rank[last]
        u_id[pick] = u_id[last]
        u_min[pick] = u_min[last]
        count = last
        best_off = np.int64(2) ** 62
        best_rank = np.int64(2) ** 62
        pick = 0
        for k in range(count):
            m = u_min[k]
            if u_start[k] < e and u_end[k] > s and m < height:
                m = _align_up(height, u_align[k])
                u_min[k] = m
            if m < best_off or (m == best_off and u_rank[k] < best_rank):
                best_off = m
                best_rank = u_rank[k]
                pick = k
    return offsets


def ordering(problem: Problem, name: str, index: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Buffer indices (of ``index`` or all) in the named order, and whether to use best fit."""
    idx = np.arange(problem.n) if index is None else np.asarray(index, dtype=np.int64)
    size = problem.size[idx]
    start = problem.start[idx]
    length = problem.end[idx] - start
    # np.lexsort sorts by the last key first; negate for descending
    if name in ("size", "size-ff"):
        keys = (start, -size)
    elif name == "size-length":
        keys = (start, -length, -size)
    elif name == "length":
        keys = (start, -size, -length)
    elif name in ("area", "gravity-area"):
        keys = (start, -length, -(size * length))
    elif name == "gravity-size":
        keys = (start, -length, -size)
    elif name == "start":
        keys = (-length, -size, start)
    elif name == "size-start":
        # big buffers first, then in time order: a skyline-like fill for the small ones
        big = size >= np.percentile(size, 90) if len(size) else size
        keys = (-size, start, ~big)
    else:
        raise ValueError(f"unknown greedy ordering {name!r}")
    return idx[np.lexsort(keys)], name != "size-ff"


def place(problem: Problem, order: np.ndarray, best_fit: bool = True,
          fixed_offsets: np.ndarray | None = None, gravity: bool = False) -> np.ndarray:
    """Offsets for ``order`` placed greedily around ``fixed_offsets`` (-1 = to place); with
    ``gravity``, ``order`` is the tie-break rank of the canonical lowest-offset-first placement."""
    fixed = np.full(problem.n, -1, np.int64) if fixed_offsets is None else np.asarray(fixed_offsets, np.int64)
    order = np.asarray(order, np.int64)
    if gravity:
        if len(order) != problem.n or (fixed >= 0).any():
            raise ValueError("gravity placement plans every buffer and takes no fixed ones")
        rank = np.empty(problem.n, np.int64)
        rank[order] = np.arange(problem.n)
        return _kernels(problem.n)[1](problem.start, problem.end, problem.size, problem.align, rank)
    return _kernels(problem.n)[0](problem.start, problem.end, problem.size, problem.align,
                  np.asarray(order, np.int64), fixed, best_fit)


def greedy_offsets(problem: Problem, *, orderings=ORDERINGS, bound: int | None = None,
                   fixed_offsets: np.ndarray | None = None, index: np.ndarray | None = None) -> GreedyResult:
    """Run each ordering, keep the smallest arena, stop early once an arena meets ``bound``.

    With ``index`` only those buffers are placed (around ``fixed_offsets``); the arena is then the
    top of everything placed or fixed.
    """
    if bound is None:
        bound = max_live_bytes(problem.start, problem.end, problem.size)
    best: GreedyResult | None = None
    tried = {}
    for name in orderings:
        gravity = name.startswith("gravity")
        if gravity and (index is not None or fixed_offsets is not None):
            continue  # gravity placement works on whole problems only
        order, best_fit = ordering(problem, name, index)
        offsets = place(problem, order, best_fit, fixed_offsets, gravity)
        placed = offsets >= 0
        arena = int((offsets[placed] + problem.size[placed]).max()) if placed.any() else 0
        tried[name] = arena
        if best is None or arena < best.arena:
            best = GreedyResult(offsets, arena, name, tried)
        if arena <= bound:
            break
    assert best is not None
    return best
