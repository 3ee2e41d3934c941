"""Training under a memory budget: the compiled gpt.nn training step with recomputation chosen by the
solver (``nnc.compile(..., train=True, memory_budget=...)``, passes/recompute.py) against the two
classic checkpointing choices applied through the same rewrite: checkpoint every layer, and Chen's
sqrt(n) segments. For each: the arena the module allocates (vs the budget and the no-recompute
arena), the ops recomputed, the added FLOPs, the gradients of one step against the unbudgeted step
(same weights, same batch), and the step time in interleaved rounds (one thread, so that CPU time
is a fair measure on a shared machine; wall time is reported too).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

import nncompile as nnc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FULL = {"B": 8, "T": 128, "d": 256, "heads": 4, "layers": 4, "vocab": 512}
QUICK = {"B": 2, "T": 64, "d": 128, "heads": 4, "layers": 2, "vocab": 256}


def _batch(dims, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))
    return tokens, np.arange(dims["T"]), rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))


def _variants(graph):
    """(label, compile kwargs); the solver runs at 50% and at the arena each baseline reaches."""
    yield "no recompute", {}
    for method, label in (("every_layer", "checkpoint every layer"), ("sqrt_n", "Chen sqrt(n)")):
        yield label, {"recompute": method}
    yield "solver @ 50%", {"memory_budget": "50%"}


def run(quick: bool) -> str:
    dims = QUICK if quick else FULL
    graph = nnc.parse(EXAMPLES / "gpt.nn", set=dims)
    batch = _batch(dims)
    models, compile_s = {}, {}
    for label, kwargs in _variants(graph):
        t0 = time.perf_counter()
        models[label] = nnc.compile(graph, train=True, **kwargs)
        compile_s[label] = time.perf_counter() - t0
    # the solver at the same arena as each baseline: what recomputation costs at equal memory
    for label in ("checkpoint every layer", "Chen sqrt(n)"):
        arena = models[label].manifest["train"]["arena_bytes"]
        t0 = time.perf_counter()
        models[f"solver @ {label} arena"] = nnc.compile(graph, train=True, memory_budget=arena)
        compile_s[f"solver @ {label} arena"] = time.perf_counter() - t0

    plain = models["no recompute"]
    plain_arena = plain.manifest["train"]["arena_bytes"]
    # one step from the same initial weights on the same batch: gradients against the unbudgeted step
    checks = {}
    for label, model in models.items():
        loss = model.train_step(*batch)
        checks[label] = [loss, model._trainer.grads()]
    ref_loss, ref_grads = checks["no recompute"]
    for label, (loss, grads) in checks.items():
        diff = max(float(np.abs(grads[k] - ref_grads[k]).max()) for k in ref_grads)
        checks[label] = (abs(loss - ref_loss), diff)

    for model in models.values():
        model.set_threads(1)
    reps, rounds = (5, 11) if quick else (3, 9)
    wall = {label: [] for label in models}
    cpu = {label: [] for label in models}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for label, model in models.items():
            model.train_step(*batch)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                model.train_step(*batch)
            wall[label].append((time.perf_counter() - w0) / reps)
            cpu[label].append((time.process_time() - c0) / reps)
    load_after = os.getloadavg()[0]
    base_wall, base_cpu = statistics.median(wall["no recompute"]), statistics.median(cpu["no recompute"])

    lines = [
        "## Training under a memory budget (recompute)",
        "",
        f"gpt.nn {', '.join(f'{k}={v}' for k, v in dims.items())}, AdamW; `nnc.compile(g, train=True, "
        f"memory_budget=...)` (fast solver path, each plan judged by the arena `plan_memory` produces) vs "
        f"checkpointing every layer and Chen's sqrt(n) segments through the same rewrite "
        f"(`recompute=\"every_layer\" | \"sqrt_n\"`). Arena = bytes the module allocates. Gradients: max |diff| "
        f"after one step from the same weights on the same batch vs the unbudgeted module. Step time: one "
        f"thread, median of {rounds} interleaved rounds of {reps} steps; overhead vs no recompute.",
        "",
        "| choice | budget | arena bytes | of no-recompute | ops recomputed | added FLOPs | max grad diff | "
        "step CPU ms | CPU overhead | step wall ms | wall overhead | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, model in models.items():
        spec = model.manifest["train"]
        figures = spec["figures"].get("recompute", {})
        arena = model._trainer.arena.nbytes if spec["arena_bytes"] else 0
        budget = figures.get("budget_bytes")
        med_wall, med_cpu = statistics.median(wall[label]), statistics.median(cpu[label])
        loss_diff, grad_diff = checks[label]
        lines.append(
            f"| {label} | {f'{budget:,}' if budget is not None else '-'} | {arena:,} | "
            f"{arena / plain_arena:.3f} | {figures.get('recomputed_nodes', 0)} | "
            f"{figures.get('flops_overhead', 0.0):.1%} | {grad_diff:.1e} | {med_cpu * 1e3:.1f} | "
            f"{med_cpu / base_cpu:.3f}x | {med_wall * 1e3:.1f} | {med_wall / base_wall:.3f}x | "
            f"{compile_s[label]:.0f} |")
        assert arena == max(spec["arena_bytes"], 1) and (budget is None or arena <= budget)
    lines += [
        "",
        "Every budgeted arena is at most its budget; a gradient difference above 1e-6 would be a bug. "
        f"1-minute load average (2 cores, shared): {load_before:.1f} before the timing, {load_after:.1f} after.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick=True))
