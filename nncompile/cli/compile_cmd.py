"""``nncompile MODEL.nn -o build/``: compile a model to a native module in a build directory."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nncompile.cli.common import Progress, print_json
from nncompile.errors import InputError


def parse_sets(items: list[str]) -> dict[str, int]:
    found = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--set expects NAME=VALUE, got '{item}'")
        try:
            found[name.strip()] = int(value)
        except ValueError:
            raise InputError(f"--set {name}: '{value}' is not an integer") from None
    return found


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .nn file to compile")
    parser.add_argument("-o", "--out", default="build", help="build directory (default: build/)")
    parser.add_argument("--train", action="store_true", help="compile the training step (forward + backward + update)")
    parser.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="code generation target")
    parser.add_argument("--cuda-arch", default=None, metavar="SM",
                        help="GPU architecture for --target cuda (sm_80, sm_90; default: the visible GPU, else sm_80)")
    parser.add_argument("--memory-budget", default=None, help="with --train: bytes (8000000, 8MB) or a fraction (60%%, 0.6) of the no-recompute training arena")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="bind a named dimension")
    parser.add_argument("--threads", type=int, default=None, help="threads the module uses at run time")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds for each solver (default 5)")
    parser.add_argument("--march", default="x86-64-v3", help="g++ -march value ('native' on request)")
    parser.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                        help="print the IR after a pass (prune, fuse, schedule, plan_memory, all)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="after compiling, run N times on random inputs and report the median latency "
                             "(with --train: N training steps on one random batch, with the loss before and after)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")


def random_arrays(types, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal floats; integers in [0, 2) (valid token ids and class labels for any model)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for t in types:
        if t.dtype.startswith("i"):
            arrays.append(rng.integers(0, 2, t.shape).astype(np.dtype("int64" if t.dtype == "i64" else "int32")))
        else:
            arrays.append(rng.standard_normal(t.shape).astype(np.float32))
    return arrays


def random_inputs(model, seed: int = 0) -> list[np.ndarray]:
    return random_arrays(model.input_types, seed)


def run(args) -> int:
    from nncompile.codegen.build import BuildOptions
    from nncompile.driver import CompileOptions, compile_graph
    from nncompile.frontend.dsl import parse
    from nncompile.passes.pipeline import PipelineOptions
    from nncompile.passes.plan_memory import MemoryOptions

    path = Path(args.model)
    if not path.exists():
        raise InputError(f"{args.model}: no such file")
    if args.memory_budget is not None and not args.train:
        raise InputError("--memory-budget bounds the training step's arena: it needs --train")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    progress = Progress(f"nncompile {path.name}")
    start = time.perf_counter()
    progress.update("parsing")
    graph = parse(path, set=parse_sets(args.set))
    options = CompileOptions(
        target=args.target, build=BuildOptions(march=args.march), threads=args.threads, cuda_arch=args.cuda_arch,
        pipeline=PipelineOptions(memory=MemoryOptions(time_limit=args.time_limit),
                                 print_ir_after=tuple(args.print_ir_after)),
        memory_budget=args.memory_budget)
    train = None
    if args.train:
        from nncompile.driver import TrainOptions

        if graph.train is None:
            raise InputError(f"{path}: --train needs a 'train {{ ... }}' section in model '{graph.name}' "
                             "(a loss and an optimizer; see docs/language.md)")
        train = TrainOptions.from_graph(graph)
    model = compile_graph(graph, options, out_dir=args.out, progress=progress.update, train=train)
    progress.done("compiled")
    seconds = time.perf_counter() - start
    figures = model.manifest["figures"]
    memory = figures.get("plan_memory", {})
    summary = {
        "model": graph.name, "out_dir": str(args.out), "target": args.target,
        "inputs": {n: str(t) for n, t in zip(model.input_names, model.input_types)},
        "outputs": {n: str(t) for n, t in zip(model.output_names, model.output_types)},
        "params": graph.num_params(), "param_bytes": model.manifest["param_bytes"],
        "arena_bytes": model.manifest["arena_bytes"], "arena_lower_bound": memory.get("lower_bound"),
        "fused_groups": figures.get("fuse", {}).get("groups"), "cache_hit": model.manifest["timings"]["cache_hit"],
        "seconds": round(seconds, 3),
    }
    print(f"compiled {graph.name} -> {args.out}/ in {seconds:.2f} s"
          f"{' (cache hit)' if summary['cache_hit'] else ''}")
    print(f"  inputs:  {', '.join(f'{k}: {v}' for k, v in summary['inputs'].items())}")
    print(f"  outputs: {', '.join(f'{k}: {v}' for k, v in summary['outputs'].items())}")
    packed = model.manifest.get("packed_values")
    if packed:
        summary["packed_values_bytes"] = packed["end"] - packed["flag_offset"]
    print(f"  params:  {summary['params']:,} ({summary['param_bytes']:,} bytes"
          + (f", of which {summary['packed_values_bytes']:,} hold sparse weights' packed values)" if packed else ")"))
    print(f"  arena:   {summary['arena_bytes']:,} bytes (lower bound {summary['arena_lower_bound']:,}); "
          f"{summary['fused_groups']} fused groups")
    choices = [d for d in model.plan.get("sparse", []) if "role" not in d]
    if choices:
        summary["sparse"] = [{k: d.get(k) for k in ("weight", "kernel", "form", "why")} for d in choices]
        for d in choices:
            form = f" ({d['form']})" if d["kernel"] == "sparse" and d.get("form") else ""
            print(f"  sparse:  {d['weight']}: {d['kernel']} kernel{form} - {d['why']}")
    if train is not None:
        spec = model.manifest["train"]
        train_memory = (model.plan.get("train") or {}).get("memory", {})
        summary["train"] = {"loss": spec["loss"], "optimizer": spec["optimizer"]["name"],
                            "hyper": spec["optimizer"]["hyper"], "inputs": [i[0] for i in model._trainer.inputs],
                            "arena_bytes": spec["arena_bytes"], "arena_lower_bound": train_memory.get("lower_bound"),
                            "trainable_bytes": spec["trainable_bytes"]}
        hyper = ", ".join(f"{k}={v}" for k, v in spec["optimizer"]["hyper"].items())
        print(f"  train:   loss '{spec['loss']}', {spec['optimizer']['name']}({hyper}); "
              f"arena {spec['arena_bytes']:,} bytes (lower bound {train_memory.get('lower_bound', 0):,})")
        recompute = spec["figures"].get("recompute")
        if recompute is not None:
            summary["train"]["recompute"] = recompute
            print(f"  recompute: budget {recompute['budget_bytes']:,} bytes, planned arena {recompute['arena_bytes']:,} "
                  f"(no recompute {recompute['no_recompute_arena_bytes']:,}); {recompute['recomputed_nodes']} nodes "
                  f"recomputed, +{recompute['added_flops']:,} FLOPs ({recompute['flops_overhead']:.1%})")
    if args.benchmark and train is not None:
        batch = random_arrays([t for _, t in model._trainer.inputs])
        losses, times = [], []
        for _ in range(args.benchmark):
            t0 = time.perf_counter()
            losses.append(model.train_step(*batch))
            times.append(time.perf_counter() - t0)
        summary["median_train_step_ms"] = round(float(np.median(times)) * 1e3, 4)
        summary["loss_first"], summary["loss_last"] = losses[0], losses[-1]
        print(f"  train step: {summary['median_train_step_ms']} ms median over {args.benchmark} steps; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} on one random batch")
    elif args.benchmark:
        inputs = random_inputs(model)
        model(*inputs)
        times = []
        for _ in range(args.benchmark):
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
        summary["median_latency_ms"] = round(float(np.median(times)) * 1e3, 4)
        print(f"  latency: {summary['median_latency_ms']} ms median over {args.benchmark} runs")
    if args.json:
        print_json(summary)
    return 0
