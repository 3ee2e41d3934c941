"""plan_memory: every intermediate gets an offset in one arena, decided at compile time.

Needs: a graph in its final schedule (node order = execution order), and the workspace each node's
kernel needs (bytes of scratch, e.g. im2col; from the emitter). Guarantees: values live at the same
time never overlap; views (reshape/flatten/squeeze/unsqueeze/identity of an arena value) share their
base's storage and extend its lifetime; an elementwise op whose input dies at that op and has the
output's shape and dtype writes its output over that input (in place: both get one buffer); graph
outputs are written straight into the caller's arrays, graph inputs and parameters are read where
they are. Repeated blocks (``blocks.3.*`` forward, ``d_blocks.3.*`` backward) are planned once and
their layout reused (MEMO's bi-level plan, ``solvers/packing_blocks``). Every plan is checked by
``solvers.packing.validate`` before it is returned. Reports: arena bytes, the max-live lower
bound, their ratio, the arena with no reuse and the greedy arena, the solver's status and time.

    graph, report = plan_memory(graph, MemoryOptions(), workspace={"conv1": 4096})
    report.plan.storage["h"]    # ("arena", byte offset of value h, 0)
    report.plan.buffers[0]      # {"id", "kind", "values", "start", "end", "size", "offset"}
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

from nncompile.errors import BuildError, SolverError
from nncompile.ir.graph import Graph
from nncompile.passes.base import PassReport, Timer

VIEW_OPS = frozenset({"reshape", "flatten", "squeeze", "unsqueeze", "identity"})
# ops emitted as one loop out[i] = f(in0[i], in1[i], ...): the output may overwrite an input of its
# own shape and dtype (each element is read before it is written). Not GEMM/conv-headed fusions: a
# GEMM accumulates partial sums into its output before its epilogue reads the residual.
INPLACE_OPS = frozenset({
    "relu", "gelu", "tanh", "sigmoid", "silu", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf",
    "leaky_relu", "clamp", "scale", "add_scalar", "pow_scalar", "add", "sub", "mul", "div", "maximum",
    "minimum", "where", "dropout",
})
GEMM_HEADS = frozenset({"linear", "matmul", "conv2d"})
# a repeated block instance: blocks.3.attn.q (forward), d_blocks.3.attn.q_matmul_1 (backward)
BLOCK_NAME = re.compile(r"^(?P<grad>d_)?(?P<prefix>[A-Za-z_][\w]*?)\.(?P<index>\d+)\.")


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class MemoryOptions:
    alignment: int = 64
    method: str = "auto"          # a packing method of nncompile.solvers.packing
    time_limit: float = 5.0
    inplace: bool = True          # elementwise outputs may take the slot of an input that dies there
    blocks: str = "auto"          # bi-level plan of repeated blocks: auto (keep the better), on, off


@dataclass
class MemoryPlan:
    """Where each value lives. ``storage[name]`` is ``(kind, base, byte_offset)`` with kind one of
    ``arena`` (base = offset in the arena), ``input``, ``param``, ``output`` (base = index/name) —
    views and in-place results point at their base's storage. ``buffers`` lists every arena buffer
    (id, kind value/work, values sharing it, lifetime [start, end) in steps, size, offset)."""

    storage: dict[str, tuple[str, object, int]]
    arena_bytes: int
    workspace: dict[str, int]          # node name -> arena offset of its scratch
    param_offsets: dict[str, int]      # param name -> byte offset in the parameter block
    param_bytes: int
    lower_bound: int
    status: str
    lifetimes: dict[str, tuple[int, int]] = field(default_factory=dict)
    buffers: list[dict] = field(default_factory=list)
    inplace: dict[str, str] = field(default_factory=dict)   # node -> the input whose slot it writes
    figures: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "lower_bound": self.lower_bound, "status": self.status,
                "param_bytes": self.param_bytes, "figures": self.figures,
                "values": {k: {"kind": v[0], "where": v[1], "lifetime": self.lifetimes.get(k)}
                           for k, v in self.storage.items()},
                "workspace": self.workspace, "inplace": self.inplace, "buffers": self.buffers}


@dataclass
class BufferTable:
    """The analysis step of planning: arena buffers of one schedule. ``home[value]`` is the id of
    the buffer holding an arena value (views and in-place results share their base's)."""

    buffers: list                       # solvers.packing.Buffer, ids ("value", root) / ("work", node)
    home: dict[str, tuple]
    members: dict[tuple, list[str]]     # buffer id -> the values stored in it
    inplace: dict[str, str]
    lifetimes: dict[str, tuple[int, int]]

    @property
    def lower_bound(self) -> int:
        from nncompile.solvers.packing import max_live_bytes

        return max_live_bytes([b.start for b in self.buffers], [b.end for b in self.buffers],
                              [b.size for b in self.buffers])

    @property
    def no_reuse_bytes(self) -> int:
        return sum(b.size for b in self.buffers)


def view_base(graph: Graph) -> dict[str, str]:
    """value -> the value whose storage it shares (itself for non-views)."""
    base: dict[str, str] = {}
    for item in (*graph.inputs, *graph.params):
        base[item.name] = item.name
    for node in graph.nodes:
        base[node.name] = base[node.inputs[0]] if node.op in VIEW_OPS else node.name
    return base


def lifetimes(graph: Graph, base: dict[str, str]) -> dict[str, tuple[int, int]]:
    """[first step, last step + 1) of every storage root produced by a node."""
    live: dict[str, list[int]] = {}
    for step, node in enumerate(graph.nodes):
        root = base[node.name]
        if root == node.name:
            live[root] = [step, step + 1]
        for src in node.inputs:
            if base[src] in live:
                live[base[src]][1] = step + 1
    return {k: (v[0], v[1]) for k, v in live.items()}


def inplace_eligible(graph: Graph, node) -> bool:
    """Whether ``node``'s kernel may write its output over one of its same-shaped inputs."""
    if node.op in INPLACE_OPS:
        return True
    if node.op == "fused":
        body = node.attrs.get("body") or ()
        head = body[0][0] if body and isinstance(body[0], (tuple, list)) else None
        return head is not None and head not in GEMM_HEADS and all(step[0] in INPLACE_OPS | {"identity"}
                                                                   for step in body)
    return False


def memory_buffers(graph: Graph, workspace: dict[str, int] | None = None, alignment: int = 64,
                   inplace: bool = True) -> BufferTable:
    """Liveness analysis: the arena buffers of ``graph``'s schedule, with lifetimes [start, end) in
    steps (node positions), sizes rounded up to ``alignment``, and in-place merges."""
    from nncompile.solvers.packing import Buffer

    workspace = workspace or {}
    base = view_base(graph)
    outputs = set(graph.outputs)
    live = lifetimes(graph, base)
    home: dict[str, str] = {}           # storage root -> the root that owns its buffer
    span: dict[str, list[int]] = {}     # owning root -> [start, end)
    taken: dict[str, str] = {}
    for step, node in enumerate(graph.nodes):
        root = base[node.name]
        if root != node.name or root in outputs:
            continue
        start, end = live[root]
        owner = root
        if inplace and inplace_eligible(graph, node):
            for src in dict.fromkeys(node.inputs):
                src_root = base[src]
                if src_root not in home or src_root in outputs:
                    continue
                t_src = graph.type_of(src)
                if (t_src.shape != node.type.shape or t_src.dtype != node.type.dtype
                        or graph.type_of(src_root).nbytes != node.type.nbytes or live[src_root][1] != step + 1):
                    continue
                owner = home[src_root]
                taken[node.name] = src
                break
        home[root] = owner
        if owner == root:
            span[owner] = [start, end]
        else:
            span[owner][1] = max(span[owner][1], end)
    buffers = []
    members: dict[tuple, list[str]] = defaultdict(list)
    for root, owner in home.items():
        members[("value", owner)].append(root)
    for owner, (start, end) in span.items():
        size = graph.type_of(owner).nbytes
        buffers.append(Buffer(("value", owner), start, end, align_up(max(size, 1), alignment), alignment))
    step_of = {n.name: i for i, n in enumerate(graph.nodes)}
    for node_name, nbytes in workspace.items():
        if nbytes and nbytes > 0:
            step = step_of[node_name]
            buffers.append(Buffer(("work", node_name), step, step + 1, align_up(nbytes, alignment), alignment))
            members[("work", node_name)].append(node_name)
    value_home = {}
    for node in graph.nodes:
        root = base[node.name]
        if root in home:
            value_home[node.name] = ("value", home[root])
    return BufferTable(buffers, value_home, dict(members), taken, live)


def block_groups(graph: Graph, table: BufferTable) -> dict:
    """Buffers of repeated block instances, for ``packing_blocks.plan_with_blocks``:
    ``{buffer id: (kind, instance)}``. An instance is the nodes named ``[d_]prefix.<i>.*``; a buffer
    belongs to it when the node that made it is in the instance and it dies inside the instance's
    steps; instances whose buffers repeat up to a shift in time form one kind (singletons: none)."""
    steps: dict[tuple, list[int]] = defaultdict(list)
    instance_of: dict[str, tuple] = {}
    for step, node in enumerate(graph.nodes):
        match = BLOCK_NAME.match(node.name)
        if match:
            key = (match["grad"] or "", match["prefix"], int(match["index"]))
            steps[key].append(step)
            instance_of[node.name] = key
    inside: dict[tuple, list] = defaultdict(list)
    for b in table.buffers:
        maker = b.id[1]
        key = instance_of.get(maker)
        if key is not None and b.start >= min(steps[key]) and b.end <= max(steps[key]) + 1:
            inside[key].append(b)
    kinds: dict[tuple, list[tuple]] = defaultdict(list)
    for key, bufs in inside.items():
        origin = min(b.start for b in bufs)
        signature = tuple(sorted((b.start - origin, b.end - origin, b.size, b.align) for b in bufs))
        kinds[(key[0], key[1], signature)].append(key)
    groups = {}
    for number, (kind, keys) in enumerate(kinds.items()):
        if len(keys) < 2:
            continue
        for key in keys:
            for b in inside[key]:
                groups[b.id] = (f"{kind[0]}{kind[1]}#{number}", key[2])
    return groups


def param_layout(params, alignment: int = 64) -> tuple[dict[str, int], int]:
    """Byte offsets of parameters in one block: trainable f32 ones first (so an
    optimizer can sweep them as one contiguous range), then buffers; each aligned."""
    offsets, cursor = {}, 0
    for p in sorted(params, key=lambda p: not (p.trainable and p.type.dtype == "f32")):
        offsets[p.name] = cursor
        cursor = align_up(cursor + p.type.nbytes, alignment)
    return offsets, cursor


def solve_table(table: BufferTable, graph: Graph, options: MemoryOptions = MemoryOptions()):
    """The solver step: offsets for ``table``'s buffers. Returns (Placement, figures)."""
    from nncompile.solvers import packing_greedy
    from nncompile.solvers.packing import Placement, Problem, plan_offsets, validate
    from nncompile.solvers.packing_blocks import plan_with_blocks

    if options.blocks not in ("auto", "on", "off"):
        raise SolverError(f"memory plan: blocks must be auto, on or off, got {options.blocks!r}")
    buffers = table.buffers
    bound = table.lower_bound
    figures: dict = {"no_reuse_bytes": table.no_reuse_bytes, "inplace": len(table.inplace)}
    if not buffers:
        return Placement({}, 0, 0, "optimal", 0.0, 0.0, "none"), figures
    groups = block_groups(graph, table) if options.blocks != "off" else {}
    candidates = []
    if groups:
        t0 = time.perf_counter()
        blocks = plan_with_blocks(buffers, groups, method=options.method, time_limit=options.time_limit,
                                  alignment=options.alignment)
        figures["blocks_seconds"] = round(time.perf_counter() - t0, 4)
        figures["blocks_arena"] = blocks.arena
        figures["block_kinds"] = len(blocks.details["blocks"])
        figures["block_buffers"] = len(groups)
        candidates.append(blocks)
    if not groups or options.blocks == "off" or (options.blocks == "auto" and candidates[0].arena > bound):
        t0 = time.perf_counter()
        flat = plan_offsets(buffers, method=options.method, time_limit=options.time_limit,
                            alignment=options.alignment)
        figures["flat_seconds"] = round(time.perf_counter() - t0, 4)
        figures["flat_arena"] = flat.arena
        candidates.append(flat)
    placement = min(candidates, key=lambda p: p.arena)
    greedy = placement.details.get("greedy_arena")
    if greedy is None:
        greedy = packing_greedy.greedy_offsets(Problem.from_buffers(buffers, options.alignment), bound=bound).arena
    figures["greedy_arena"] = int(greedy)
    figures["method"] = placement.method
    try:
        validate(buffers, placement.offsets)
    except SolverError as error:
        raise BuildError(f"memory plan of '{graph.name}' failed its check: {error}") from None
    return placement, figures


def plan_memory(graph: Graph, options: MemoryOptions = MemoryOptions(),
                workspace: dict[str, int] | None = None,
                layout: tuple[dict[str, int], int] | None = None) -> tuple[Graph, PassReport]:
    workspace = workspace or {}
    with Timer() as timer:
        table = memory_buffers(graph, workspace, options.alignment, options.inplace)
        placement, figures = solve_table(table, graph, options)
        offsets, arena, bound, status = placement.offsets, placement.arena, table.lower_bound, placement.status
        storage: dict[str, tuple[str, object, int]] = {}
        for index, item in enumerate(graph.inputs):
            storage[item.name] = ("input", index, 0)
        param_offsets, cursor = layout if layout is not None else param_layout(graph.params, options.alignment)
        for p in graph.params:
            if p.name not in param_offsets:
                raise ValueError(f"parameter '{p.name}' is missing from the given parameter layout")
            storage[p.name] = ("param", p.name, param_offsets[p.name])
        for index, name in enumerate(graph.outputs):
            storage.setdefault(name, ("output", index, 0))
        for node in graph.nodes:
            if node.name in storage:
                continue
            if node.op in VIEW_OPS:
                storage[node.name] = storage[node.inputs[0]]
            else:
                storage[node.name] = ("arena", offsets[table.home[node.name]], 0)
        buffers = [{"id": f"{b.id[0]}:{b.id[1]}", "kind": b.id[0], "values": table.members.get(b.id, []),
                    "start": b.start, "end": b.end, "size": b.size, "offset": offsets[b.id]}
                   for b in table.buffers]
        plan = MemoryPlan(storage, arena, {k[1]: v for k, v in offsets.items() if k[0] == "work"}, dict(param_offsets),
                          cursor, bound, status, table.lifetimes, buffers, dict(table.inplace), figures)
    report = PassReport("plan_memory", {"arena_bytes": arena, "lower_bound": bound,
                                        "ratio": round(arena / bound, 4) if bound else 1.0, "status": status,
                                        "buffers": len(table.buffers), "param_bytes": cursor,
                                        **{k: v for k, v in figures.items()}}, seconds=timer.seconds)
    report.plan = plan
    plan.figures["seconds"] = round(timer.seconds, 4)
    return graph, report
