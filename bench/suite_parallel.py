"""Hybrid-parallelism search: our plans vs Galvatron's shipped plans and uniform baselines.

Every plan is priced by the same cost model (``nncompile.parallel.cost``) on the profiles and
cluster tables Galvatron's plans were searched with (../shared/datasets/galvatron). Baselines use
one strategy for every layer (pure DP = ZeRO-2, ZeRO-3, pure TP inside a node, pure PP over all
devices), each with its best micro-batch count and checkpointing choice that fits. Also: search
time on a 64-layer model over 64 devices, and predicted vs measured step times of plans run on 4
gloo ranks (TinyGPT, cluster bandwidths measured on the spot).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GALVATRON = ROOT / ".." / "shared" / "datasets" / "galvatron"
CASES = [("gpt", "gpt-1.5b", "2x8-40gb"), ("gpt", "gpt-2.7b", "2x8-40gb"),
         ("gpt", "gpt-6.7b", "2x8-40gb"), ("llama2-7b", "llama2-7b", "1x8-36gb")]


def _best_uniform(cm, bsz, pp, tp, sdp):
    """Fastest fitting plan with one strategy on every layer (over chunks and checkpointing)."""
    from nncompile.parallel.cost import Setting
    from nncompile.parallel.plan import Plan
    from nncompile.parallel.strategy import Strategy, batch_fits

    L, N = cm.model.num_layers, cm.cluster.num_devices
    if N % pp or (N // pp) % tp or pp > L:
        return None
    devices = N // pp
    division = tuple(L // pp + (1 if k < L % pp else 0) for k in range(pp))
    best = None
    for chunks in [m for m in range(1, min(bsz, 64) + 1) if bsz % m == 0]:
        for ckpt in (False, True):
            s = Strategy(tp, devices // tp, sdp and devices // tp > 1, ckpt)
            if not batch_fits(s, bsz, chunks):
                continue
            plan = Plan(Setting(pp, bsz, chunks), division, (s,) * L)
            cost = cm.evaluate(plan)
            if cost.fits and (best is None or cost.step_ms < best[1].step_ms * (1 - 1e-9)):
                best = (plan, cost)
    return best


def _summary(plan) -> str:
    s = plan.setting
    kinds = {}
    for x in plan.strategies:
        kinds[x.label()] = kinds.get(x.label(), 0) + 1
    layers = ", ".join(f"{n}x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"pp{s.pp_deg} m={s.chunks} vtp{s.vtp}{' esdp' if s.embed_sdp else ''}: {layers}"


def _search_table(quick: bool) -> list[str]:
    from nncompile.parallel import CostModel, SearchOptions, load_cluster, load_galvatron_profile, plan_from_json, search

    lines = [
        "| model | cluster | plan | global bsz | samples/s | step ms | max MB / limit | search s | vs Galvatron |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, name, cluster_name in CASES:
        model = load_galvatron_profile(GALVATRON / folder, name)
        cluster = load_cluster(cluster_name)
        cm = CostModel(model, cluster)
        limit = f"{cluster.memory_mb:.0f}"
        theirs_at = {}
        for path in sorted(glob.glob(str(GALVATRON / folder / f"galvatron_config_{name}_*.json"))):
            plan = plan_from_json(json.loads(Path(path).read_text()), cluster.num_devices, model.num_layers)
            cost = cm.evaluate(plan)
            label = "Galvatron 3D example (hand-written)" if "_3D_" in path else "Galvatron searched plan"
            lines.append(f"| {name} | {cluster_name} | {label}: {_summary(plan)} | {plan.setting.global_bsz} | "
                         f"{cost.throughput:.2f} | {cost.step_ms:.1f} | {cost.max_memory_mb:.0f} / {limit} | - | - |")
            if "_3D_" not in path:
                theirs_at[plan.setting.global_bsz] = cost
                continue
            bsz = plan.setting.global_bsz    # the hand-written example: ours at its batch size
            result = search(model, cluster, SearchOptions(global_bsz=bsz))
            c = result.cost
            lines.append(f"| {name} | {cluster_name} | **ours** (vs the 3D example): {_summary(result.plan)} | {bsz} | "
                         f"{c.throughput:.2f} | {c.step_ms:.1f} | {c.max_memory_mb:.0f} / {limit} | "
                         f"{result.seconds:.2f} | {c.throughput / cost.throughput:.3f}x |")
        for bsz, theirs in theirs_at.items():
            result = search(model, cluster, SearchOptions(global_bsz=bsz))
            c = result.cost
            lines.append(f"| {name} | {cluster_name} | **ours**: {_summary(result.plan)} | {bsz} | {c.throughput:.2f} | "
                         f"{c.step_ms:.1f} | {c.max_memory_mb:.0f} / {limit} | {result.seconds:.2f} | "
                         f"{c.throughput / theirs.throughput:.3f}x |")
            baselines = [("pure DP (ZeRO-2)", 1, 1, False), ("ZeRO-3", 1, 1, True),
                         (f"pure TP ({cluster.devices_per_node})", 1, cluster.devices_per_node, False),
                         (f"pure PP ({cluster.num_devices})", cluster.num_devices, 1, False)]
            for label, pp, tp, sdp in baselines:
                found = _best_uniform(cm, bsz, pp, tp, sdp)
                if found is None:
                    lines.append(f"| {name} | {cluster_name} | {label} | {bsz} | does not fit | - | - | - | - |")
                    continue
                plan, cost = found
                lines.append(f"| {name} | {cluster_name} | {label}: m={plan.setting.chunks}"
                             f"{' ckpt' if plan.strategies[0].ckpt else ''} | {bsz} | {cost.throughput:.2f} | "
                             f"{cost.step_ms:.1f} | {cost.max_memory_mb:.0f} / {limit} | - | "
                             f"{cost.throughput / theirs.throughput:.3f}x |")
            if not quick:
                free = search(model, cluster, SearchOptions())
                c = free.cost
                lines.append(f"| {name} | {cluster_name} | **ours, batch size searched**: {_summary(free.plan)} | "
                             f"{free.plan.setting.global_bsz} | {c.throughput:.2f} | {c.step_ms:.1f} | "
                             f"{c.max_memory_mb:.0f} / {limit} | {free.seconds:.2f} | "
                             f"{c.throughput / theirs.throughput:.3f}x |")
    return lines


def _scaling_table() -> list[str]:
    from nncompile.parallel import SearchOptions, load_cluster, load_galvatron_profile, search

    base = load_galvatron_profile(GALVATRON / "gpt", "gpt-6.7b")
    lines = ["| layers | devices | global bsz | search s (wall) | search s (CPU) | settings solved / cut by bound "
             "| DP calls | plan |",
             "|---:|---:|---:|---:|---:|---|---:|---|"]
    for layers, nodes, bsz in [(32, 2, 64), (64, 4, 256), (64, 8, 512)]:
        model = dataclasses.replace(base, layers=base.layers[:1] * layers)
        cluster = dataclasses.replace(load_cluster("2x8-40gb"), nodes=nodes)
        result = search(model, cluster, SearchOptions(global_bsz=bsz))
        st = result.stats
        lines.append(f"| {layers} | {cluster.num_devices} | {bsz} | {result.seconds:.2f} | {st['cpu_seconds']:.2f} | "
                     f"{st.get('settings_solved', 0)} / {st.get('settings_cut_by_bound', 0)} | "
                     f"{st.get('dp_calls', 0)} | {_summary(result.plan)} |")
    return lines


def _partition_table() -> list[str]:
    """Memory-bound cases: the bi-objective partition step vs an even division of the same setting."""
    from nncompile.parallel import CostModel, SearchOptions, load_cluster, load_galvatron_profile, search
    from nncompile.parallel.search import _SettingSolver

    lines = ["| model | memory MB | global bsz | ours: samples/s (division) | same setting, even division | "
             "search without layer moves | stage memory MB |", "|---|---:|---:|---|---:|---:|---|"]
    for name, folder, cluster_name, memory, bsz in [("gpt-6.7b", "gpt", "2x8-40gb", 12000, 128),
                                                     ("gpt-2.7b", "gpt", "2x8-40gb", 8000, 128),
                                                     ("gpt-1.5b", "gpt", "2x8-40gb", 4000, 256),
                                                     ("llama2-7b", "llama2-7b", "1x8-36gb", 16000, 32)]:
        model = load_galvatron_profile(GALVATRON / folder, name)
        cluster = load_cluster(cluster_name).with_memory(memory)
        result = search(model, cluster, SearchOptions(global_bsz=bsz))
        setting, L = result.plan.setting, model.num_layers
        P = setting.pp_deg
        even = tuple(L // P + (1 if k < L % P else 0) for k in range(P))
        plan, cost = _SettingSolver(CostModel(model, cluster), setting, SearchOptions(), memory, {}).evaluate_division(even)
        flat = search(model, cluster, SearchOptions(global_bsz=bsz, partition_search=False))
        lines.append(f"| {name} | {memory} | {bsz} | {result.cost.throughput:.3f} ({', '.join(map(str, result.plan.division))}) | "
                     f"{cost.throughput if plan is not None else float('nan'):.3f} | {flat.cost.throughput:.3f} | "
                     f"{', '.join(f'{st.memory_mb:.0f}' for st in result.cost.stages)} |")
    return lines


RUN_PLANS = {
    "dp4": dict(pp=1, tp=1),
    "sdp4": dict(pp=1, tp=1, sdp=1),
    "tp2xdp2": dict(pp=1, tp=2),
    "tp4": dict(pp=1, tp=4),
    "tp2xdp2 ckpt": dict(pp=1, tp=2, ckpt=1),
    "pp2xdp2 m=2": dict(pp=2, tp=1, chunks=2),
    "pp4 m=4": dict(pp=4, tp=1, chunks=4),
    "mixed: tp2/sdp4/tp2xsdp2, ckpt on 4": dict(pp=1, tp=[2, 2, 1, 1, 2, 2, 1, 1], sdp=[0, 0, 1, 1, 1, 1, 0, 0],
                                               ckpt=[1, 0, 1, 0, 1, 0, 1, 0]),
    "pp2 m=4, tp2 / sdp2 stages": dict(pp=2, tp=[2, 2, 2, 2, 1, 1, 1, 1], sdp=[0, 0, 0, 0, 1, 1, 1, 1], chunks=4),
}


def _calibrate_then_run(rank, world, raws, model_kwargs, steps, batch, lr, out, rounds):
    """On every rank: per round and plan, measure the cluster, then train under the plan right after."""
    from nncompile.parallel.calibrate import calibrate_worker
    from nncompile.parallel.runner import plans_worker

    for r in range(rounds):
        for i, raw in enumerate(raws):
            folder = str(Path(out) / f"r{r}p{i}")
            calibrate_worker(rank, world, folder, repeats=3, matmuls=5)
            plans_worker(rank, world, [raw], model_kwargs, steps, batch, lr, folder)


def _gloo_table() -> list[str]:
    """Predicted vs measured step time of plans on 4 gloo ranks (TinyGPT).

    The machine is shared, so its speed drifts: every plan run is preceded by a calibration (compute
    speed with all ranks busy, bandwidths, latency); two rounds over all plans. Measured = each plan's
    faster round (the least disturbed); predicted with the least disturbed figures of all calibrations
    (highest speed and bandwidths, lowest latency), one cluster for every plan.
    """
    import os

    from nncompile.parallel import CostModel, plan_from_json
    from nncompile.parallel.calibrate import profile_chain
    from nncompile.parallel.cluster import cluster_from_dict
    from nncompile.parallel.runner import launch
    from nncompile.parallel.runner_model import TinyGPT

    import torch

    layers, world, rounds = 8, 4, 2
    model_kwargs = dict(vocab=512, d_model=128, n_head=4, n_layer=layers, seq=64, head_bias=False)
    batch, steps = 16, 6
    raws = []
    for spec in RUN_PLANS.values():
        per = lambda v: ",".join(str(x) for x in (v if isinstance(v, list) else [v] * layers))  # noqa: E731
        raws.append({"pp_deg": spec["pp"], "tp_sizes_enc": per(spec["tp"]), "dp_types_enc": per(spec.get("sdp", 0)),
                     "checkpoint": per(spec.get("ckpt", 0)), "global_bsz": batch, "chunks": spec.get("chunks", 1),
                     "pp_division": ",".join([str(layers // spec["pp"])] * spec["pp"])})
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        for r in range(rounds):
            for i in range(len(raws)):
                (Path(out) / f"r{r}p{i}").mkdir()
        launch(_calibrate_then_run, world, (raws, model_kwargs, steps, batch, 0.01, out, rounds))
        runs = [[(json.loads((Path(out) / f"r{r}p{i}" / "cluster.json").read_text()),
                  json.loads((Path(out) / f"r{r}p{i}" / "plan0.json").read_text())["step_ms"])
                 for r in range(rounds)] for i in range(len(raws))]
    load_after = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clusters = [cluster for tries in runs for cluster, _ in tries]
    speeds = [c["compute_speed"] for c in clusters]
    best = dict(clusters[0])
    best["compute_speed"] = max(speeds)
    best["latency_ms"] = min(c["latency_ms"] for c in clusters)
    for table in ("allreduce_bandwidth", "p2p_bandwidth"):
        best[table] = {k: max(c[table][k] for c in clusters) for k in clusters[0][table]}
    chains = {}
    predicted, shared, measured = [], [], []
    for raw, tries in zip(raws, runs):
        step_ms = min(t[1] for t in tries)
        replicas = world // raw["pp_deg"]    # the runner computes embedding and head on every rank of their stage
        if replicas not in chains:
            chains[replicas] = profile_chain(TinyGPT(**model_kwargs), batch_sizes=(1, 4, 16), replicas=replicas)
        cm = CostModel(chains[replicas], cluster_from_dict(best))
        plan_cost = cm.evaluate(plan_from_json(raw, world, layers))
        predicted.append(plan_cost.step_ms)
        shared.append(cm.shared_cores_step_ms(plan_cost, raw["chunks"]))
        measured.append(step_ms)
    torch.set_num_threads(threads)
    lines = [f"TinyGPT {model_kwargs} (examples/gpt.nn's network), global batch {batch}, float64, 1 thread per rank "
             f"on a shared 2-core machine (1-minute load average {load_before:.1f} before, {load_after:.1f} after). "
             f"Before every plan run the cluster is measured again; the {len(clusters)} measurements vary (compute speed "
             f"with all ranks busy, relative to one rank alone: {min(speeds):.2f} to {max(speeds):.2f}; latency "
             f"{min(c['latency_ms'] for c in clusters):.2f} to {max(c['latency_ms'] for c in clusters):.2f} ms), and "
             f"every plan is predicted with the least disturbed figures (speed {best['compute_speed']:.2f}, all-reduce "
             + ", ".join(f"{k[len('allreduce_size_'):]}={v:.2f}" for k, v in best["allreduce_bandwidth"].items())
             + f" GB/s, p2p {best['p2p_bandwidth']['pp_size_2']:.2f} GB/s, latency {best['latency_ms']:.2f} ms), "
             "as the measured time is each plan's least disturbed round.",
             "", "`predicted` = `CostModel.evaluate` (every rank its own device at the all-busy speed); "
             "`shared cores` = `CostModel.shared_cores_step_ms` (ranks share the machine's cores, so a rank idle in a "
             "pipeline bubble speeds up the others). Measured = mean wall time of steps 2-6 on the slowest rank; "
             f"{rounds} rounds over all plans, each plan's faster round kept.",
             "", "| plan | predicted ms | shared cores ms | measured ms |", "|---|---:|---:|---:|"]
    for name, p, q, m in zip(RUN_PLANS, predicted, shared, measured):
        lines.append(f"| {name} | {p:.1f} | {q:.1f} | {m:.1f} |")
    order = lambda v: " < ".join(n for _, n in sorted(zip(v, RUN_PLANS)))  # noqa: E731
    lines += ["", f"Spearman rank correlation with measured: predicted {_spearman(predicted, measured):.2f}, "
              f"shared cores {_spearman(shared, measured):.2f}.", "",
              f"- measured order: {order(measured)}", f"- shared-cores order: {order(shared)}"]
    return lines


def _spearman(a, b) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def run(quick: bool) -> str:
    if not GALVATRON.is_dir():
        return "## Hybrid-parallelism search\n\nSkipped: ../shared/datasets/galvatron is not present.\n"
    from nncompile.parallel import SearchOptions, load_cluster, load_galvatron_profile, search

    # load the compiled DP kernel once so search times below are steady-state
    search(load_galvatron_profile(GALVATRON / "gpt", "gpt-1.5b"), load_cluster("2x8-40gb"), SearchOptions(global_bsz=16))
    start = time.perf_counter()
    parts = ["## Hybrid-parallelism search (`nncompile parallel`)", "",
             "Same cost model for every row (Galvatron's profiles and bandwidth tables, A100-class GPUs, bf16). "
             "`vs Galvatron` = predicted throughput over that of Galvatron's searched plan at the same global batch "
             "(for the row after a 3D example: over that example's). Plans are read from Galvatron's JSON files as "
             "shipped and priced like `nncompile parallel --evaluate FILE`.",
             "", *_search_table(quick), "", "### Search time", "", *_scaling_table(),
             "", "### Pipeline partitions under tight memory", "", *_partition_table()]
    if not quick:
        parts += ["", "### Plans run on 4 gloo ranks: predicted vs measured step time", "", *_gloo_table()]
    parts += ["", f"Suite wall time {time.perf_counter() - start:.0f} s."]
    return "\n".join(parts) + "\n"
