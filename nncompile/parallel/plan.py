"""A parallel plan, its JSON form (Galvatron's ``galvatron_config_*.json`` fields) and its table.

    plan = plan_from_json(json.load(open("galvatron_config_gpt-1.5b_..._example.json")), num_devices=16)
    cost = CostModel(model, cluster).evaluate(plan)
    text = plan_table(plan, model, cost_model)

Galvatron's per-layer fields are comma-separated strings over the layers: ``tp_sizes_enc``,
``dp_types_enc`` (0 = DP/ZeRO-2, 1 = ZeRO-3), ``tp_consecutive_flags``, ``checkpoint``; plus
``pp_deg``, ``pp_division``, ``global_bsz``, ``chunks``, ``pipeline_type``, ``default_dp_type``,
and in newer plans ``vtp`` / ``embed_sdp`` for the embedding and head.
"""
from __future__ import annotations

from dataclasses import dataclass

from nncompile.errors import InputError
from nncompile.parallel.cost import CostModel, PlanCost, Setting
from nncompile.parallel.strategy import Strategy

PIPELINE_TYPES = ("pipedream_flush", "gpipe")
DP_KINDS = {"zero2": "zero2", "ddp": "ddp", "dp": "ddp", "zero3": "zero3"}


@dataclass(frozen=True)
class Plan:
    """Per-layer strategies, the pipeline division and the shared setting."""

    setting: Setting
    division: tuple[int, ...]
    strategies: tuple[Strategy, ...]

    def stage_of(self, layer: int) -> int:
        start = 0
        for k, count in enumerate(self.division):
            if layer < start + count:
                return k
            start += count
        raise IndexError(layer)


def _csv(value, name: str, count: int | None) -> list[int]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [v for v in value.split(",") if v.strip() != ""]
    elif isinstance(value, int):
        items = [value]
    else:
        raise InputError(f"plan: '{name}' must be a comma-separated string or a list")
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise InputError(f"plan: '{name}' has a non-integer entry: {value!r}") from None
    if count is not None and len(out) != count:
        raise InputError(f"plan: '{name}' has {len(out)} entries, expected {count} (one per layer)")
    return out


