"""The pass pipeline: a plain list, run top to bottom.

    graph, reports, plan = run_pipeline(graph, PipelineOptions())

verify -> prune to the outputs -> fuse -> schedule (a topological order with a lower memory peak)
-> plan memory (with each kernel's scratch). The same list for inference and training graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nncompile.ir.builder import prune
from nncompile.ir.graph import Graph
from nncompile.ir.verify import verify
from nncompile.passes.base import PassReport
from nncompile.passes.fuse import FuseOptions, fuse
from nncompile.passes.plan_memory import MemoryOptions, MemoryPlan, plan_memory
from nncompile.passes.schedule import ScheduleOptions, schedule


@dataclass(frozen=True)
class PipelineOptions:
    fuse: FuseOptions = field(default_factory=FuseOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    verify_each: bool = False
    print_ir_after: tuple[str, ...] = ()


def _after(name: str, graph: Graph, options: PipelineOptions) -> None:
    if options.verify_each:
        verify(graph)
    if name in options.print_ir_after or "all" in options.print_ir_after:
        print(f"// IR after {name}\n{graph}")


def run_pipeline(graph: Graph, options: PipelineOptions = PipelineOptions(), workspace_fn=None, layout=None,
                 keep_inputs: bool = False) -> tuple[Graph, list[PassReport], MemoryPlan]:
    """Run the passes; ``layout`` fixes the parameter block (shared by a model's modules)."""
    verify(graph)
    graph = prune(graph, keep_inputs=keep_inputs)
    _after("prune", graph, options)
    reports = []
    graph, report = fuse(graph, options.fuse)
    reports.append(report)
    _after("fuse", graph, options)
    workspace = {n.name: workspace_fn(graph, n) for n in graph.nodes} if workspace_fn else {}
    graph, report = schedule(graph, options.schedule, workspace)
    reports.append(report)
    _after("schedule", graph, options)
    graph, report = plan_memory(graph, options.memory, workspace, layout)
    reports.append(report)
    _after("plan_memory", graph, options)
    return graph, reports, report.plan
