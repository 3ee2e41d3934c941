"""Timing of a compiled locally connected layer: nncompile's sparse kernel vs its dense GEMM vs torch.

    python bench/local_layers.py [--size 28] [--channels 8] [--out 16] [--kernel 3] [--batches 1,64] [--rounds 7]

The layer is ``LocallyConnected2d(x, out, kernel)`` on x [B, channels, size, size], i.e. a ``linear``
with a ``local`` window pattern. It is compiled three times: the sparse kernel forced
(``NNC_SPARSE_KERNEL=sparse``), the dense GEMM forced, and the default chooser (its pick is printed).
torch runs the layer the usual way (``F.unfold`` + one weight matrix per output position, ``einsum``) and
as a dense ``F.linear`` on the masked weight. One thread; CPU time of the calling thread
(``time.thread_time``), medians over interleaved rounds. Every output is checked against the sparse one.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import nncompile as nnc
from nncompile.codegen import cpp_sparse

SOURCE = """
model lc {{
    input x: f32[{batch}, {channels}, {size}, {size}]
    y = LocallyConnected2d(x, {out}, {kernel}, bias=false)
    output y
}}
"""


def compile_with(kernel: str, source: str, build_dir: str):
    os.environ["NNC_SPARSE_KERNEL"] = kernel
    try:
        graph = nnc.parse_text(source)
        start = time.perf_counter()
        model = nnc.compile(graph, out_dir=os.path.join(build_dir, kernel), threads=1)
        seconds = time.perf_counter() - start
    finally:
        del os.environ["NNC_SPARSE_KERNEL"]
    return graph, model, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--out", type=int, default=16)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for batch in [int(b) for b in args.batches.split(",")]:
        source = SOURCE.format(batch=batch, channels=args.channels, size=args.size, out=args.out, kernel=args.kernel)
        with tempfile.TemporaryDirectory() as build_dir:
            models = {}
            for kernel in ("sparse", "dense", "auto"):
                graph, model, seconds = compile_with(kernel, source, build_dir)
                models[kernel] = model
                pick = cpp_sparse.DECISIONS[model.manifest["module_name"]][0]
                print(f"batch {batch}: compiled '{kernel}' in {seconds:.1f} s -> {pick['kernel']} ({pick['why']})")
            weight_type = graph.type_of("y.weight")
            mask = weight_type.sparsity.mask(weight_type.shape)
            weight = np.array(models["sparse"].parameters()["y.weight"])
            for model in models.values():
                model.set_threads(1)
            x = np.random.default_rng(0).standard_normal(graph.type_of("x").shape).astype(np.float32)
            # torch: per-position weights [P_out, out, C * k * k] gathered from W for the unfold formulation
            out_size = graph.type_of("y").shape[2:]
            rows = np.arange(weight_type.shape[0]).reshape(args.out, -1)                # [out, P_out]
            cols = np.stack([np.flatnonzero(mask[r]) for r in rows[0]])                # [P_out, C * k * k] (no padding)
            local = torch.from_numpy(weight[rows.T[:, :, None], cols[:, None, :]].copy())
            tx, tw = torch.from_numpy(x), torch.from_numpy(weight)

            def unfold_einsum():
                columns = F.unfold(tx, args.kernel)
                return torch.einsum("bjq,qoj->boq", columns, local).reshape(batch, args.out, *out_size)

            runners = {f"nnc {k}": (lambda m=m: m(x)) for k, m in models.items()}
            runners["torch unfold+einsum"] = lambda: unfold_einsum().numpy()
            runners["torch dense F.linear"] = lambda: F.linear(tx.reshape(batch, -1), tw).numpy()
            ref = models["sparse"](x).reshape(batch, -1)
            for name, fn in runners.items():
                np.testing.assert_allclose(np.asarray(fn()).reshape(batch, -1), ref, rtol=1e-3, atol=1e-3, err_msg=name)
            samples = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    start = time.thread_time()
                    fn()
                    samples[name].append(time.thread_time() - start)
            base = float(np.median(samples["nnc sparse"]))
            print(f"batch {batch}: W {list(weight_type.shape)}, {int(mask.sum())} nonzeros "
                  f"({100 * mask.mean():.2f}%), medians of {args.rounds} rounds, 1 thread")
            for name, values in samples.items():
                median = float(np.median(values))
                print(f"  {name:22s} {median * 1e3:9.3f} ms   {median / base:6.2f}x the sparse kernel's time")


if __name__ == "__main__":
    main()