def plan_from_json(raw: dict, num_devices: int, num_layers: int | None = None) -> Plan:
    """Read a plan in Galvatron's format (ours adds fields; unknown ones are ignored)."""
    if not isinstance(raw, dict):
        raise InputError("plan: expected a JSON object")
    for key in ("pp_deg", "tp_sizes_enc", "global_bsz"):
        if key not in raw:
            raise InputError(f"plan: missing '{key}'")
    pp = int(raw["pp_deg"])
    if pp < 1 or num_devices % pp:
        raise InputError(f"plan: pp_deg {pp} does not divide the cluster's {num_devices} devices")
    tps = _csv(raw["tp_sizes_enc"], "tp_sizes_enc", num_layers)
    n = len(tps)
    dp_types = _csv(raw.get("dp_types_enc", [0] * n), "dp_types_enc", n)
    consec = _csv(raw.get("tp_consecutive_flags", [1] * n), "tp_consecutive_flags", n)
    ckpt = _csv(raw.get("checkpoint", [0] * n), "checkpoint", n)
    division = _csv(raw.get("pp_division", [n // pp] * pp if n % pp == 0 else []), "pp_division", None)
    if len(division) != pp or sum(division) != n or min(division) < 1:
        raise InputError(f"plan: pp_division {division} must give {pp} positive layer counts summing to {n}")
    if any(int(v) for v in _csv(raw.get("use_sp", [0] * n), "use_sp", n)):
        raise InputError("plan: sequence parallelism (use_sp) is not modelled")
    devices = num_devices // pp
    strategies = []
    for i, tp in enumerate(tps):
        if tp < 1 or devices % tp:
            raise InputError(f"plan: layer {i}: tp {tp} does not divide the {devices} devices of a stage")
        strategies.append(Strategy(tp, devices // tp, bool(dp_types[i]), bool(ckpt[i]), bool(consec[i])))
    pipeline = str(raw.get("pipeline_type", "pipedream_flush"))
    if pipeline not in PIPELINE_TYPES:
        raise InputError(f"plan: pipeline_type '{pipeline}' (want one of {', '.join(PIPELINE_TYPES)})")
    dp_kind = DP_KINDS.get(str(raw.get("default_dp_type", "zero2")))
    if dp_kind is None or dp_kind == "zero3":
        raise InputError(f"plan: default_dp_type '{raw.get('default_dp_type')}' (want zero2 or ddp)")
    bsz, chunks = int(raw["global_bsz"]), int(raw.get("chunks", 1))
    if bsz < 1 or chunks < 1:
        raise InputError("plan: global_bsz and chunks must be positive")
    vtp = int(raw.get("vtp", 1))
    if vtp < 1 or devices % vtp:
        raise InputError(f"plan: vtp {vtp} does not divide the {devices} devices of a stage")
    setting = Setting(pp, bsz, chunks, vtp, bool(int(raw.get("embed_sdp", 0))), pipeline, dp_kind)
    return Plan(setting, tuple(division), tuple(strategies))


def plan_to_json(plan: Plan, cost: PlanCost | None = None, extra: dict | None = None) -> dict:
    """Galvatron's fields (so Galvatron can run the plan) plus our predictions."""
    s = plan.setting
    join = lambda values: ",".join(str(int(v)) for v in values)  # noqa: E731
    out = {
        "pp_deg": s.pp_deg,
        "tp_sizes_enc": join(x.tp for x in plan.strategies),
        "tp_consecutive_flags": join(x.layout[1] for x in plan.strategies),
        "dp_types_enc": join(x.sdp for x in plan.strategies),
        "checkpoint": join(x.ckpt for x in plan.strategies),
        "global_bsz": s.global_bsz,
        "chunks": s.chunks,
        "pp_division": join(plan.division),
        "pipeline_type": s.pipeline_type,
        "default_dp_type": s.dp_kind,
        "vtp": s.vtp,
        "embed_sdp": int(s.embed_sdp),
    }
    if cost is not None:
        out["predicted"] = {
            "step_time_ms": round(cost.step_ms, 4),
            "throughput_samples_per_s": round(cost.throughput, 4),
            "max_memory_mb": round(cost.max_memory_mb, 2),
            "memory_limit_mb": cost.memory_limit_mb,
            "fits": cost.fits,
            "stage_memory_mb": [round(st.memory_mb, 2) for st in cost.stages],
            "stage_time_per_microbatch_ms": [round(st.per_microbatch, 4) for st in cost.stages],
        }
    if extra:
        out.update(extra)
    return out


def plan_table(plan: Plan, cost_model: CostModel) -> str:
    """A per-layer table: strategy and its time and memory figures, grouped by stage."""
    s = plan.setting
    cost = cost_model.evaluate(plan)
    lines = [
        f"pp_deg={s.pp_deg} global_bsz={s.global_bsz} chunks={s.chunks} vtp={s.vtp} "
        f"embed_sdp={int(s.embed_sdp)} pipeline={s.pipeline_type} division={list(plan.division)}",
        f"{'layer':>5} {'stage':>5}  {'strategy':<24} {'fwd+bwd ms/mb':>13} {'comm ms/mb':>10} "
        f"{'sync ms':>8} {'states MB':>9} {'act MB/mb':>9}",
    ]
    for i, strategy in enumerate(plan.strategies):
        k = plan.stage_of(i)
        fig = cost_model.layer(i, strategy, s, k)
        lines.append(f"{i:>5} {k:>5}  {strategy.label():<24} {fig.fwd + fig.bwd:>13.2f} {fig.comm:>10.2f} "
                     f"{fig.sync:>8.2f} {fig.states_mb:>9.1f} {fig.act_mb:>9.1f}")
    for k, st in enumerate(cost.stages):
        lines.append(f"stage {k}: {st.per_microbatch:.2f} ms per micro-batch, {st.inflight} in flight, "
                     f"{st.memory_mb:.0f} MB per device")
    verdict = "fits" if cost.fits else "OVER BUDGET"
    lines.append(f"step {cost.step_ms:.1f} ms, {cost.throughput:.2f} samples/s, max memory "
                 f"{cost.max_memory_mb:.0f} / {cost.memory_limit_mb:.0f} MB ({verdict})")
    return "\n".join(lines)
