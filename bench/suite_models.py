"""Whole models: inference latency and training-step time of the compiled examples against the same
networks in eager PyTorch (examples/torch_models.py), same weights, same inputs, measured in
interleaved rounds in one run."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nncompile as nnc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from torch_models import Gpt, LeNet, Mlp  # noqa: E402

GPT = {"B": 4, "T": 64, "d": 128, "heads": 4, "layers": 2, "vocab": 512}
CONFIGS = [
    ("mlp", "mlp.nn", {"B": 64}, lambda: Mlp()),
    ("lenet", "lenet.nn", {"B": 32}, lambda: LeNet()),
    ("gpt", "gpt.nn", GPT, lambda: Gpt(GPT["vocab"], GPT["T"], GPT["d"], GPT["heads"], GPT["layers"])),
]


def _inputs(name: str, dims: dict, rng):
    if name == "gpt":
        tokens = rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))
        return (tokens, np.arange(dims["T"])), rng.integers(0, dims["vocab"], (dims["B"], dims["T"]))
    shape = (dims["B"], 784) if name == "mlp" else (dims["B"], 1, 28, 28)
    return (rng.standard_normal(shape).astype(np.float32),), rng.integers(0, 10, dims["B"])


def _timed(fn, clock, reps: int) -> float:
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps


def _race(fns: dict, clock, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns alternating round by round."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn, clock, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def _loss(name, logits, labels):
    if name == "gpt":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(logits, labels)


def _pair(name, path, dims, make):
    graph = nnc.parse(EXAMPLES / path, set=dims)
    model = nnc.compile(graph, train=True)
    net = make()
    net.load_state_dict(model.state_dict())
    spec = graph.train
    hyper = dict(spec.hyper)
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec.optimizer](
        net.parameters(), **hyper)
    rng = np.random.default_rng(0)
    inputs, labels = _inputs(name, dims, rng)
    t_inputs = [torch.from_numpy(a) for a in inputs]
    t_labels = torch.from_numpy(labels)

    def torch_forward():
        with torch.inference_mode():
            net(*t_inputs)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        _loss(name, net(*t_inputs), t_labels).backward()
        opt.step()

    fns_infer = {"nnc": lambda: model(*inputs), "torch": torch_forward}
    fns_train = {"nnc": lambda: model.train_step(*inputs, labels), "torch": torch_step}
    return graph, fns_infer, fns_train, net, model


def run(quick: bool) -> str:
    rounds = 5 if quick else 11
    lines = [
        "## Whole models: compiled vs eager PyTorch",
        "",
        "`python -m bench --only models`. The examples (`examples/*.nn`) compiled with `nnc.compile(train=True)` "
        "against the same networks in eager PyTorch (`examples/torch_models.py`) with the same weights and inputs. "
        "Inference: `m(x)` vs `net(x)` under `torch.inference_mode()`. Training step: `m.train_step(x, y)` "
        "(forward, backward, optimizer update, all compiled) vs `zero_grad(); loss.backward(); opt.step()` with the "
        "example's optimizer. Medians over interleaved rounds; 1 thread = CPU time of the calling thread "
        "(insensitive to other load), 2 threads = wall clock. `speed-up` = torch time / nnc time.",
        "",
        f"Configurations: mlp B=64 (784-1024-1024-10, SGD momentum), lenet B=32 (SGD momentum), gpt B={GPT['B']} "
        f"T={GPT['T']} d={GPT['d']} {GPT['layers']} layers vocab {GPT['vocab']} (AdamW).",
        "",
        "| model | threads | inference nnc ms | torch ms | speed-up | train step nnc ms | torch ms | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    saved = torch.get_num_threads()
    try:
        for name, path, dims, make in CONFIGS:
            _, infer, train, _, model = _pair(name, path, dims, make)
            for threads, clock in ((1, time.thread_time), (2, time.perf_counter)):
                torch.set_num_threads(threads)
                model.set_threads(threads)
                reps = 3 if name == "gpt" else 10
                a = _race(infer, clock, rounds, reps)
                b = _race(train, clock, rounds, max(1, reps // 2))
                lines.append(f"| {name} | {threads} | {a['nnc'] * 1e3:.3f} | {a['torch'] * 1e3:.3f} | "
                             f"{a['torch'] / a['nnc']:.2f}x | {b['nnc'] * 1e3:.3f} | {b['torch'] * 1e3:.3f} | "
                             f"{b['torch'] / b['nnc']:.2f}x |")
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(saved)
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
        lines += ["", f"1-minute load average after the run: {load} (2 cores, shared machine)."]
    except OSError:
        pass
    return "\n".join(lines) + "\n"
