"""recompute: fit a training step into a memory budget by recomputing forward values in the backward pass.

Needs: a training graph (``autodiff.training_graph``) in its schedule order, and a way to plan its
memory (``run_pipeline``; ``fit_memory_budget`` calls it). Guarantees: the returned graph computes
the same outputs (recomputed ops are plain duplicates of deterministic ops, dropout included: its mask
is a hash of seed and step) and the arena the memory planner produces for it is at most the budget;
an infeasible budget raises ``MemoryBudgetError`` naming the smallest budget found feasible.
Reports: budget, planned arena (and the no-recompute arena), ops recomputed, added FLOPs, method.

Analysis -> solver -> apply:

* ``RematMapping.of(graph)`` maps the (fused) IR to the recomputation solver's model
  (``solvers/remat_graph``): one op per storage-producing node, compute cost from the op table's
  ``cost`` rule, output bytes aligned as the planner aligns them (graph outputs take no arena);
  views (reshape, identity, ...) share their base's storage, so their readers read the base.
* The solver (``solvers/remat``) gives a compute sequence; ``apply_sequence`` turns it into a new
  graph: the first computation of an op keeps its node, every later one is a duplicate node named
  ``<name>_rc``, placed right before its first reader; views are re-made over the copy they read.
* Bi-level check: the budget is judged by the arena ``plan_memory`` produces for the rewritten
  graph (with the kernels' scratch), not by the solver's model. ``BudgetSearch`` walks the fast
  solver's budget-independent path of plans (model peaks decreasing) and takes the first plan
  whose *planned* arena fits, so a smaller budget can only select a plan further along the path
  and the planned arena never rises as the budget falls.

Alternative choices through the same rewrite (baselines): ``every_layer`` keeps only each layer's
boundary values (layers are ``<block>.<i>.`` name prefixes, e.g. ``blocks.3.``) and recomputes the
rest of the layer in the backward pass; ``sqrt_n`` (Chen et al. 2016) keeps about sqrt(n) forward
cut points spread evenly and recomputes each segment once.

    graph, report = fit_memory_budget(tg.graph, "50%", pipeline_options, layout)
    report.figures["arena_bytes"] <= report.figures["budget_bytes"]
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from nncompile.errors import InputError, SolverError
from nncompile.ir.builder import GraphBuilder, prune
from nncompile.ir.graph import Graph, Node
from nncompile.ops.base import get_op
from nncompile.passes.base import PassReport
from nncompile.passes.plan_memory import VIEW_OPS, align_up

METHODS = ("fast", "exact", "every_layer", "sqrt_n")


class MemoryBudgetError(InputError):
    """The memory budget cannot be met (the message gives the smallest budget found feasible)."""


@dataclass(frozen=True)
class RecomputeOptions:
    method: str = "fast"          # fast | exact (Checkmate MILP) | every_layer | sqrt_n (baselines)
    time_limit: float = 30.0      # seconds for the exact solver
    alignment: int = 64


# ---------------------------------------------------------------------------------------------------
# analysis: IR -> the solver's model


@dataclass
class RematMapping:
    """The solver's model of an IR graph and the way back."""

    graph: Graph
    names: list[str]                 # model op id -> IR node name
    index: dict[str, int]            # IR node name -> model op id
    parent: dict[str, str]           # folded view -> the value it views
    external: set[str]               # inputs, params and views of them (never in the arena)
    flops: list[int]
    forward: list[bool]
    model: object                    # RematGraph

    @classmethod
    def of(cls, graph: Graph, alignment: int = 64) -> "RematMapping":
        from nncompile.solvers.remat_graph import make_graph

        outputs = set(graph.outputs)
        external = {i.name for i in graph.inputs} | {p.name for p in graph.params}
        # a training graph's first output is its loss (autodiff.TrainingGraph)
        forward_values = _ancestors(graph, graph.train.loss if graph.train else graph.outputs[0])
        names, index, parent, root = [], {}, {}, {}
        cost, mem, flops, edges, forward = [], [], [], [], []
        for node in graph.nodes:
            if node.op in VIEW_OPS and node.inputs[0] in external:
                external.add(node.name)
                continue
            if node.op in VIEW_OPS and node.name not in outputs:
                parent[node.name] = node.inputs[0]
                root[node.name] = root[node.inputs[0]]
                continue
            v = len(names)
            names.append(node.name)
            index[node.name] = v
            root[node.name] = node.name
            for src in dict.fromkeys(node.inputs):
                if src not in external:
                    edges.append((index[root[src]], v))
            op_cost = _cost(graph, node)
            flops.append(op_cost.flops)
            # memory-bound ops (copies, transposes) still take time: count a FLOP per 4 bytes written
            cost.append(op_cost.flops + op_cost.bytes_written / 4.0)
            is_view_output = node.op in VIEW_OPS
            mem.append(0 if node.name in outputs or is_view_output else align_up(max(node.type.nbytes, 1), alignment))
            forward.append(node.name in forward_values)
        model = make_graph(cost, mem, sorted(set(edges)), names, [not f for f in forward], title=graph.name)
        return cls(graph, names, index, parent, external, flops, forward, model)

    def added_flops(self, sequence: list[int]) -> int:
        return sum(self.flops[v] for v in sequence) - sum(self.flops)


