"""plan_memory: every intermediate gets an offset in one arena, decided at compile time.

Needs: a graph in its final schedule (node order = execution order), and the workspace each node's
kernel needs (bytes of scratch, e.g. im2col; from the emitter). Guarantees: values live at the same
time never overlap; views (reshape/flatten/squeeze/unsqueeze/identity of an arena value) share their
base's storage and extend its lifetime; graph outputs are written straight into the caller's
arrays, graph inputs and parameters are read where they are. Reports: arena bytes, the max-live
lower bound, their ratio, the solver's status and time.

    graph, report = plan_memory(graph, MemoryOptions(), workspace={"conv1": 4096})
    report.plan.offsets["h"]   # byte offset of value h in the arena
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nncompile.ir.graph import Graph
from nncompile.passes.base import PassReport, Timer

VIEW_OPS = frozenset({"reshape", "flatten", "squeeze", "unsqueeze", "identity"})


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class MemoryOptions:
    alignment: int = 64
    method: str = "auto"          # a packing method of nncompile.solvers.packing
    time_limit: float = 5.0


@dataclass
class MemoryPlan:
    """Where each value lives. ``storage[name]`` is ``(kind, base, byte_offset)`` with kind one of
    ``arena`` (base = offset in the arena), ``input``, ``param``, ``output`` (base = index/name) —
    views point at their base's storage."""

    storage: dict[str, tuple[str, object, int]]
    arena_bytes: int
    workspace: dict[str, int]          # node name -> arena offset of its scratch
    param_offsets: dict[str, int]      # param name -> byte offset in the parameter block
    param_bytes: int
    lower_bound: int
    status: str
    lifetimes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "lower_bound": self.lower_bound, "status": self.status,
                "param_bytes": self.param_bytes,
                "values": {k: {"kind": v[0], "where": v[1], "lifetime": self.lifetimes.get(k)}
                           for k, v in self.storage.items()},
                "workspace": self.workspace}


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


def param_layout(params, alignment: int = 64) -> tuple[dict[str, int], int]:
    """Byte offsets of parameters in one block: trainable f32 ones first (so an
    optimizer can sweep them as one contiguous range), then buffers; each aligned."""
    offsets, cursor = {}, 0
    for p in sorted(params, key=lambda p: not (p.trainable and p.type.dtype == "f32")):
        offsets[p.name] = cursor
        cursor = align_up(cursor + p.type.nbytes, alignment)
    return offsets, cursor


def plan_memory(graph: Graph, options: MemoryOptions = MemoryOptions(),
                workspace: dict[str, int] | None = None,
                layout: tuple[dict[str, int], int] | None = None) -> tuple[Graph, PassReport]:
    from nncompile.solvers.packing import Buffer, plan_offsets

    workspace = workspace or {}
    with Timer() as timer:
        base = view_base(graph)
        outputs = set(graph.outputs)
        live = lifetimes(graph, base)
        step_of = {n.name: i for i, n in enumerate(graph.nodes)}
        buffers = []
        for root, (start, end) in live.items():
            if root in outputs:
                continue
            size = graph.type_of(root).nbytes
            buffers.append(Buffer(("value", root), start, end, align_up(max(size, 1), options.alignment), options.alignment))
        for node_name, nbytes in workspace.items():
            if nbytes > 0:
                step = step_of[node_name]
                buffers.append(Buffer(("work", node_name), step, step + 1, align_up(nbytes, options.alignment), options.alignment))
        if buffers:
            placement = plan_offsets(buffers, method=options.method, time_limit=options.time_limit,
                                     alignment=options.alignment)
            offsets, arena, bound, status = placement.offsets, placement.arena, placement.lower_bound, placement.status
        else:
            offsets, arena, bound, status = {}, 0, 0, "optimal"
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
                storage[node.name] = ("arena", offsets[("value", node.name)], 0)
        plan = MemoryPlan(storage, arena, {k[1]: v for k, v in offsets.items() if k[0] == "work"}, dict(param_offsets),
                          cursor, bound, status, live)
    report = PassReport("plan_memory", {"arena_bytes": arena, "lower_bound": bound,
                                        "ratio": round(arena / bound, 4) if bound else 1.0, "status": status,
                                        "buffers": len(buffers), "param_bytes": cursor}, seconds=timer.seconds)
    report.plan = plan
    return graph, report
