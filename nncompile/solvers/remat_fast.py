"""Fast recomputation selection for graphs of any size: a greedy path over "dropped gaps".

Every op ``v`` is used by consumers ``c_1 < c_2 < ...`` (stages in topological order).  Between two
consecutive uses lies a *gap* ``(c_{i-1}, c_i]`` (the first gap starts at ``v`` itself).  A plan
gives each gap a mode:

* ``KEEP``  the output stays resident through the gap (what the plain schedule does);
* ``HOLD``  it is freed at the start of the gap; the first time it is needed again (by its
  consumer ``c_i``, or earlier to recompute something else) it is recomputed and then held
  until ``c_i``, so one recompute serves the whole gap (Chen-style segments);
* ``LAZY``  it is freed at the start of the gap and every need inside the gap recomputes it
  transiently (least memory, possibly repeated work).

A plan may also *extend* an output past its last use (key ``(v, EXTEND)`` -> stage), so that a
later recompute of one of its consumers finds it resident instead of recomputing a whole chain of
ancestors (this is what makes recomputation pay on DAGs with long-range edges).

``build_sequence`` turns the modes into a compute sequence stage by stage (op ``t`` runs after the
recursive recomputes of its missing inputs); the simulator's profile of that sequence gives the
real peak and compute.  The search walks a budget-independent path: at each level (0.5% of the
plain peak below the last plan) it applies the move (drop a gap, or drop it and extend its
inputs) with the best (excess memory removed) / (compute added), judged by simulating each of a
few candidates ranked by an estimate, until the peak is under the level; then it takes back drops
that are no longer needed, and records the plan.  ``solve_fast`` returns
the first plan on the path whose peak fits the budget; since the path does not depend on the
budget, a smaller budget can only move further along it, so the peak never rises as the budget
falls.  The last plan of the path is the least peak this method reaches (``min_feasible_peak``).

Example::

    plan = solve_fast(g, budget_bytes)        # FastPlan(sequence, peak, compute, ...)
"""
from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from nncompile.solvers.remat_graph import RematGraph
from nncompile.solvers.remat_sim import sequence_profile

KEEP, HOLD, LAZY = 0, 1, 2
EXTEND = -1   # plan key (v, EXTEND) -> stage: v's copy is held until that stage even when unused


@dataclass(frozen=True)
class FastPlan:
    """One plan on the path: its compute sequence and simulated figures."""

    sequence: list[int]
    peak: int
    compute: float
    dropped: int           # number of gaps not kept


class GapModel:
    """The gaps of a graph and the compute sequence a choice of gap modes implies."""

    def __init__(self, graph: RematGraph):
        self.graph = graph
        self.consumers = [list(graph.succs[v]) for v in range(graph.n)]
        # gap (v, i) covers stages (start, consumers[v][i]]; droppable if it spans a stage
        self.gaps: list[tuple[int, int]] = []
        for v in range(graph.n):
            previous = v
            for i, c in enumerate(self.consumers[v]):
                if c - previous >= 2:
                    self.gaps.append((v, i))
                previous = c
        self.gap_set = set(self.gaps)

    def gap_span(self, gap: tuple[int, int]) -> tuple[int, int]:
        v, i = gap
        start = v if i == 0 else self.consumers[v][i - 1]
        return start, self.consumers[v][i]

    def build_sequence(self, modes: dict[tuple[int, int], int]) -> list[int]:
        """The compute sequence of a plan (gaps not in ``modes`` are kept).

        ``modes`` maps a gap ``(v, i)`` to KEEP/HOLD/LAZY, and ``(v, EXTEND)`` to a stage up to
        which ``v`` stays resident after it would otherwise be freed.
        """
        graph = self.graph
        n = graph.n
        preds = graph.preds
        consumers = self.consumers
        resident = [False] * n
        expire: list[list[int]] = [[] for _ in range(n)]
        hold_until = [-1] * n
        sequence: list[int] = []
        touched = {key[0] for key in modes}

        def retain(v: int, t: int, recomputed_in_gap: bool) -> None:
            """Decide whether v's copy, resident at the end of stage t, stays for later stages."""
            cons = consumers[v]
            i = bisect_right(cons, t)
            hold = -1
            if i < len(cons):
                if v not in touched:
                    hold = cons[-1]  # every gap kept: straight to the last use
                else:
                    mode = modes.get((v, i), KEEP)
                    if mode == KEEP or (mode == HOLD and recomputed_in_gap):
                        j = i + 1
                        while j < len(cons) and modes.get((v, j), KEEP) == KEEP:
                            j += 1
                        hold = cons[j - 1]
            extended = modes.get((v, EXTEND), -1)
            if hold < 0 and extended > t:
                # kept past its use so that a later recompute of a consumer finds it resident
                hold = extended if i == len(cons) else min(extended, cons[i])
            if hold < 0:
                resident[v] = False
            else:
                hold_until[v] = hold
                expire[hold].append(v)

        for t in range(n):
            made: list[int] = []
            stack = []
            for u in preds[t]:
                if not resident[u]:
                    stack.append(u)
            # recompute missing inputs depth-first, each after its own missing inputs
            while stack:
                u = stack[-1]
                if resident[u]:
                    stack.pop()
                    continue
                missing = [w for w in preds[u] if not resident[w]]
                if missing:
                    stack.extend(missing)
                    continue
                stack.pop()
                sequence.append(u)
                resident[u] = True
                made.append(u)
            sequence.append(t)
            resident[t] = True
            for v in expire[t]:
                if resident[v] and hold_until[v] == t:
                    retain(v, t, False)
            expire[t] = []
            for v in made:
                # a copy recomputed inside a gap (not at the gap's start) may be held (HOLD)
                cons = consumers[v]
                i = bisect_right(cons, t)
                at_start = i > 0 and cons[i - 1] == t
                retain(v, t, not at_start)
            retain(t, t, False)
        return sequence


