"""``nncompile parallel``: search a hybrid-parallel plan, or price an existing one.

    nncompile parallel --profile DIR [--model-config FILE|NAME] --cluster CLUSTER.json|NAME
                       [--global-bsz N] [--memory MB] [-o PLAN.json] [--json]
    nncompile parallel --profile DIR --cluster C --evaluate galvatron_config_X.json [--json]
    nncompile parallel MODEL.nn [--set NAME=VALUE] [--tflops T] --cluster C [...]   (costs from the IR)

Prints a per-layer table of the plan; ``-o`` writes the plan in Galvatron's format plus our
predictions; ``--json`` ends the output with one line of figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nncompile.cli.common import Progress, print_json
from nncompile.errors import InputError, UnsupportedError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a .nn model with a repeated block (per-layer costs from the IR)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="bind or override a named dimension of the .nn model (repeatable)")
    parser.add_argument("--tflops", type=float, default=100.0, metavar="T",
                        help="sustained TFLOP/s of one device, for a .nn model's compute times (default 100)")
    parser.add_argument("--profile", metavar="DIR", help="folder of Galvatron profile JSON files")
    parser.add_argument("--model-config", metavar="FILE|NAME",
                        help="model shape (gpt-1.5b.json, or a name found in the profile folder or built in); "
                             "default: the profile folder's name")
    parser.add_argument("--cluster", required=True, metavar="CLUSTER.json|NAME",
                        help="cluster file, or a shipped one: 2x8-40gb, 1x8-36gb, cpu4-gloo")
    parser.add_argument("--global-bsz", type=int, metavar="N", help="global batch size (default: search it)")
    parser.add_argument("--memory", type=float, metavar="MB", help="device memory budget (default: the cluster's)")
    parser.add_argument("--pp", metavar="DEGREES", help="comma-separated pipeline degrees to consider")
    parser.add_argument("--chunks", metavar="COUNTS", help="comma-separated micro-batch counts to consider")
    parser.add_argument("--dp-type", choices=("zero2", "ddp"), default="zero2",
                        help="what non-sharded data parallelism keeps per device (default zero2, as Galvatron)")
    parser.add_argument("--mem-unit", type=float, metavar="MB", help="memory granularity of the DP (default budget/1024)")
    parser.add_argument("--no-prune", action="store_true", help="search every runnable strategy (slower)")
    parser.add_argument("--evaluate", metavar="PLAN.json", help="price this plan instead of searching")
    parser.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan here")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise InputError(f"{flag}: expected positive integers, got '{text}'")
    return values


def _load_model(args):
    from nncompile.parallel.profile import BUILTIN_CONFIGS, load_galvatron_profile

    if args.model is not None:
        if args.profile:
            raise InputError("give either a model file or --profile, not both")
        path = Path(args.model)
        if not path.exists():
            raise InputError(f"model file {path} does not exist")
        if path.suffix != ".nn":
            raise UnsupportedError(f"{path}: give a .nn model (torch models: calibrate.profile_chain from Python)")
        if args.tflops <= 0:
            raise InputError(f"--tflops must be positive, got {args.tflops}")
        from nncompile.cli.check_cmd import parse_settings
        from nncompile.frontend.dsl import parse
        from nncompile.parallel.from_ir import model_cost_from_graph

        return model_cost_from_graph(parse(str(path), set=parse_settings(args.set)), args.tflops)
    if not args.profile:
        raise InputError("nothing to plan: give a model file or --profile DIR")
    config = args.model_config
    if config is None:
        folder = Path(args.profile).resolve().name
        if (Path(args.profile) / f"{folder}.json").exists() or folder in BUILTIN_CONFIGS:
            config = folder
        else:
            raise InputError(f"--model-config is needed: the profile folder '{folder}' names no known model")
    return load_galvatron_profile(args.profile, config)


def run(args) -> int:
    from nncompile.parallel.cluster import load_cluster
    from nncompile.parallel.cost import CostModel
    from nncompile.parallel.plan import plan_from_json, plan_table, plan_to_json
    from nncompile.parallel.profile import read_json
    from nncompile.parallel.search import SearchOptions, search

    if args.global_bsz is not None and args.global_bsz < 1:
        raise InputError(f"--global-bsz must be positive, got {args.global_bsz}")
    if args.memory is not None and args.memory <= 0:
        raise InputError(f"--memory must be positive, got {args.memory}")
    if args.mem_unit is not None and args.mem_unit <= 0:
        raise InputError(f"--mem-unit must be positive, got {args.mem_unit}")
    model = _load_model(args)
    cluster = load_cluster(args.cluster)
    if args.memory:
        cluster = cluster.with_memory(args.memory)
    pp_degrees, chunks = _ints(args.pp, "--pp"), _ints(args.chunks, "--chunks")
    for pp in pp_degrees or ():
        if cluster.num_devices % pp or pp > model.num_layers:
            raise InputError(f"--pp {pp}: must divide the {cluster.num_devices} devices and not exceed "
                             f"the {model.num_layers} layers")
    for m in chunks or ():
        if args.global_bsz is not None and args.global_bsz % m:
            raise InputError(f"--chunks {m}: does not divide the global batch size {args.global_bsz}")
    cost_model = CostModel(model, cluster)
    figures = {"model": model.name, "cluster": cluster.name, "devices": cluster.num_devices}

    if args.evaluate:
        plan = plan_from_json(read_json(Path(args.evaluate), "plan"), cluster.num_devices, model.num_layers)
        cost = cost_model.evaluate(plan)
        figures["mode"] = "evaluate"
        seconds = 0.0
    else:
        options = SearchOptions(
            global_bsz=args.global_bsz, pp_degrees=pp_degrees, chunks=chunks,
            prune=not args.no_prune, mem_unit_mb=args.mem_unit, dp_kind=args.dp_type)
        progress = Progress("nncompile parallel")
        progress.update(f"searching {model.name} on {cluster.num_devices} devices")
        result = search(model, cluster, options)
        progress.done(f"searched in {result.seconds:.2f} s")
        plan, cost, seconds = result.plan, result.cost, result.seconds
        figures["mode"] = "search"
        figures["search_seconds"] = round(seconds, 3)
        figures.update({k: v for k, v in result.stats.items() if isinstance(v, (int, float))})

    print(plan_table(plan, cost_model))
    if args.output:
        import json
        Path(args.output).write_text(json.dumps(plan_to_json(plan, cost), indent=2) + "\n")
        print(f"wrote {args.output}")
    s = plan.setting
    figures.update({
        "pp_deg": s.pp_deg, "global_bsz": s.global_bsz, "chunks": s.chunks, "vtp": s.vtp,
        "step_time_ms": round(cost.step_ms, 4), "throughput_samples_per_s": round(cost.throughput, 4),
        "max_memory_mb": round(cost.max_memory_mb, 2), "memory_limit_mb": cluster.memory_mb, "fits": cost.fits,
    })
    if args.json:
        print_json(figures)
    return 0
