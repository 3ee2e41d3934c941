"""Dynamic programming over layers x discretized memory (Galvatron's core, numba-compiled).

Given, for the layers of one stage, each strategy's time ``time[i, s]`` and memory in units
``mem[i, s]`` (non-negative integers), and the cost ``trans[i, g, h]`` of going from a strategy of
group ``g`` on layer ``i`` to one of group ``h`` on layer ``i + 1`` (strategies are grouped by
activation layout: switching costs depend only on the layouts), ``solve_chain`` returns the strategy
per layer minimizing ``sum time + sum trans`` with ``sum mem <= capacity``.

State: ``best[v, s]`` = least time of the layers so far using at most ``v`` units with the last
layer on strategy ``s``. Per layer, the best predecessor of every group is found once per ``v``, so
a layer costs O(capacity * (S + G^2)) instead of O(capacity * S^2). Back-pointers are kept per layer.

    total, choice = solve_chain(time, mem, group, trans, capacity)   # choice: -1s if infeasible
"""
from __future__ import annotations

import numba
import numpy as np

INF = 1e300


@numba.njit(cache=True)
def _chain_kernel(time, mem, group, trans, capacity):
    n, S = time.shape
    G = trans.shape[1]
    V = capacity + 1
    best = np.full((V, S), INF)
    back = np.full((n, V, S), -1, np.int16)
    for s in range(S):
        if time[0, s] < INF and mem[0, s] <= capacity:
            for v in range(mem[0, s], V):
                best[v, s] = time[0, s]
    group_min = np.empty((V, G))
    group_arg = np.empty((V, G), np.int64)
    enter_min = np.empty((V, G))
    enter_arg = np.empty((V, G), np.int64)
    for i in range(1, n):
        for v in range(V):
            for g in range(G):
                group_min[v, g] = INF
                group_arg[v, g] = -1
            for p in range(S):
                g = group[p]
                if best[v, p] < group_min[v, g]:
                    group_min[v, g] = best[v, p]
                    group_arg[v, g] = p
            for h in range(G):
                low, arg = INF, -1
                for g in range(G):
                    if group_arg[v, g] >= 0:
                        cand = group_min[v, g] + trans[i - 1, g, h]
                        if cand < low:
                            low, arg = cand, group_arg[v, g]
                enter_min[v, h] = low
                enter_arg[v, h] = arg
        nxt = np.full((V, S), INF)
        for s in range(S):
            need = mem[i, s]
            if time[i, s] >= INF or need > capacity:
                continue
            h = group[s]
            for v in range(need, V):
                arg = enter_arg[v - need, h]
                if arg >= 0:
                    nxt[v, s] = enter_min[v - need, h] + time[i, s]
                    back[i, v, s] = arg
        best = nxt
    total, last = INF, -1
    for s in range(S):
        if best[capacity, s] < total:
            total, last = best[capacity, s], s
    choice = np.full(n, -1, np.int64)
    if last < 0:
        return total, choice
    v, s = capacity, last
    for i in range(n - 1, -1, -1):
        choice[i] = s
        if i > 0:
            prev = back[i, v, s]
            v -= mem[i, s]
            s = prev
    return total, choice


def solve_chain(time: np.ndarray, mem: np.ndarray, group: np.ndarray, trans: np.ndarray,
                capacity: int) -> tuple[float, np.ndarray]:
    """Least-time strategy per layer under a memory capacity; ``(inf, [-1...])`` when nothing fits.

    time, mem: (layers, strategies); group: (strategies,) ints in [0, G); trans: (layers - 1, G, G).
    """
    time = np.ascontiguousarray(time, dtype=np.float64)
    mem = np.ascontiguousarray(mem, dtype=np.int64)
    group = np.ascontiguousarray(group, dtype=np.int64)
    n, S = time.shape
    G = int(group.max()) + 1 if S else 1
    if n > 1 and trans.shape != (n - 1, G, G):
        raise ValueError(f"trans has shape {trans.shape}, expected {(n - 1, G, G)}")
    if n == 0 or S == 0 or capacity < 0:
        return float("inf"), np.full(n, -1, np.int64)
    trans = np.ascontiguousarray(trans if n > 1 else np.zeros((1, G, G)), dtype=np.float64)
    total, choice = _chain_kernel(np.where(np.isfinite(time), time, INF), mem, group, trans, int(capacity))
    return (float(total) if total < INF else float("inf")), choice
