"""The search: decision tree + DP per stage + pipeline partition + branch and bound over settings.

For a global batch size the search walks the settings (pipeline degree at the root of the decision
tree, then micro-batch count, embedding/head TP degree and sharding). Settings are visited in order
of a lower bound on their step time (every layer on its fastest strategy, memory ignored, pipeline
perfectly balanced) and the walk stops when the bound reaches the best plan found.

For a setting, each stage is solved by the chain DP (``dp.py``) over the strategies the decision
tree keeps (``strategy.py``), under the device memory minus the stage's fixed memory. The working set
of a recomputed layer is a maximum, not a sum; the DP is run once per possible value ``R`` of that
maximum (strategies with a larger working set excluded, ``R`` reserved), keeping the best.

Pipeline partitions (Galvatron-BMW's bi-objective step): start from a division balanced for time
(fastest strategies) and one balanced for memory (smallest strategies, weighted by the micro-batches
in flight on each stage), then move one layer at a time across a stage boundary while the step time
improves, or, while some stage does not fit, while the worst memory overflow shrinks. Stage
solutions are memoized by (stage, first layer, last layer).

    result = search(model, cluster, SearchOptions(global_bsz=64))
    result.plan, result.cost.step_ms, result.seconds
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from nncompile.errors import SolverError
from nncompile.parallel.cluster import Cluster
from nncompile.parallel.cost import CostModel, PlanCost, Setting
from nncompile.parallel.dp import solve_chain
from nncompile.parallel.model import ModelCost
from nncompile.parallel.plan import Plan
from nncompile.parallel.strategy import Strategy, feasible_strategies, powers_of_two_up_to, pruned_strategies


REFINE_SETTINGS = 4          # settings whose pipeline partition is refined by local moves


@dataclass(frozen=True)
class SearchOptions:
    """What to search over; ``None`` means "choose"."""

    global_bsz: int | None = None
    memory_mb: float | None = None          # overrides the cluster's device memory
    pp_degrees: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    max_chunks: int = 64
    vtp_degrees: tuple[int, ...] | None = None
    embed_sdp: tuple[bool, ...] = (False, True)
    prune: bool = True                      # decision-tree rules 1-3 and 5 (False: every runnable strategy)
    mem_unit_mb: float | None = None        # DP memory granularity (default: budget / 1024)
    max_bsz: int = 4096                     # upper end of the batch-size scan
    dp_kind: str = "zero2"
    pipeline_type: str = "pipedream_flush"
    partition_search: bool = True


@dataclass
class SearchResult:
    plan: Plan
    cost: PlanCost
    seconds: float
    stats: dict = field(default_factory=dict)


@dataclass
class _StageSolution:
    objective: float                        # chunks * per-micro-batch + unhidden sync (ms)
    strategies: list[Strategy] | None       # None: nothing fits
    overflow_mb: float                      # > 0: memory missing even with the smallest strategies


class _SettingSolver:
    """Solves one setting: stage DPs (memoized) and the pipeline partition."""

    def __init__(self, cm: CostModel, setting: Setting, options: SearchOptions, memory_mb: float, stats: dict,
                 shared: dict | None = None):
        self.cm, self.setting, self.options, self.memory_mb, self.stats = cm, setting, options, memory_mb, stats
        # caches shared by settings that differ only in the embedding/head choices (vtp, embed_sdp)
        self.shared = {} if shared is None else shared.setdefault((setting.pp_deg, setting.chunks), {})
        devices = cm.stage_devices(setting)
        if options.prune:
            self.strategies = pruned_strategies(devices, cm.cluster.tp_limit, setting.global_bsz, setting.chunks)
        else:
            self.strategies = feasible_strategies(devices, setting.global_bsz, setting.chunks)
        self.memo: dict[tuple[int, int, int], _StageSolution] = {}
        self._row_cache: dict = self.shared.setdefault("rows", {})
        self._middle_memo: dict = self.shared.setdefault("middle", {})
        layouts = sorted({s.layout for s in self.strategies})
        self.group = np.array([layouts.index(s.layout) for s in self.strategies], dtype=np.int64)
        self.representative = [next(s for s in self.strategies if s.layout == lay) for lay in layouts]

    def _rows(self, stage: int, layer_index: int):
        """Per-strategy (time, memory, working set) of one layer and its transition matrix, cached
        per distinct layer (a chain of identical blocks costs one computation)."""
        cm, setting, strategies = self.cm, self.setting, self.strategies
        key = (stage, cm.model.layers[layer_index])
        if key not in self._row_cache:
            inflight = setting.inflight(stage)
            figs = [cm.layer(layer_index, s, setting, stage) for s in strategies]
            t = np.array([setting.chunks * f.per_microbatch + f.extra for f in figs])
            mem = np.array([f.states_mb + inflight * f.act_mb for f in figs])
            transient = np.array([f.transient_mb for f in figs])
            reps = self.representative
            trans = np.array([[setting.chunks * cm.transition(layer_index, sa, sb, setting, stage)
                               for sb in reps] for sa in reps])
            self._row_cache[key] = (t, mem, transient, trans)
        return self._row_cache[key]

    def _arrays(self, stage: int, lo: int, hi: int):
        rows = [self._rows(stage, i) for i in range(lo, hi)]
        t = np.stack([r[0] for r in rows])
        mem = np.stack([r[1] for r in rows])
        transient = np.stack([r[2] for r in rows])
        G = len(self.representative)
        trans = np.stack([r[3] for r in rows[:-1]]) if len(rows) > 1 else np.zeros((1, G, G))
        return t, mem, transient, trans

    def _dominance_keep(self, t, mem, transient) -> list[int]:
        """Rule 5: drop a strategy another of the same layout beats or ties on every layer."""
        keep = []
        for a, sa in enumerate(self.strategies):
            dominated = False
            for b, sb in enumerate(self.strategies):
                if a == b or sa.layout != sb.layout:
                    continue
                no_worse = (np.all(t[:, b] <= t[:, a]) and np.all(mem[:, b] <= mem[:, a])
                            and np.all(transient[:, b] <= transient[:, a]))
                strictly = (np.any(t[:, b] < t[:, a]) or np.any(mem[:, b] < mem[:, a])
                            or np.any(transient[:, b] < transient[:, a]))
                if no_worse and (strictly or b < a):
                    dominated = True
                    break
            if not dominated:
                keep.append(a)
        return keep

    def stage(self, stage: int, lo: int, hi: int) -> _StageSolution:
        key = (stage, lo, hi)
        if key in self.memo:
            return self.memo[key]
        middle = 0 < stage < self.setting.pp_deg - 1
        if middle and key in self._middle_memo:
            self.memo[key] = self._middle_memo[key]
            return self.memo[key]
        cm, setting = self.cm, self.setting
        fixed = cm.fixed(stage, setting)
        budget = self.memory_mb - fixed.memory_mb
        t, mem, transient, trans = self._arrays(stage, lo, hi)
        keep = self._dominance_keep(t, mem, transient) if self.options.prune else list(range(len(self.strategies)))
        t, mem, transient, group = t[:, keep], mem[:, keep], transient[:, keep], self.group[keep]
        unit = self.options.mem_unit_mb or max(budget / 1024.0, 1e-3)
        best = _StageSolution(math.inf, None, float(mem.min(axis=1).sum() - budget))
        units = np.ceil(mem / unit - 1e-9).astype(np.int64)
        for reserve in sorted(set(transient.ravel().tolist())):
            allowed = transient <= reserve + 1e-9
            capacity = math.floor((budget - reserve) / unit + 1e-9)
            if capacity < 0:
                continue
            # every layer on its fastest allowed strategy, memory and transitions ignored
            if np.where(allowed, t, np.inf).min(axis=1).sum() >= best.objective:
                continue
            self.stats["dp_calls"] = self.stats.get("dp_calls", 0) + 1
            total, choice = solve_chain(np.where(allowed, t, np.inf), units, group, trans, capacity)
            if total < best.objective:
                best = _StageSolution(total, [self.strategies[keep[c]] for c in choice], 0.0)
        best.objective += setting.chunks * fixed.per_microbatch + fixed.extra
        self.memo[key] = best
        if middle:
            self._middle_memo[key] = best
        return best

    def evaluate_division(self, division: tuple[int, ...]):
        """(plan, cost) of a division, or (None, worst overflow MB) when some stage does not fit."""
        strategies, start, overflow = [], 0, 0.0
        for k, count in enumerate(division):
            sol = self.stage(k, start, start + count)
            if sol.strategies is None:
                overflow = max(overflow, max(sol.overflow_mb, 1e-3))
            else:
                strategies += sol.strategies
            start += count
        if overflow > 0:
            return None, overflow
        plan = Plan(self.setting, tuple(division), tuple(strategies))
        return plan, self.cm.evaluate(plan)

    def solve(self):
        """Best (plan, cost) over the starting divisions (time-, memory-balanced, even), or None."""
        if not self.strategies:
            return None
        L, P = self.cm.model.num_layers, self.setting.pp_deg
        if P == 1:
            plan, cost = self.evaluate_division((L,))
            return (plan, cost) if plan is not None else None
        starts = {self._balanced(self._time_weights()), self._balanced(self._memory_weights()), _even(L, P)}
        self.starts = sorted(starts)
        best, closest = None, None
        for division in self.starts:
            found = self.evaluate_division(division)
            if found[0] is not None and (best is None or found[1].step_ms < best[1].step_ms):
                best = found
            if found[0] is None and (closest is None or found[1] < closest[1]):
                closest = (division, found[1])
        if best is None and closest is not None and self.options.partition_search:
            found = self._climb(closest[0])      # move layers off the overflowing stages
            best = found if found[0] is not None else None
        return best

    def refine(self):
        """Move layers across stage boundaries from every starting division; best (plan, cost) or None."""
        best = None
        for division in getattr(self, "starts", []):
            found = self._climb(division)
            if found[0] is not None and (best is None or found[1].step_ms < best[1].step_ms):
                best = found
        return best

    def _time_weights(self):
        """Per stage: per-layer weights and fixed weight (fastest strategies, ms per micro-batch)."""
        cm, setting = self.cm, self.setting
        rows = []
        for k in range(setting.pp_deg):
            fastest = {}
            for i, layer in enumerate(cm.model.layers):
                if layer not in fastest:
                    fastest[layer] = min(cm.layer(i, s, setting, k).per_microbatch for s in self.strategies)
            rows.append(([fastest[layer] for layer in cm.model.layers], cm.fixed(k, setting).per_microbatch))
        return rows

    def _memory_weights(self):
        cm, setting = self.cm, self.setting
        rows = []
        for k in range(setting.pp_deg):
            inflight = setting.inflight(k)
            smallest = {}
            for i, layer in enumerate(cm.model.layers):
                if layer not in smallest:
                    figs = [cm.layer(i, s, setting, k) for s in self.strategies]
                    smallest[layer] = min(f.states_mb + inflight * f.act_mb for f in figs)
            rows.append(([smallest[layer] for layer in cm.model.layers], cm.fixed(k, setting).memory_mb))
        return rows

    def _balanced(self, rows) -> tuple[int, ...]:
        """Division minimizing the heaviest stage (stage-dependent weights), by DP over prefixes."""
        L, P = self.cm.model.num_layers, self.setting.pp_deg
        prefix = [np.concatenate([[0.0], np.cumsum(layer)]) for layer, _ in rows]
        best = np.full((P + 1, L + 1), math.inf)
        arg = np.zeros((P + 1, L + 1), dtype=np.int64)
        best[0, 0] = 0.0
        for k in range(1, P + 1):
            weights, fixed = prefix[k - 1], rows[k - 1][1]
            for end in range(k, L - (P - k) + 1):
                for start in range(k - 1, end):
                    cand = max(best[k - 1, start], weights[end] - weights[start] + fixed)
                    if cand < best[k, end]:
                        best[k, end], arg[k, end] = cand, start
        division, end = [], L
        for k in range(P, 0, -1):
            start = int(arg[k, end])
            division.append(end - start)
            end = start
        return tuple(reversed(division))

    def _climb(self, division: tuple[int, ...]):
        current = self.evaluate_division(division)
        for _ in range(4 * self.cm.model.num_layers):
            moved = False
            for neighbour in _neighbours(division):
                cand = self.evaluate_division(neighbour)
                if _better(cand, current):
                    division, current, moved = neighbour, cand, True
            self.stats["partition_moves"] = self.stats.get("partition_moves", 0) + int(moved)
            if not moved:
                break
        return current


def _even(L: int, P: int) -> tuple[int, ...]:
    return tuple(L // P + (1 if k < L % P else 0) for k in range(P))


def _neighbours(division: tuple[int, ...]):
    for k in range(len(division) - 1):
        for delta in (1, -1):
            d = list(division)
            d[k] += delta
            d[k + 1] -= delta
            if min(d) >= 1:
                yield tuple(d)


def _better(cand, current) -> bool:
    if cand[0] is not None:
        return current[0] is None or cand[1].step_ms < current[1].step_ms - 1e-9
    return current[0] is None and cand[1] < current[1] - 1e-9


def _chunk_candidates(global_bsz: int, stage_devices: int, pp: int, options: SearchOptions) -> list[int]:
    if options.chunks:
        return [m for m in options.chunks if global_bsz % m == 0]
    out = []
    for m in range(1, min(global_bsz, options.max_chunks) + 1):
        if global_bsz % m:
            continue
        if pp == 1 and m > 1 and len(out) >= 6:
            continue
        out.append(m)
    return out


def _lower_bound(cm: CostModel, setting: Setting, strategies: list[Strategy]) -> float:
    """Step time if every layer ran its fastest strategy and the pipeline were perfectly balanced."""
    P = setting.pp_deg
    work, fastest = 0.0, {}
    for i in range(cm.model.num_layers):
        stage = min(P - 1, i * P // cm.model.num_layers)
        key = (cm.model.layers[i], stage)
        if key not in fastest:
            fastest[key] = min(cm.layer(i, s, setting, stage).per_microbatch for s in strategies)
        work += fastest[key]
    work += sum(cm.fixed(k, setting).per_microbatch for k in range(P))
    return work + (setting.chunks - 1) * work / P


def _settings(cm: CostModel, global_bsz: int, options: SearchOptions):
    cluster, L = cm.cluster, cm.model.num_layers
    for pp in options.pp_degrees or powers_of_two_up_to(cluster.num_devices):
        if pp > L or cluster.num_devices % pp:
            continue
        devices = cluster.num_devices // pp
        vtps = [v for v in (options.vtp_degrees or powers_of_two_up_to(devices))
                if devices % v == 0 and v <= cluster.tp_limit]
        for chunks in _chunk_candidates(global_bsz, devices, pp, options):
            for vtp in vtps:
                for embed_sdp in options.embed_sdp:
                    if embed_sdp and devices // vtp == 1:
                        continue
                    yield Setting(pp, global_bsz, chunks, vtp, embed_sdp, options.pipeline_type, options.dp_kind)


def search_batch(cm: CostModel, global_bsz: int, options: SearchOptions, memory_mb: float, stats: dict):
    """Best (plan, cost) for one global batch size, or None when nothing fits."""
    ranked = []
    for setting in _settings(cm, global_bsz, options):
        devices = cm.stage_devices(setting)
        if options.prune:
            strategies = pruned_strategies(devices, cm.cluster.tp_limit, global_bsz, setting.chunks)
        else:
            strategies = feasible_strategies(devices, global_bsz, setting.chunks)
        if strategies:
            ranked.append((_lower_bound(cm, setting, strategies), setting))
    ranked.sort(key=lambda pair: (pair[0], pair[1].pp_deg, pair[1].chunks, pair[1].vtp, pair[1].embed_sdp))
    best, solved, shared = None, [], {}
    for bound, setting in ranked:
        if best is not None and bound >= best[1].step_ms:
            stats["settings_cut_by_bound"] = stats.get("settings_cut_by_bound", 0) + 1
            continue
        stats["settings_solved"] = stats.get("settings_solved", 0) + 1
        solver = _SettingSolver(cm, setting, options, memory_mb, stats, shared)
        found = solver.solve()
        if found is not None:
            solved.append((found[1].step_ms, bound, solver))
            if best is None or found[1].step_ms < best[1].step_ms * (1 - 1e-9):
                best = found
    if options.partition_search and best is not None:
        # partition refinement for the pipelined settings that came closest (or could still win)
        solved.sort(key=lambda item: item[0])
        for step, bound, solver in solved[:REFINE_SETTINGS]:
            if solver.setting.pp_deg == 1 or bound >= best[1].step_ms:
                continue
            found = solver.refine()
            if found is not None and found[1].step_ms < best[1].step_ms * (1 - 1e-9):
                best = found
    return best


def search(model: ModelCost, cluster: Cluster, options: SearchOptions = SearchOptions()) -> SearchResult:
    """Search the fastest plan (highest throughput when the batch size is free) that fits in memory."""
    start, cpu_start = time.perf_counter(), time.process_time()
    cm = CostModel(model, cluster)
    memory_mb = options.memory_mb or cluster.memory_mb
    if options.memory_mb:
        cm = CostModel(model, cluster.with_memory(memory_mb))
    stats: dict = {}
    if options.global_bsz is not None:
        if options.global_bsz < 1:
            raise SolverError(f"global batch size must be positive, got {options.global_bsz}")
        best = search_batch(cm, options.global_bsz, options, memory_mb, stats)
        if best is None:
            raise SolverError(f"no plan fits {memory_mb:.0f} MB per device at global batch size "
                              f"{options.global_bsz} on {cluster.num_devices} devices")
    else:
        best = _search_batch_size(cm, options, memory_mb, stats)
    stats["global_bsz"] = best[0].setting.global_bsz
    stats["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
    return SearchResult(best[0], best[1], time.perf_counter() - start, stats)


def _search_batch_size(cm: CostModel, options: SearchOptions, memory_mb: float, stats: dict):
    """Scan batch sizes for throughput: double from the device count while the plan fits, until two
    doublings in a row gain less than 1 %; then try steps of a quarter of the best size above it."""
    n = cm.cluster.num_devices
    best, bsz = None, n
    tried = {}

    def attempt(b):
        if b not in tried:
            tried[b] = search_batch(cm, b, options, memory_mb, stats)
        return tried[b]

    stalled = 0
    while bsz <= options.max_bsz:
        found = attempt(bsz)
        if found is None:
            break
        gain = found[1].throughput / best[1].throughput if best is not None else math.inf
        if best is None or found[1].throughput > best[1].throughput:
            best = found
        stalled = stalled + 1 if gain < 1.01 else 0
        if stalled == 2:
            break
        bsz *= 2
    if best is None:
        raise SolverError(f"no plan fits {memory_mb:.0f} MB per device even at global batch size {n}")
    center = best[0].setting.global_bsz
    step = max(n, center // 4)
    for b in range(center + step, min(2 * center, options.max_bsz + 1), step):
        found = attempt(b)
        if found is None:
            break
        if found[1].throughput > best[1].throughput:
            best = found
    stats["batch_sizes_tried"] = sorted(tried)
    return best
