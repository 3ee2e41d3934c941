"""schedule: pick a topological order of the nodes with a lower peak of live arena bytes.

Needs: a valid graph (after fusion) and each node's kernel scratch. Guarantees: the same nodes in
an order that respects every dependency (the graph is pure, so values are unchanged), and a
max-live lower bound (as ``plan_memory`` computes it: views, in-place merges, scratch) that is
never above the given order's — the given order is one of the candidates. Candidates: an exact DP
over the sets of scheduled nodes when the graph is small enough (at most ``max_states`` sets per
depth), and greedy list schedules that pick, among the ready nodes, the one that frees the most
bytes net of what it allocates, with a one-step lookahead (a node that lets a ready consumer free
an input soon). Reports the bound before and after and the chosen candidate.

    graph, report = schedule(graph, ScheduleOptions(), workspace={"conv1": 4096})
    report.figures["peak_before"], report.figures["peak_after"]
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from nncompile.ir.graph import Graph
from nncompile.passes.base import PassReport, Timer
from nncompile.passes.plan_memory import VIEW_OPS, align_up, inplace_eligible, memory_buffers


@dataclass(frozen=True)
class ScheduleOptions:
    method: str = "auto"          # auto (best of all candidates), keep (the given order), greedy, dp
    max_states: int = 5000        # DP gives up beyond this many node sets at one depth
    dp_max_nodes: int = 40        # auto tries the DP on graphs up to this many nodes
    greedy_max_nodes: int = 400   # ... and the freed-minus-allocated greedy up to this many
    alignment: int = 64
    inplace: bool = True


@dataclass
class MemoryModel:
    """The graph as the scheduler sees it: node i allocates ``alloc[i]`` arena bytes (0 for views,
    graph outputs and non-arena values) plus ``work[i]`` of scratch during its step; root buffer r
    is freed after the last of ``consumers[r]`` (nodes reading it or a view of it) runs. A node in
    ``inplace[i]`` (candidate roots) allocates nothing when one of them dies at that node."""

    n: int
    preds: list[list[int]]
    succs: list[list[int]]
    alloc: list[int]
    work: list[int]
    reads: list[list[int]]              # node -> distinct root buffers (node indices) it reads
    consumers: dict[int, int]           # root node -> number of nodes that read it (or its views)
    inplace: list[list[int]]            # node -> roots it may overwrite (same shape and dtype)


def memory_model(graph: Graph, workspace: dict[str, int] | None = None, alignment: int = 64,
                 inplace: bool = True) -> MemoryModel:
    workspace = workspace or {}
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    outputs = set(graph.outputs)
    root: dict[str, int | None] = {}
    for item in (*graph.inputs, *graph.params):
        root[item.name] = None
    n = len(graph.nodes)
    alloc, work, preds, reads, cands = [0] * n, [0] * n, [], [], []
    succs: list[list[int]] = [[] for _ in range(n)]
    consumers: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op in VIEW_OPS:
            root[node.name] = root[node.inputs[0]]
        elif node.name in outputs:
            root[node.name] = None
        else:
            root[node.name] = i
            alloc[i] = align_up(max(node.type.nbytes, 1), alignment)
            consumers[i] = 0
        work[i] = align_up(workspace.get(node.name) or 0, alignment)
        p = sorted({index[s] for s in node.inputs if s in index})
        preds.append(p)
        for j in p:
            succs[j].append(i)
        r = sorted({root[s] for s in node.inputs if root.get(s) is not None})
        reads.append(r)
        for j in r:
            consumers[j] += 1
        c = []
        if inplace and root[node.name] == i and inplace_eligible(graph, node):
            for s in node.inputs:
                rs = root.get(s)
                t = graph.type_of(s)
                if (rs is not None and t.shape == node.type.shape and t.dtype == node.type.dtype
                        and graph.nodes[rs].type.nbytes == node.type.nbytes and rs not in c):
                    c.append(rs)
        cands.append(c)
    return MemoryModel(n, preds, succs, alloc, work, reads, consumers, cands)


def _step_bytes(model: MemoryModel, i: int, dies) -> tuple[int, int]:
    """(bytes node i allocates for its step, bytes freed after it); ``dies(r)``: i is r's last reader."""
    dying = [r for r in model.reads[i] if dies(r)]
    freed = sum(model.alloc[r] for r in dying)
    new = model.alloc[i]
    if new and any(r in dying for r in model.inplace[i]):
        new = 0                   # the output takes the dying input's slot
        freed -= model.alloc[i]
    if model.alloc[i] and model.consumers.get(i) == 0:
        freed += model.alloc[i]   # nobody reads it: gone after its step
    return new, freed