def _ancestors(graph: Graph, value: str) -> set[str]:
    needed = {value}
    for node in reversed(graph.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return needed


def _cost(graph: Graph, node: Node):
    opdef = get_op(node.op)
    in_types = opdef.split_inputs([graph.type_of(src) for src in node.inputs])
    return opdef.rule("cost")(node.type, *in_types, **node.attrs)


# ---------------------------------------------------------------------------------------------------
# apply: a compute sequence -> a graph with duplicated nodes


def apply_sequence(mapping: RematMapping, sequence: list[int]) -> Graph:
    """The graph that runs ``sequence``: one node per compute step, recomputations as duplicates."""
    graph = mapping.graph
    b = GraphBuilder.from_graph(graph, keep_nodes=False)
    for node in graph.nodes:
        if node.name in mapping.external and not b.has(node.name):
            b.add_node(node)         # views of inputs/params: free, emitted first
    latest: dict[int, str] = {}
    views: dict[tuple[str, str], str] = {}

    def resolve(value: str) -> str:
        if value in mapping.external:
            return value
        if value in mapping.index:
            return latest[mapping.index[value]]
        source = resolve(mapping.parent[value])
        key = (value, source)
        if key not in views:
            node = graph.node(value)
            original = source == node.inputs[0] and not b.has(value)
            name = value if original else b.fresh(f"{value}_rc")
            b.add_node(Node(name, node.op, (source, *node.inputs[1:]), node.attrs, node.type, node.loc))
            views[key] = name
        return views[key]

    for v in sequence:
        node = graph.node(mapping.names[v])
        inputs = tuple(resolve(src) for src in node.inputs)
        name = node.name if v not in latest else b.fresh(f"{node.name}_rc")
        b.add_node(Node(name, node.op, inputs, node.attrs, node.type, node.loc))
        latest[v] = name
    b.outputs = list(graph.outputs)
    return prune(b.build(), keep_inputs=True)


# ---------------------------------------------------------------------------------------------------
# solver drivers


class BudgetSearch:
    """The fast solver's path of plans for one training graph, each judged by the planned arena.

    ``arena_of(graph) -> bytes`` runs the memory planner on a rewritten graph. Plans and arenas are
    cached, so a sweep over budgets walks the path once.
    """

    def __init__(self, mapping: RematMapping, arena_of):
        from nncompile.solvers.remat_fast import walk_path

        self.mapping = mapping
        self.arena_of = arena_of
        self._walk = walk_path(mapping.model)
        self.plans: list = []
        self.arenas: dict[int, tuple[int, Graph]] = {}

    def plan(self, i: int):
        while len(self.plans) <= i:
            try:
                self.plans.append(next(self._walk))
            except StopIteration:
                return None
        return self.plans[i]

    def arena(self, i: int) -> tuple[int, Graph]:
        if i not in self.arenas:
            rewritten = apply_sequence(self.mapping, self.plan(i).sequence)
            self.arenas[i] = (self.arena_of(rewritten), rewritten)
        return self.arenas[i]

    def first_fitting(self, budget: int) -> int | None:
        """The first plan on the path whose planned arena fits ``budget``.

        Every plan before it is planned too (cached): taking the first fitting one is what makes
        the planned arena non-increasing as the budget falls, whatever the planner does.
        """
        i = 0
        while self.plan(i) is not None:
            if self.arena(i)[0] <= budget:
                return i
            i += 1
        return None

    def least_arena(self) -> int:
        """The least planned arena of any plan on the path (the smallest budget the search meets)."""
        i = 0
        while self.plan(i) is not None:
            i += 1
        return min(self.arena(k)[0] for k in range(i))


def baseline_sequence(mapping: RematMapping, method: str) -> list[int]:
    """The compute sequence of a checkpointing baseline (``every_layer`` or ``sqrt_n``)."""
    from nncompile.solvers.remat_fast import HOLD, GapModel

    model = mapping.model
    if method == "every_layer":
        dropped = _layer_interiors(mapping)
    elif method == "sqrt_n":
        dropped = _sqrt_n_segments(mapping)
    else:
        raise InputError(f"unknown recompute baseline '{method}'")
    gaps = GapModel(model)
    modes = {}
    for v in dropped:
        consumers = gaps.consumers[v]
        # free the value after its forward uses; recompute it once when the backward pass needs it
        first_backward = next((i for i, c in enumerate(consumers) if not mapping.forward[c]), None)
        if first_backward is not None and (v, first_backward) in gaps.gap_set:
            modes[(v, first_backward)] = HOLD
    return gaps.build_sequence(modes)


_LAYER = re.compile(r"^(.*?\.\d+)\.")


def _layer_interiors(mapping: RematMapping) -> list[int]:
    """Forward ops inside a repeated layer (``blocks.3.*``) that no op outside that layer reads."""
    model = mapping.model
    layer = [None] * model.n
    for v, name in enumerate(mapping.names):
        match = _LAYER.match(name)
        if mapping.forward[v] and match:
            layer[v] = match.group(1)
    if not any(layer):
        raise InputError("every_layer checkpointing needs repeated layers named '<block>.<i>.' (e.g. blocks.0.)")
    dropped = []
    for v in range(model.n):
        if layer[v] is None:
            continue
        read_outside = any(mapping.forward[c] and layer[c] != layer[v] for c in model.succs[v])
        if not read_outside:
            dropped.append(v)
    return dropped


def _sqrt_n_segments(mapping: RematMapping) -> list[int]:
    """Chen's sqrt(n): keep ~sqrt(n) forward cut points spread evenly, drop the other forward ops."""
    model = mapping.model
    order = [v for v in range(model.n) if mapping.forward[v]]
    last_forward_use = {}
    for v in order:
        uses = [c for c in model.succs[v] if mapping.forward[c]]
        last_forward_use[v] = max(uses) if uses else v
    # v is a cut point when no other forward value made before v is still needed after v
    cuts, reach = [], -1
    for v in order:
        if reach <= v and model.mem[v] > 0:
            cuts.append(v)
        reach = max(reach, last_forward_use[v])
    n = len(order)
    segments = max(1, round(math.sqrt(n)))
    position = {v: i for i, v in enumerate(order)}
    kept = set()
    for k in range(1, segments):
        target = k * n / segments
        best = min(cuts, key=lambda v: abs(position[v] - target), default=None)
        if best is not None:
            kept.add(best)
    return [v for v in order if v not in kept]


# ---------------------------------------------------------------------------------------------------
# the pass


def fit_memory_budget(graph: Graph, budget, pipeline_options=None, layout=None,
                      options: RecomputeOptions = RecomputeOptions(), search: BudgetSearch | None = None,
                      progress=None) -> tuple[Graph, PassReport]:
    """Rewrite the training ``graph`` so that its planned arena fits ``budget``.

    ``budget``: bytes (int), or text/float as ``nncompile --memory-budget`` takes it: ``"60%"`` /
    ``0.6`` (of the no-recompute arena), ``"8MB"``, ``"8000000"``; ``None`` with a baseline
    method (``every_layer``, ``sqrt_n``) applies the baseline without a budget. The returned graph
    is fused (the pipeline's fuse pass then has nothing left to do). ``search`` reuses the path of
    an earlier call on the same graph (budget sweeps).
    """
    from nncompile.passes.fuse import fuse
    from nncompile.solvers.remat_graph import parse_budget

    if options.method not in METHODS:
        raise InputError(f"unknown recompute method '{options.method}' (known: {', '.join(METHODS)})")
    say = progress or (lambda text: None)
    started = time.perf_counter()
    arena_of = _arena_function(pipeline_options, layout)
    fused, _ = fuse(prune(graph, keep_inputs=True))
    mapping = search.mapping if search is not None else RematMapping.of(fused, options.alignment)
    say("planning memory without recompute")
    plain_arena = arena_of(mapping.graph) if search is None else search.arena(0)[0]
    budget_bytes = None if budget is None else parse_budget(budget, plain_arena)
    figures = {"method": options.method, "budget": None if budget is None else str(budget),
               "budget_bytes": budget_bytes, "no_recompute_arena_bytes": plain_arena,
               "model_ops": mapping.model.n, "forward_backward_flops": sum(mapping.flops)}
    sequence = list(range(mapping.model.n))
    rewritten, arena = mapping.graph, plain_arena
    if options.method in ("every_layer", "sqrt_n"):
        say(f"applying {options.method} checkpointing")
        sequence = baseline_sequence(mapping, options.method)
        rewritten = apply_sequence(mapping, sequence)
        arena = arena_of(rewritten)
        if budget_bytes is not None and arena > budget_bytes:
            raise MemoryBudgetError(f"memory budget {budget_bytes} bytes: {options.method} checkpointing plans "
                                    f"{arena} bytes", notes=(f"the no-recompute arena is {plain_arena} bytes",))
    elif budget_bytes is not None and plain_arena > budget_bytes:
        if options.method == "exact":
            sequence, arena, rewritten, plan = _exact(mapping, budget_bytes, plain_arena, arena_of, options, say)
            figures.update({"solver_status": plan.status, "solver_gap": plan.gap, "solver_seconds": plan.seconds})
        else:
            search = search or BudgetSearch(mapping, arena_of)
            search.arenas.setdefault(0, (plain_arena, mapping.graph))
            say("searching the recompute path")
            found = search.first_fitting(budget_bytes)
            if found is None:
                raise _infeasible(budget_bytes, plain_arena, search.least_arena())
            sequence = search.plans[found].sequence
            arena, rewritten = search.arena(found)
            figures["path_plans"] = len(search.plans)
            figures["plans_planned"] = len(search.arenas)
    from nncompile.solvers.remat_sim import sequence_profile

    seen, recomputed = set(), set()
    for v in sequence:
        if v in seen:
            recomputed.add(mapping.names[v])
        seen.add(v)
    recomputed = sorted(recomputed)
    added = mapping.added_flops(sequence)
    figures.update({
        "arena_bytes": arena,
        "fraction_of_no_recompute": round(arena / plain_arena, 4) if plain_arena else 1.0,
        "model_peak_bytes": sequence_profile(mapping.model, sequence).peak,
        "recomputed_nodes": len(recomputed),
        "recompute_steps": len(sequence) - mapping.model.n,
        "added_flops": added,
        "flops_overhead": round(added / max(sum(mapping.flops), 1), 6),
    })
    report = PassReport("recompute", figures, notes=[f"recomputed: {', '.join(recomputed)}"] if recomputed else [],
                        seconds=time.perf_counter() - started)
    report.recomputed = recomputed
    report.search = search
    return rewritten, report


def _arena_function(pipeline_options, layout):
    """bytes of the arena ``run_pipeline`` plans for a training graph (with each kernel's scratch)."""
    from nncompile.codegen import register_rules
    from nncompile.codegen.cpp_ops_nn import workspace_bytes
    from nncompile.passes.pipeline import PipelineOptions, run_pipeline

    register_rules()
    options = pipeline_options or PipelineOptions()
    quiet = PipelineOptions(fuse=options.fuse, memory=options.memory)

    def arena_of(graph: Graph) -> int:
        return run_pipeline(graph, quiet, workspace_bytes, layout, keep_inputs=True)[2].arena_bytes

    return arena_of


def _exact(mapping, budget, plain_arena, arena_of, options, say):
    """Checkmate's MILP on the model; tighten its target until the planned arena fits (bi-level)."""
    from nncompile.solvers.remat import plan_recompute

    target = budget
    for round_index in range(6):
        say(f"MILP round {round_index + 1}, target {target} bytes")
        try:
            plan = plan_recompute(mapping.model, target, method="exact", time_limit=options.time_limit,
                                  alignment=options.alignment)
        except SolverError as err:
            raise MemoryBudgetError(f"memory budget {budget} bytes: {err.message}", notes=err.notes) from None
        rewritten = apply_sequence(mapping, plan.sequence)
        arena = arena_of(rewritten)
        if arena <= budget:
            return plan.sequence, arena, rewritten, plan
        target -= max(arena - budget, options.alignment)
    raise MemoryBudgetError(f"memory budget {budget} bytes: the exact plans' planned arenas stay above it "
                            f"(last {arena} bytes); try the fast method")


def _infeasible(budget: int, plain_arena: int, least: int) -> MemoryBudgetError:
    return MemoryBudgetError(
        f"memory budget {budget} bytes ({budget / plain_arena:.1%} of the no-recompute arena {plain_arena}) "
        f"cannot be met; the smallest feasible budget found is {least} bytes ({least / plain_arena:.1%})",
        notes=(f"pass --memory-budget {least} (or {math.ceil(1000 * least / plain_arena) / 10:g}%) or more",))


def check_planned_arena(report: PassReport, arena_bytes: int) -> None:
    """The arena of the module actually built must be the one the search judged."""
    budget = report.figures.get("budget_bytes")
    if budget is not None and arena_bytes > budget:
        raise SolverError(f"recompute: the built training module plans {arena_bytes} bytes, over the budget "
                          f"{budget} (the search planned {report.figures['arena_bytes']})")
    report.figures["built_arena_bytes"] = arena_bytes
