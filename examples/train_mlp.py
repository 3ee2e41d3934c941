"""Train examples/mlp.nn on a synthetic 10-class problem with the compiled training step.

    python examples/train_mlp.py [--epochs 3] [--samples 8192]

The data: 784-dim points around 10 random class centres (a Gaussian mixture), split into train and
held-out sets. Every step (forward, backward, SGD-with-momentum update) runs in the generated C++;
inference (`model(x)`) uses the same weights.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import nncompile as nnc

HERE = Path(__file__).resolve().parent


def synthetic_digits(samples: int, seed: int = 0, noise: float = 6.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, 784)).astype(np.float32)
    labels = rng.integers(0, 10, samples)
    x = (centres[labels] + rng.standard_normal((samples, 784)).astype(np.float32) * noise) / noise  # unit scale
    return x.astype(np.float32), labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    graph = nnc.parse(HERE / "mlp.nn", set={"B": args.batch})
    model = nnc.compile(graph, train=True, optimizer=("sgd", {"lr": 0.05, "momentum": 0.9}))
    x, y = synthetic_digits(args.samples)
    split = args.samples * 7 // 8
    batches = split // args.batch

    def accuracy() -> float:
        hits = total = 0
        for i in range(split, args.samples - args.batch + 1, args.batch):
            hits += int((model(x[i:i + args.batch]).argmax(1) == y[i:i + args.batch]).sum())
            total += args.batch
        return hits / max(total, 1)

    print(f"held-out accuracy before training: {accuracy():.3f}")
    for epoch in range(args.epochs):
        start, losses = time.perf_counter(), []
        for b in range(batches):
            s = slice(b * args.batch, (b + 1) * args.batch)
            losses.append(model.train_step(x[s], y[s]))
            if epoch == 0 and b in (0, 1, 2, 5, 10, 20, 50):
                print(f"  step {b:3d}: loss {losses[-1]:.4f}")
        ms = (time.perf_counter() - start) / batches * 1e3
        print(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4f}, held-out accuracy {accuracy():.3f} "
              f"({ms:.2f} ms per step)")


if __name__ == "__main__":
    main()