def _recompute_price(graph: RematGraph, v: int, position: int, copies, depth: int, cache: dict) -> float:
    """Estimated compute to make ``v`` again at ``position``: v plus its inputs gone by then."""
    key = (v, position, depth)
    if key in cache:
        return cache[key]
    price = graph.cost[v]
    if depth > 0:
        for u in graph.preds[v]:
            if not any(start < position <= end for start, end in copies.get(u, ())):
                price += _recompute_price(graph, u, position, copies, depth - 1, cache)
    cache[key] = price
    return price


def _excess(live: list[int], level: int) -> int:
    return sum(x - level for x in live if x > level)


class _Path:
    """The greedy path of plans, walked level by level (budget-independent)."""

    def __init__(self, graph: RematGraph, step_fraction: float = 0.005, candidates: int = 6,
                 lookahead: float = 0.1):
        self.graph = graph
        self.model = GapModel(graph)
        self.modes: dict[tuple[int, int], int] = {}
        self.peak0 = sequence_profile(graph, list(range(graph.n))).peak
        self.step = max(1, int(step_fraction * self.peak0))
        self.candidates = candidates
        self.lookahead = lookahead
        self.floor = graph.floor_bytes()
        self.current = self._evaluate(self.modes)

    def _evaluate(self, modes):
        sequence = self.model.build_sequence(modes)
        profile = sequence_profile(self.graph, sequence)
        return sequence, profile

    def plan(self) -> FastPlan:
        sequence, profile = self.current
        return FastPlan(sequence, profile.peak, profile.compute, sum(1 for key in self.modes if key[1] != EXTEND))

    def _moves(self, live, level):
        """Candidate (gap, mode) moves, best approximate excess-removed per added compute first.

        The approximation credits a gap with the over-level bytes its copy occupies at positions
        strictly inside the gap, where it is neither made nor used.
        """
        sequence, profile = self.current
        graph = self.graph
        consumers = self.model.consumers
        first_positions = _first_positions(sequence, graph.n)
        # the first computation of op t closes stage t
        stage_of_pos = [0] * len(sequence)
        previous = -1
        for t, pos in enumerate(first_positions):
            for p in range(previous + 1, pos + 1):
                stage_of_pos[p] = t
            previous = pos
        over_pos = [pos for pos, x in enumerate(live) if x > level]
        gains: dict[tuple[int, int], int] = {}
        for c, v in enumerate(profile.nodes):
            first, last = profile.starts[c], profile.ends[c]
            if last - first < 2:
                continue
            size = graph.mem[v]
            cons = consumers[v]
            for k in range(bisect_right(over_pos, first), bisect_left(over_pos, last)):
                pos = over_pos[k]
                s = stage_of_pos[pos]
                i = bisect_left(cons, s)
                if i < len(cons) and cons[i] != s:
                    gap = (v, i)
                    gains[gap] = gains.get(gap, 0) + min(size, live[pos] - level)
        copies: dict[int, list[tuple[int, int]]] = {}
        for c, v in enumerate(profile.nodes):
            copies.setdefault(v, []).append((profile.starts[c], profile.ends[c]))
        by_own_cost = []
        for gap, gain in gains.items():
            mode = self.modes.get(gap, KEEP)
            if mode == LAZY or gap not in self.model.gap_set:
                continue
            v, i = gap
            where = first_positions[consumers[v][i]]
            by_own_cost.append((-gain / (graph.cost[v] + 1e-9), gap, mode, where, gain))
        by_own_cost.sort()
        # the chain estimate is at least the op's own cost, so once the own-cost score falls
        # below the k-th best chain score nothing further down can enter the top k
        by_chain_cost: list = []
        cache: dict = {}
        for own_score, gap, mode, where, gain in by_own_cost:
            if len(by_chain_cost) >= self.candidates and own_score >= by_chain_cost[-1][0]:
                break
            chain = _recompute_price(graph, gap[0], where, copies, 3, cache)
            by_chain_cost.append((-gain / (chain + 1e-9), gap, mode, where))
            by_chain_cost.sort()
            del by_chain_cost[self.candidates:]
        by_own_cost = [item[:4] for item in by_own_cost]
        # the best few by the op's own cost and by the estimated cost of its recompute chain
        chosen = []
        for item in by_own_cost[: self.candidates] + by_chain_cost[: self.candidates]:
            if all(item[1] != other[1] for other in chosen):
                chosen.append(item)
        moves = []
        for _, gap, mode, where in chosen:
            if mode == KEEP:
                moves.append({gap: HOLD})
            moves.append({gap: LAZY})
            # or drop it and keep its vanished inputs until the recompute, so it costs one op
            v, i = gap
            missing = [u for u in graph.preds[v]
                       if not any(start < where <= end for start, end in copies.get(u, ()))]
            if missing:
                move = {gap: HOLD if mode == KEEP else LAZY}
                for u in missing:
                    move[(u, EXTEND)] = max(self.modes.get((u, EXTEND), -1), consumers[v][i])
                moves.append(move)
        return moves

    def descend(self, level: int) -> bool:
        """Drop gaps until the peak is at most ``level``; False when no move helps any more."""
        mem = self.graph.mem
        # moves are ranked by the excess they remove below a deeper level, so that a drop that
        # will pay off further down the path wins over a cheaper one that only just helps now
        look = level - int(self.lookahead * self.peak0)
        while self.current[1].peak > level:
            sequence, profile = self.current
            live = profile.live_bytes(mem)
            base_level = _excess(live, level)
            base_look = _excess(live, look)
            best = None
            for move in self._moves(live, look):
                trial = dict(self.modes)
                trial.update(move)
                result = self._evaluate(trial)
                new_live = result[1].live_bytes(mem)
                gain_level = base_level - _excess(new_live, level)
                gain_look = base_look - _excess(new_live, look)
                # progress at the level, or at least below it without losing ground at the level
                if result[1].peak > profile.peak or gain_level < 0 or (gain_level == 0 and gain_look <= 0):
                    continue
                added = max(result[1].compute - profile.compute, 1e-9)
                score = ((gain_look + gain_level) / added, -result[1].peak)
                if best is None or score > best[0]:
                    best = (score, trial, result)
            if best is None:
                return False
            self.modes, self.current = best[1], best[2]
        return True

    def take_back(self, level: int) -> None:
        """Undo drops and extensions (most compute saved first) while the peak stays <= ``level``."""
        graph = self.graph
        order = sorted(self.modes, key=lambda key: (key[1] == EXTEND, -graph.cost[key[0]], key))
        live = first_positions = None
        for key in order:
            if key not in self.modes:
                continue
            if key[1] == EXTEND:
                trial = dict(self.modes)
                del trial[key]
                result = self._evaluate(trial)
                if result[1].peak <= level and result[1].compute <= self.current[1].compute:
                    self.modes, self.current = trial, result
                    live = None
                continue
            if live is None:
                live = self.current[1].live_bytes(graph.mem)
                first_positions = _first_positions(self.current[0], graph.n)
            # keeping the output through the gap adds its bytes at every position inside
            start, end = self.model.gap_span(key)
            inside = live[first_positions[start] + 1:first_positions[end]]
            if inside and max(inside) + graph.mem[key[0]] > level:
                continue
            mode = self.modes[key]
            for relaxed in ((KEEP,) if mode == HOLD else (KEEP, HOLD)):
                trial = dict(self.modes)
                if relaxed == KEEP:
                    del trial[key]
                else:
                    trial[key] = relaxed
                result = self._evaluate(trial)
                if result[1].peak <= level and result[1].compute < self.current[1].compute:
                    self.modes, self.current = trial, result
                    live = None
                    break


