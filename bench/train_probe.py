"""Focused probe of the compiled MLP (or gpt) training step against eager PyTorch, 1 thread.

    python bench/train_probe.py [--model mlp|gpt] [--rounds 9] [--gemms]

Times ``m.train_step(x, y)`` of the compiled example and the eager twin (examples/torch_models.py,
same optimizer and hyper-parameters, same weights and inputs), and for the MLP the hand-written C++
baseline calling OpenBLAS (bench/handwritten), in CPU time of the calling thread (``time.thread_time``),
everything on one thread, in interleaved rounds; prints medians and the ratios X / nnc. ``--gemms`` also times each GEMM shape of the MLP step in isolation through
``nnc::sgemm`` (the test bindings, timed in C++, CPU time) and prints GFLOP/s per shape; those calls run
back to back, operands warm: bench/gemm_cold.py times the same shapes with operands cold from DRAM, as
the step has them after the optimizer's sweep.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nncompile as nnc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "tests" / "backend"))
sys.path.insert(0, str(REPO))
from torch_models import Gpt, Mlp  # noqa: E402

GPT = {"T": 128, "d": 256, "heads": 4, "layers": 4, "vocab": 512}

# (name, transA, transB, M, N, K) as the generated MLP training step (B=128) calls nnc::sgemm.
MLP_GEMMS = [
    ("fc1 fwd x@W1^T", False, True, 128, 1024, 784),
    ("fc2 fwd h1@W2^T", False, True, 128, 1024, 1024),
    ("fc3 fwd h2@W3^T", False, True, 128, 10, 1024),
    ("fc3 dW dY^T@h2", True, False, 10, 1024, 128),
    ("fc3 dX dY@W3", False, False, 128, 1024, 10),
    ("fc2 dW dY^T@h1", True, False, 1024, 1024, 128),
    ("fc2 dX dY@W2", False, False, 128, 1024, 1024),
    ("fc1 dW dY^T@x", True, False, 1024, 784, 128),
    ("fc2 dW (dY^T materialized)", False, False, 1024, 1024, 128),
    ("fc1 dW (dY^T materialized)", False, False, 1024, 784, 128),
]


def build(model: str, batch: int):
    dims = {"B": batch, **(GPT if model == "gpt" else {})}
    graph = nnc.parse(REPO / "examples" / f"{model}.nn", set=dims)
    compiled = nnc.compile(graph, train=True)
    torch.manual_seed(0)
    if model == "gpt":
        net = Gpt(GPT["vocab"], GPT["T"], GPT["d"], GPT["heads"], GPT["layers"])
    else:
        net = Mlp()
    net.load_state_dict(compiled.state_dict())
    rng = np.random.default_rng(0)
    if model == "gpt":
        inputs = (rng.integers(0, GPT["vocab"], (batch, GPT["T"])), np.arange(GPT["T"]))
        labels = rng.integers(0, GPT["vocab"], (batch, GPT["T"]))
    else:
        inputs = (rng.standard_normal((batch, 784)).astype(np.float32),)
        labels = rng.integers(0, 10, batch)
    hyper = dict(graph.train.hyper)
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[graph.train.optimizer]
    opt = cls(net.parameters(), **hyper)
    t_inputs = [torch.from_numpy(a) for a in inputs]
    t_labels = torch.from_numpy(labels)

    def eager():
        opt.zero_grad(set_to_none=True)
        logits = net(*t_inputs)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_labels.reshape(-1)).backward()
        opt.step()

    fns = {"nnc": lambda: compiled.train_step(*inputs, labels), "eager": eager}
    if model == "mlp":
        # the hand-written C++ baseline calling OpenBLAS sgemm (bench/handwritten), when it builds
        from bench import handwritten as hw

        try:
            blas = hw.Mlp(hw.build("blas"), compiled.state_dict(), batch)
            blas.set_threads(1)
            fns["c++ blas"] = lambda: blas.train_step(inputs[0], labels, hyper["lr"], hyper.get("momentum", 0.0))
        except hw.BaselineUnavailable as err:
            print(f"(C++ BLAS baseline unavailable: {err})")
    return compiled, fns


def race(fns: dict, rounds: int, budget: float) -> dict[str, float]:
    """Median CPU seconds per call of each fn, alternating round by round."""
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = time.thread_time()
        fn()
        reps[name] = max(1, int(budget / max(time.thread_time() - t0, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.thread_time()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.thread_time() - t0) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def gemm_rates(rounds: int) -> list[tuple[str, float, float]]:
    import native_harness

    nat = native_harness.load_native()
    nat.set_threads(1)
    rows = []
    for name, ta, tb, M, N, K in MLP_GEMMS:
        flops = 2.0 * M * N * K
        reps = max(1, int(0.05 * 1e11 / flops))
        seconds = statistics.median(nat.time_sgemm(ta, tb, M, N, K, reps, rounds, True))
        rows.append((f"{name} [{M}x{N}x{K}{' tA' if ta else ''}{' tB' if tb else ''}]", seconds * 1e3,
                     flops / seconds / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "gpt"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per timed block")
    parser.add_argument("--gemms", action="store_true", help="also time the MLP step's GEMM shapes alone")
    parser.add_argument("--no-step", action="store_true", help="skip the step comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.no_step:
        batch = args.batch or (8 if args.model == "gpt" else 128)
        compiled, fns = build(args.model, batch)
        compiled.set_threads(1)
        result = race(fns, args.rounds, args.budget)
        print(f"{args.model} B={batch} training step, 1 thread, CPU ms (median of {args.rounds} rounds): "
              + "  ".join(f"{k} {v * 1e3:.3f}" for k, v in result.items()) + "  "
              + "  ".join(f"{k}/nnc {v / result['nnc']:.3f}x" for k, v in result.items() if k != "nnc"))
        if args.model == "mlp":
            flops = sum(2.0 * M * N * K for _, _, _, M, N, K in MLP_GEMMS[:8])
            print(f"  GEMM work {flops / 1e9:.3f} GFLOP: nnc step at {flops / result['nnc'] / 1e9:.1f} GFLOP/s, "
                  f"eager at {flops / result['eager'] / 1e9:.1f} GFLOP/s")
    if args.gemms:
        total = 0.0
        for label, ms, rate in gemm_rates(args.rounds):
            total += ms
            print(f"  {label:45s} {ms:7.3f} ms  {rate:6.1f} GFLOP/s")
        print(f"  sum of GEMMs alone: {total:.3f} ms")


if __name__ == "__main__":
    main()
