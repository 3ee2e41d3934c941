"""Recomputation selection on the remat-graphs dataset: exact (time-limited MILP) vs fast.

Network graphs (Checkmate's profiled training graphs) at 0.9 / 0.7 / 0.5 of the plain peak:
overhead (plan compute / one plain forward+backward), status, gap and seconds of the exact mode
next to the fast mode and the dataset README's reference (an exact Checkmate MILP, HiGHS, 0.1%
gap, 2 cores).  Random layered DAGs n = 100..1000: fast mode only.  Every plan is replayed by the
simulator and its planned arena (packing solver) must fit the budget.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from nncompile.errors import SolverError
from nncompile.solvers.remat import plan_recompute
from nncompile.solvers.remat_graph import load_graph
from nncompile.solvers.remat_sim import plain_peak, simulate

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "remat-graphs"

NETWORKS = ["vgg16_b256", "vgg19_b256", "unet_b32", "fcn8_b32", "segnet_b32", "mobilenet_b512", "resnet50_b256"]
RANDOM = [100, 250, 500, 1000]
FRACTIONS = [0.9, 0.7, 0.5]
REFERENCE = {  # README: overhead of the exact Checkmate MILP (None: below the floor / not proved)
    "unet_b32": {0.9: "1.011", 0.7: "1.030", 0.5: "1.070"},
    "mobilenet_b512": {0.9: "1.002", 0.7: "1.006", 0.5: "1.016"},
    "fcn8_b32": {0.9: "1.000", 0.7: "1.009", 0.5: "below floor"},
    "segnet_b32": {0.9: "1.001", 0.7: "1.003", 0.5: "not proved in 120 s"},
    "vgg16_b256": {0.9: "1.020", 0.7: "below floor", 0.5: "below floor"},
}
EXACT_MAX_NODES = 200  # Checkmate's MILP has O(n^2) binaries and O(n |E|) free variables


def _solve(graph, budget, method, time_limit):
    """(plan or None, message, seconds); every plan is replayed by the simulator."""
    start = time.perf_counter()
    try:
        plan = plan_recompute(graph, budget, method=method, time_limit=time_limit)
    except SolverError as err:
        text = err.message
        seconds = time.perf_counter() - start
        if budget < graph.floor_bytes():
            return None, "infeasible (below floor)", seconds
        found = re.search(r"smallest feasible budget found is \d+ bytes \(([0-9.]+) of", text)
        least = f" (least found {found.group(1)})" if found else ""
        return None, ("infeasible" if "is infeasible" in text else "no plan") + least, seconds
    check = simulate(graph, plan.steps)
    assert check.valid and check.peak <= plan.arena <= budget, "plan failed the simulator"
    return plan, "", time.perf_counter() - start


def run(quick: bool) -> str:
    if not DATA.is_dir():
        return "## Recomputation (remat)\n\nSkipped: ../shared/datasets/remat-graphs not present.\n"
    time_limit = 20.0 if quick else 90.0
    networks = NETWORKS[:3] if quick else NETWORKS
    lines = [
        "## Recomputation (remat)",
        "",
        "`nncompile remat GRAPH --budget F` on the remat-graphs dataset. Overhead = plan compute / one plain "
        "forward+backward; budget = fraction of the plain schedule's peak; every plan is replayed by the "
        "simulator and its buffers packed by the memory planner (planned arena ≤ budget). Exact = Checkmate's "
        f"MILP (OR-Tools + HiGHS, 1 thread, {time_limit:g} s limit, never worse than the fast plan it starts "
        "from); on a timeout it reports the best plan and the MILP's gap. Reference = the dataset README "
        "(exact MILP, HiGHS to 0.1% gap, 2 cores). Fast = the greedy drop-gap path (`remat_fast`).",
        "",
        "| graph | nodes | budget | reference | exact overhead | exact status (gap) | exact s | fast overhead | fast / exact | fast s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in networks:
        graph = load_graph(DATA / f"{name}_train.json")
        peak0 = plain_peak(graph)
        for fraction in FRACTIONS:
            budget = int(fraction * peak0)
            fast, fast_msg, fast_s = _solve(graph, budget, "fast", time_limit)
            if graph.n <= EXACT_MAX_NODES:
                exact, exact_msg, exact_s = _solve(graph, budget, "exact", time_limit)
            else:
                exact, exact_msg, exact_s = None, f"not run (n > {EXACT_MAX_NODES})", 0.0
            reference = REFERENCE.get(name, {}).get(fraction, "–")
            if exact is not None:
                gap = "" if exact.gap is None else f" ({exact.gap:.2%})"
                exact_cells = [f"{exact.overhead:.4f}", f"{exact.status}{gap}", f"{exact_s:.1f}"]
            else:
                exact_cells = ["–", exact_msg, f"{exact_s:.1f}" if exact_s else "–"]
            if fast is not None:
                ratio = f"{fast.overhead / exact.overhead:.4f}" if exact is not None else "–"
                fast_cells = [f"{fast.overhead:.4f}", ratio, f"{fast_s:.2f}"]
            else:
                fast_cells = [fast_msg, "–", f"{fast_s:.2f}"]
            lines.append(f"| {name} | {graph.n} | {fraction:g} | {reference} | " + " | ".join(exact_cells + fast_cells) + " |")
    lines += [
        "",
        "Random layered DAGs (Moccasin's scaling graphs), fast mode only:",
        "",
        "| graph | nodes | edges | budget | fast overhead | planned peak / budget | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in (RANDOM[:2] if quick else RANDOM):
        graph = load_graph(DATA / f"random_layered_n{n}.json")
        peak0 = plain_peak(graph)
        for fraction in FRACTIONS:
            budget = int(fraction * peak0)
            plan, message, seconds = _solve(graph, budget, "fast", time_limit)
            if plan is not None:
                cells = [f"{plan.overhead:.4f}", f"{plan.arena / budget:.3f}", f"{seconds:.2f}"]
            else:
                cells = [message, "–", f"{seconds:.2f}"]
            lines.append(f"| random_layered_n{n} | {graph.n} | {graph.num_edges} | {fraction:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