def _first_positions(sequence: list[int], n: int) -> list[int]:
    """Position of each op's first computation (which closes its stage)."""
    first = [-1] * n
    for pos, v in enumerate(sequence):
        if first[v] < 0:
            first[v] = pos
    return first


def solve_fast(graph: RematGraph, budget: int, time_limit: float | None = None) -> FastPlan | None:
    """The first plan on the greedy path whose simulated peak is at most ``budget`` (or None)."""
    for plan in walk_path(graph, stop_at=budget, time_limit=time_limit):
        if plan.peak <= budget:
            return plan
    return None


def walk_path(graph: RematGraph, stop_at: int | None = None, time_limit: float | None = None):
    """Yield the plans of the path, peaks decreasing, until one fits ``stop_at`` or none helps."""
    start = time.perf_counter()
    path = _Path(graph)
    plan = path.plan()
    yield plan
    while True:
        if stop_at is not None and plan.peak <= stop_at:
            return
        if time_limit is not None and time.perf_counter() - start > time_limit:
            return
        level = plan.peak - path.step
        if level < path.floor:
            level = path.floor
        if plan.peak <= path.floor or not path.descend(level):
            return
        path.take_back(path.current[1].peak)
        new = path.plan()
        if new.peak >= plan.peak:
            return
        plan = new
        yield plan


def min_feasible_peak(graph: RematGraph, time_limit: float | None = None) -> FastPlan:
    """The plan of least peak on the greedy path (the smallest budget fast mode can meet)."""
    best = None
    for plan in walk_path(graph, time_limit=time_limit):
        if best is None or plan.peak < best.peak:
            best = plan
    return best
