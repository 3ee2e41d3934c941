"""``nncompile remat GRAPH.json --budget FRACTION|BYTES``: choose what to recompute under a budget.

Reads a node-link training graph (Checkmate's profiled graphs or random layered DAGs, see
``solvers/remat_graph``), plans the recomputation (fast by default, ``--exact`` for Checkmate's
MILP under ``--time-limit``), checks the plan with the simulator and the memory planner, prints a
summary, writes the schedule with ``-o`` and the figures as the last line with ``--json``::

    nncompile remat unet_b32_train.json --budget 0.7 --exact --time-limit 60 -o sched.json --json
"""
from __future__ import annotations

import json
from pathlib import Path

from nncompile.cli.common import Progress, print_json
from nncompile.errors import InputError
from nncompile.solvers.remat import plan_recompute
from nncompile.solvers.remat_graph import load_graph, parse_budget
from nncompile.solvers.remat_sim import plain_peak, schedule_to_json


def add_arguments(parser) -> None:
    parser.add_argument("graph", help="training graph as networkx node-link JSON")
    parser.add_argument("--budget", required=True,
                        help="memory budget: a fraction of the plain schedule's peak (0.7, 70%%) or bytes (12e9, 12GB)")
    parser.add_argument("--exact", action="store_true", help="solve Checkmate's MILP (time-limited) instead of the fast method")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="seconds for the exact solver (default 60)")
    parser.add_argument("--no-packing", action="store_true", help="judge the budget by max-live bytes, not the planned arena")
    parser.add_argument("-o", "--output", metavar="SCHEDULE.json", help="write the schedule (compute/free steps)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def run(args) -> int:
    if args.time_limit <= 0:
        raise InputError(f"--time-limit must be positive (got {args.time_limit})")
    graph = load_graph(args.graph)
    peak0 = plain_peak(graph)
    budget = parse_budget(args.budget, peak0)
    progress = Progress("remat")
    plan = plan_recompute(graph, budget, method="exact" if args.exact else "fast",
                          time_limit=args.time_limit, use_packing=not args.no_packing,
                          progress=progress.update)
    progress.done()
    if args.output:
        out = Path(args.output)
        try:
            out.write_text(json.dumps(schedule_to_json(graph, plan.steps), indent=1) + "\n")
        except OSError as err:
            raise InputError(f"cannot write schedule {out}: {err.strerror}") from None
    names = [graph.names[v] for v in plan.recomputed]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    print(f"graph          {args.graph} ({graph.n} ops, {graph.num_edges} edges)")
    print(f"plain peak     {peak0:,} bytes (peak_0)")
    print(f"budget         {budget:,} bytes ({budget / peak0:.3f} of peak_0)")
    print(f"planned peak   {plan.arena:,} bytes ({plan.arena / peak0:.3f} of peak_0; "
          f"{plan.arena_method}; max-live {plan.peak:,})")
    print(f"overhead       {plan.overhead:.4f} (plan compute / one plain forward+backward)")
    print(f"recomputed     {len(plan.recomputed)} ops, {len(plan.sequence) - graph.n} extra computes"
          + (f": {shown}" if shown else ""))
    gap = "" if plan.gap is None else f", gap {plan.gap:.4%}"
    print(f"status         {plan.status} ({plan.method}{gap})")
    print(f"seconds        {plan.seconds:.2f}")
    for note in plan.notes:
        print(f"note: {note}")
    if args.output:
        print(f"schedule       {args.output} ({len(plan.steps)} steps)")
    if args.json:
        figures = plan.figures(graph)
        figures["graph"] = str(args.graph)
        print_json(figures)
    return 0
