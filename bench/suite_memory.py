"""Memory planning of compiled training steps: the arena the compiler plans (schedule, in-place
reuse, bi-level blocks, packing) against the max-live lower bound, no reuse, best-fit greedy, and
PyTorch's peak for the same training step; the bi-level plan of a 12-layer GPT."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.codegen import register_rules
from nncompile.codegen.cpp_ops_nn import workspace_bytes
from nncompile.ir.builder import prune
from nncompile.passes.fuse import fuse
from nncompile.passes.plan_memory import MemoryOptions, memory_buffers, param_layout, plan_memory
from nncompile.passes.schedule import ScheduleOptions, schedule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from torch_models import Gpt, LeNet, Mlp  # noqa: E402

GPT = {"B": 4, "T": 64, "d": 128, "heads": 4, "layers": 2, "vocab": 512}
CONFIGS = [
    ("mlp", "mlp.nn", {"B": 64}, lambda: Mlp()),
    ("lenet", "lenet.nn", {"B": 32}, lambda: LeNet()),
    ("gpt", "gpt.nn", GPT, lambda: Gpt(GPT["vocab"], GPT["T"], GPT["d"], GPT["heads"], GPT["layers"])),
]


def _lowered(graph):
    tg = training_graph(graph, None)
    fused, _ = fuse(prune(tg.graph, keep_inputs=True))
    workspace = {n.name: workspace_bytes(fused, n) for n in fused.nodes}
    return fused, workspace


def _bound_with_grads(graph, workspace) -> int:
    """The max-live bound if the gradients (graph outputs, written into a separate block today) were
    arena buffers too, live from the step that makes them to the end of the step."""
    from nncompile.solvers.packing import Buffer, max_live_bytes

    table = memory_buffers(graph, workspace)
    buffers = list(table.buffers)
    n = len(graph.nodes)
    for step, node in enumerate(graph.nodes):
        if node.name in graph.outputs and node.type.dtype == "f32" and node.type.rank > 0:
            buffers.append(Buffer(("grad", node.name), step, n + 1, node.type.nbytes))
    return max_live_bytes([b.start for b in buffers], [b.end for b in buffers], [b.size for b in buffers])


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _torch_peak(name, make, graph, dims) -> tuple[int, int]:
    """Peak bytes PyTorch allocates during one training step above what it holds before it (weights,
    optimizer state): (forward + backward, whole step with the optimizer), from profile_memory."""
    net = make()
    spec = graph.train
    hyper = dict(spec.hyper)
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec.optimizer](
        net.parameters(), **hyper)
    rng = np.random.default_rng(0)
    if name == "gpt":
        inputs = (torch.from_numpy(rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))), torch.arange(dims["T"]))
        labels = torch.from_numpy(rng.integers(0, dims["vocab"], (dims["B"], dims["T"])))
    else:
        shape = (dims["B"], 784) if name == "mlp" else (dims["B"], 1, 28, 28)
        inputs = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)),)
        labels = torch.from_numpy(rng.integers(0, 10, dims["B"]))

    def loss_of():
        logits = net(*inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def step(with_optimizer):
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        if with_optimizer:
            opt.step()

    torch.set_num_threads(1)
    step(True)                          # optimizer state exists before the measured step
    peaks = []
    for with_optimizer in (False, True):
        opt.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step(with_optimizer)
        # every allocation and free is one "[memory]" record (bytes +/-) with a time stamp; their
        # running sum in time order is the bytes the step has allocated and not yet freed
        records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
        live = peak = 0
        for e in records:
            live += e.nbytes()
            peak = max(peak, live)
        peaks.append(peak)
    return peaks[0], peaks[1]


def run(quick: bool) -> str:
    register_rules()
    repeats = 3
    lines = [
        "## Memory planning of compiled training steps (`passes/schedule.py`, `passes/plan_memory.py`)",
        "",
        "`python -m bench --only memory`. The training-step graph of each example (forward, backward, loss; "
        "fused as the compiler does) is planned into one arena, alignment 64. `LB` = max-live lower bound "
        "(largest total of buffers live at one step). `LB given` = the autodiff order without in-place reuse; "
        "`LB sched` = after the schedule pass (still without in-place); `LB` = the final bound (schedule + "
        "in-place reuse of elementwise outputs), which the arena is compared against. `no reuse` = every buffer "
        "its own bytes; `greedy` = best-fit greedy (best of its orderings) on the final buffers. Seconds: median "
        f"of {repeats} runs of each pass alone. PyTorch: peak bytes allocated during the same eager training step "
        "above what it holds before (weights, optimizer state): the running sum, in time order, of the "
        "allocation / free records of `torch.profiler` with `profile_memory` (fwd+bwd = zero_grad + backward; step = with `opt.step()`); it includes the gradients, so it is compared "
        "with the arena + the gradient block nncompile's step writes (the optimizer then updates in place). "
        "`LB with grads in arena` = the bound if the gradients were arena buffers (live from the step that makes "
        "them to the end): what a plan sharing gradient and activation space could reach.",
        "",
        "| model | buffers | no reuse | greedy | LB given | LB sched | LB | arena | arena / LB | method | in-place | "
        "schedule s | plan s | torch fwd+bwd | torch step | nnc arena + grads | torch step / nnc | LB with grads in arena |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kib = lambda b: f"{b / 1024:,.0f} KiB"  # noqa: E731
    for name, path, dims, make in CONFIGS:
        graph = nnc.parse(EXAMPLES / path, set=dims)
        fused, workspace = _lowered(graph)
        layout = param_layout(graph.params)
        given_lb = memory_buffers(fused, workspace, inplace=False).lower_bound
        sched_s, (scheduled, sreport) = _median_seconds(lambda: schedule(fused, ScheduleOptions(), workspace), repeats)
        sched_lb = memory_buffers(scheduled, workspace, inplace=False).lower_bound
        plan_memory(scheduled, MemoryOptions(), workspace, layout)          # warm the numba caches
        plan_s, (_, report) = _median_seconds(lambda: plan_memory(scheduled, MemoryOptions(), workspace, layout),
                                              repeats)
        f = report.figures
        trainable = sum(p.type.nbytes for p in graph.params if p.trainable and p.type.dtype == "f32")
        fwd_bwd, step = _torch_peak(name, make, graph, dims)
        ours = f["arena_bytes"] + trainable
        joint = _bound_with_grads(scheduled, workspace)
        lines.append(
            f"| {name} | {f['buffers']} | {kib(f['no_reuse_bytes'])} | {kib(f['greedy_arena'])} | {kib(given_lb)} | "
            f"{kib(sched_lb)} | {kib(f['lower_bound'])} | {kib(f['arena_bytes'])} | {f['ratio']:.4f} | {f['method']} | "
            f"{f['inplace']} | {sched_s:.3f} | {plan_s:.3f} | {kib(fwd_bwd)} | {kib(step)} | {kib(ours)} | "
            f"{step / ours:.2f}x | {kib(joint)} |")
    lines += ["", f"Configurations: mlp B=64, lenet B=32, gpt B={GPT['B']} T={GPT['T']} d={GPT['d']} "
                  f"{GPT['layers']} layers vocab {GPT['vocab']} (AdamW).", "",
              "The arena meets its bound on every model. Where the compiled step holds more than PyTorch (last ratio "
              "below 1), the cause is that the arena and the gradient block are separate allocations that both last "
              "the whole step, while PyTorch frees activations as the gradients appear. Planning the gradients into "
              "the arena would close most of that gap (last column); the training runtime keeps them in their own "
              "block today."]

    # the schedule pass where the graph allows it: branches whose heads the given order computes first
    from nncompile.ir import GraphBuilder, TensorType

    b = GraphBuilder("wide")
    x = b.input("x", TensorType((256, 256)))
    heads = [b.op("exp", [b.op("scale", [x], {"factor": float(i + 1)})]) for i in range(16)]
    sums = [b.op("sum", [h], {"axes": [1]}) for h in heads]
    total = sums[0]
    for s in sums[1:]:
        total = b.op("add", [total, s])
    b.output(total)
    wide = b.build()
    t, (_, wreport) = _median_seconds(lambda: schedule(wide), repeats)
    w = wreport.figures
    lines += ["", "### Memory-aware scheduling", "",
              "The schedule pass keeps the lowest bound among the given order, sink (allocating nodes that read no "
              "arena buffer moved to just before their first reader), eager (a ready node that frees more than it "
              "allocates runs at once), freed-minus-allocated greedy with and without a one-step lookahead (graphs up "
              "to 400 nodes) and an exact DP over node sets (graphs up to 40 nodes). On the training steps above the "
              "autodiff order is already the best candidate (`LB given` = `LB sched`; on mlp and lenet the exact DP "
              "confirms it is optimal); the peak there is set by activations saved for the backward pass and the "
              "loss head, which only recomputation moves. Where the order matters:", "",
              "| graph | nodes | LB given | LB after | after / given | chosen | seconds |", "|---|---:|---:|---:|---:|---|---:|",
              f"| 16 branches exp(256x256) -> row sums, heads first | {len(wide.nodes)} | {kib(w['peak_before'])} | "
              f"{kib(w['peak_after'])} | {w['peak_after'] / w['peak_before']:.3f} | {w['chosen']} | {t:.3f} |"]

    # bi-level planning of a 12-layer GPT training step
    lines += ["", "### Bi-level planning (MEMO) of a 12-layer GPT training step", "",
              "gpt.nn with 12 layers (B=4 T=64 d=128 vocab 512), training step after fuse + schedule. Bi-level = "
              "plan one forward and one backward layer block, reuse the layout for all 12 layers, plan the block "
              "rectangles with the rest (`MemoryOptions(blocks='on')`); flat = one problem with every buffer "
              f"(`blocks='off'`: greedy, then search). Seconds: median of {repeats} runs, numba caches warm.", "",
              "| plan | buffers | block kinds | buffers in blocks | LB | arena | arena / LB | seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    dims12 = dict(GPT, layers=12)
    graph = nnc.parse(EXAMPLES / "gpt.nn", set=dims12)
    fused, workspace = _lowered(graph)
    schedule_s, (scheduled, _) = _median_seconds(lambda: schedule(fused, ScheduleOptions(), workspace), repeats)
    layout = param_layout(graph.params)
    for label, options in (("bi-level", MemoryOptions(blocks="on")), ("flat", MemoryOptions(blocks="off"))):
        seconds, (_, report) = _median_seconds(lambda: plan_memory(scheduled, options, workspace, layout), repeats)
        f = report.figures
        lines.append(f"| {label} | {f['buffers']} | {f.get('block_kinds', 0)} | {f.get('block_buffers', 0)} | "
                     f"{kib(f['lower_bound'])} | {kib(f['arena_bytes'])} | {f['ratio']:.4f} | {seconds:.3f} |")
    lines += ["", f"The schedule pass on this graph ({len(fused.nodes)} nodes): {schedule_s:.2f} s (median of {repeats})."]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines += ["", f"1-minute load average after the run: {load} (2 cores, shared machine)."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick=True))