def _step(model: MemoryModel, i: int, remaining: dict[int, int]) -> tuple[int, int]:
    return _step_bytes(model, i, lambda r: remaining[r] == 1)


def order_peak(model: MemoryModel, order: list[int]) -> int:
    """The max-live bytes of executing ``order`` under the model."""
    remaining = dict(model.consumers)
    live = peak = 0
    for i in order:
        new, freed = _step(model, i, remaining)
        peak = max(peak, live + new + model.work[i])
        for r in model.reads[i]:
            remaining[r] -= 1
        live += new - freed
    return peak


def greedy_order(model: MemoryModel, lookahead: bool = True) -> list[int]:
    """List scheduling: among the ready nodes, the one with the largest freed - allocated bytes (ties:
    the earliest in the given order); with ``lookahead``, a node's score also counts the best score
    of a consumer it makes ready."""
    remaining = dict(model.consumers)
    waiting = [len(p) for p in model.preds]
    ready = [i for i in range(model.n) if waiting[i] == 0]
    order = []
    while ready:
        best, best_key = None, None
        for i in ready:
            new, freed = _step(model, i, remaining)
            score = freed - new
            if lookahead:
                for r in model.reads[i]:
                    remaining[r] -= 1
                bonus = 0
                for s in model.succs[i]:
                    if waiting[s] == 1:
                        s_new, s_freed = _step(model, s, remaining)
                        bonus = max(bonus, s_freed - s_new)
                for r in model.reads[i]:
                    remaining[r] += 1
                score += bonus // 2
            key = (-score, i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        ready.remove(best)
        order.append(best)
        for r in model.reads[best]:
            remaining[r] -= 1
        for s in model.succs[best]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    return order


def sink_order(model: MemoryModel, order: list[int]) -> list[int]:
    """``order`` with every node that allocates but reads no arena buffer (a transpose of a weight,
    a constant) moved to just before its first consumer, so its output lives no longer than needed."""
    position = {i: k for k, i in enumerate(order)}
    movable = {i for i in order if model.alloc[i] and not model.reads[i] and model.succs[i]}
    pending: dict[int, list[int]] = {}
    for i in order:
        if i in movable:
            first = min(model.succs[i], key=position.__getitem__)
            pending.setdefault(first, []).append(i)
    result: list[int] = []

    def emit(i: int) -> None:
        for j in pending.get(i, ()):
            emit(j)
        result.append(i)

    for i in order:
        if i not in movable:
            emit(i)
    return result


def eager_order(model: MemoryModel, order: list[int]) -> list[int]:
    """List scheduling by rank in ``order``, except that a ready node freeing more than it allocates
    runs at once (the one freeing the most): a weight gradient as soon as its inputs exist."""
    rank = {i: k for k, i in enumerate(order)}
    remaining = dict(model.consumers)
    readers: dict[int, list[int]] = {}
    for i in range(model.n):
        for r in model.reads[i]:
            readers.setdefault(r, []).append(i)
    waiting = [len(p) for p in model.preds]
    ready: set[int] = set()
    by_rank: list[tuple[int, int]] = []
    net: dict[int, int] = {}
    freeing: set[int] = set()

    def refresh(i: int) -> None:
        new, freed = _step(model, i, remaining)
        net[i] = freed - new
        if freed > new:
            freeing.add(i)
        else:
            freeing.discard(i)

    def make_ready(i: int) -> None:
        ready.add(i)
        heapq.heappush(by_rank, (rank[i], i))
        refresh(i)

    for i in range(model.n):
        if waiting[i] == 0:
            make_ready(i)
    result = []
    while ready:
        if freeing:
            best = min(freeing, key=lambda i: (-net[i], rank[i]))
        else:
            while by_rank[0][1] not in ready:
                heapq.heappop(by_rank)
            best = heapq.heappop(by_rank)[1]
        ready.discard(best)
        freeing.discard(best)
        result.append(best)
        for r in model.reads[best]:
            remaining[r] -= 1
        for r in model.reads[best]:
            for u in readers[r]:
                if u in ready:
                    refresh(u)
        for s in model.succs[best]:
            waiting[s] -= 1
            if waiting[s] == 0:
                make_ready(s)
    return result


def dp_order(model: MemoryModel, max_states: int = 20000) -> list[int] | None:
    """An order of least peak (exact under the model): a DP over the sets of scheduled nodes, depth
    by depth; the live bytes after a set do not depend on the order within it. None when some depth
    has more than ``max_states`` sets."""
    pred_mask = [sum(1 << j for j in p) for p in model.preds]
    readers: dict[int, int] = {}
    for i in range(model.n):
        for r in model.reads[i]:
            readers[r] = readers.get(r, 0) | (1 << i)
    # per set: (peak, live, previous set, last node)
    layer: dict[int, tuple[int, int, int, int]] = {0: (0, 0, -1, -1)}
    history = []
    for _ in range(model.n):
        nxt: dict[int, tuple[int, int, int, int]] = {}
        for mask, (peak, live, _, _) in layer.items():
            for i in range(model.n):
                if mask >> i & 1 or pred_mask[i] & ~mask:
                    continue
                done = mask | (1 << i)
                new, freed = _step_bytes(model, i, lambda r: readers[r] & ~done == 0)
                step_peak = max(peak, live + new + model.work[i])
                after = live + new - freed
                old = nxt.get(done)
                if old is None or (step_peak, after) < (old[0], old[1]):
                    nxt[done] = (step_peak, after, mask, i)
        if len(nxt) > max_states:
            return None
        history.append(layer)
        layer = nxt
    (mask, entry), = layer.items()
    order = []
    for depth in range(model.n - 1, -1, -1):
        order.append(entry[3])
        mask = entry[2]
        entry = history[depth][mask] if depth else None
    return order[::-1]


def schedule(graph: Graph, options: ScheduleOptions = ScheduleOptions(),
             workspace: dict[str, int] | None = None) -> tuple[Graph, PassReport]:
    if options.method not in ("auto", "keep", "greedy", "dp"):
        from nncompile.errors import UnsupportedError

        raise UnsupportedError(f"schedule: unknown method {options.method!r} (auto, keep, greedy, dp)")
    with Timer() as timer:
        model = memory_model(graph, workspace, options.alignment, options.inplace)
        given = list(range(model.n))
        candidates = {"given": given}
        if options.method in ("auto", "greedy"):
            sunk = sink_order(model, given)
            candidates["sink"] = sunk
            candidates["eager"] = eager_order(model, given)
            candidates["sink+eager"] = eager_order(model, sunk)
            if model.n <= options.greedy_max_nodes:
                candidates["greedy"] = greedy_order(model, lookahead=False)
                candidates["greedy-lookahead"] = greedy_order(model, lookahead=True)
        dp_states = None
        if options.method == "dp" or (options.method == "auto" and model.n <= options.dp_max_nodes):
            found = dp_order(model, options.max_states)
            dp_states = found is not None
            if found is not None:
                candidates["dp"] = found

        def bound_of(order):
            reordered = graph.replace(nodes=tuple(graph.nodes[i] for i in order))
            return memory_buffers(reordered, workspace, options.alignment, options.inplace).lower_bound, reordered

        before, _ = bound_of(given)
        chosen, best, best_graph = "given", before, graph
        modelled = {name: order_peak(model, order) for name, order in candidates.items()}
        for name, order in candidates.items():
            if name == "given" or modelled[name] >= modelled["given"]:
                continue
            bound, reordered = bound_of(order)
            if bound < best:
                chosen, best, best_graph = name, bound, reordered
    figures = {"peak_before": before, "peak_after": best, "chosen": chosen,
               "reduction": round(1 - best / before, 4) if before else 0.0,
               "modelled": modelled, "dp": {None: "skipped", True: "solved", False: "too many states"}[dp_states]}
    return best_graph, PassReport("schedule", figures, seconds=timer.seconds)
