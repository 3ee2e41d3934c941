"""The cost model: time and memory of a hybrid-parallel training step.

Everything is priced per layer and summed per pipeline stage, so the search (a DP over layers) and
the evaluation of a finished plan use literally the same figures.

Time of a layer with strategy (tp=t, dp=d) for one micro-batch of ``b = global_bsz / chunks / d``
samples per device:

* forward ``f = fwd_ms(b) / t / compute_speed``; backward ``bwd_fwd_ratio * f``, plus ``f`` again
  when the layer is checkpointed (the recomputed forward);
* TP: ``tp_allreduces`` all-reduces of the ``b``-sample boundary tensor in the forward, as many in
  the backward, as many again in the recomputation; each ``2(t-1)/t * bytes / busbw(TP group)``;
* ZeRO-3: an all-gather of the layer's weights before every micro-batch's forward,
  ``(d-1)/d * bytes / busbw(DP group)``, not overlapped.

Once per step the gradients are synchronized over the DP group (all-reduce for DP, reduce-scatter +
all-gather for ZeRO-2, all-gather + reduce-scatter for ZeRO-3: all ``2(d-1)/d * bytes`` on the wire),
overlapped with the layer's backward of the last micro-batch: running both together slows both by
the cluster's overlap coefficient ``c``, so the pair takes ``max(C, B) + (c-1) * min(C, B)``.
Every collective and p2p message also pays the cluster's fixed ``latency_ms`` (0 unless given:
negligible for GPU-sized messages, dominant for small models on CPU ranks).
Layers whose activation layouts differ (TP degree or TP placement) pay an all-gather of the boundary
tensor in the forward and in the backward. Stages add a p2p send per neighbour and micro-batch.

Pipeline (1F1B): with ``m`` micro-batches and per-micro-batch stage times ``c_k``, the step takes
``sum_k c_k + (m-1) max_k c_k`` plus the part of the gradient synchronization the last backwards
do not hide (stage k finishes its last backward ``sum_{j<k} bwd_j`` before stage 0 does).

Memory of a device of stage k: model states (16 bytes per parameter in mixed precision, 12 of them
sharded by ZeRO-2, all by ZeRO-3; weights and, with gradient accumulation, gradients stay whole),
activations times the micro-batches in flight under 1F1B (``min(P-k, m)``), the working set of one
recomputed layer when any layer is checkpointed, embedding/head memory on the first/last stage,
and a fixed context (CUDA/NCCL workspace).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from nncompile.errors import InputError
from nncompile.parallel.cluster import Cluster
from nncompile.parallel.model import LayerCost, ModelCost
from nncompile.parallel.strategy import Strategy, group_ranks


@dataclass(frozen=True)
class Setting:
    """Choices shared by all layers of a plan."""

    pp_deg: int
    global_bsz: int
    chunks: int
    vtp: int = 1                          # TP degree of the embedding and head
    embed_sdp: bool = False               # ZeRO-3 for the embedding and head
    pipeline_type: str = "pipedream_flush"
    dp_kind: str = "zero2"                # what a non-sharded DP layer means: zero2 or ddp

    def micro_batch(self) -> float:
        return self.global_bsz / self.chunks

    def inflight(self, stage: int) -> int:
        """Micro-batches whose activations a device of ``stage`` holds at its peak."""
        if self.pp_deg == 1:
            return 1
        if self.pipeline_type == "gpipe":
            return self.chunks
        return min(self.pp_deg - stage, self.chunks)


@dataclass(frozen=True)
class LayerFigures:
    """Cost of one layer under one strategy: ms per micro-batch, ms per step, MiB per device."""

    fwd: float
    bwd: float
    comm: float          # blocking communication per micro-batch (TP all-reduces, ZeRO-3 all-gather)
    sync: float          # gradient synchronization per step
    extra: float         # the part of ``sync`` not hidden behind the layer's last backward
    states_mb: float
    act_mb: float        # kept activations per in-flight micro-batch
    transient_mb: float  # recompute working set of one micro-batch (checkpointed layers)

    @property
    def per_microbatch(self) -> float:
        return self.fwd + self.bwd + self.comm


@dataclass(frozen=True)
class StageFigures:
    """Sum over a stage: ms per micro-batch, backward ms per micro-batch, unhidden sync, MiB, and the
    computing part of ``per_microbatch`` (forward + backward, no communication)."""

    per_microbatch: float
    bwd: float
    extra: float
    memory_mb: float
    inflight: int
    compute: float = 0.0


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs: the step time, throughput and per-stage figures."""

    step_ms: float
    throughput: float            # samples per second
    stages: tuple[StageFigures, ...]
    memory_limit_mb: float

    @property
    def max_memory_mb(self) -> float:
        return max(s.memory_mb for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.max_memory_mb <= self.memory_limit_mb + 1e-6


def state_fraction(kind: str, dp: int, chunks: int, mixed_precision: bool) -> float:
    """Fraction of a layer's model states one device keeps under ``kind`` (ddp, zero2, zero3)."""
    if dp == 1 or kind == "ddp":
        return 1.0
    weight = 1 / 8 if mixed_precision else 1 / 4       # the training copy of the weights
    accumulate = chunks > 1                              # gradients stay whole between micro-batches
    if kind == "zero2":
        whole = 2 * weight if accumulate else weight
    elif kind == "zero3":
        whole = weight if accumulate else 0.0
    else:
        raise InputError(f"unknown data-parallel kind '{kind}' (want ddp, zero2 or zero3)")
    return whole + (1 - whole) / dp


def overlapped(comm: float, compute: float, coe: float) -> float:
    """Time of ``comm`` and ``compute`` run together, each slowed by ``coe`` while both run."""
    return max(comm, compute) + (coe - 1.0) * min(comm, compute)


class CostModel:
    """Prices layers, stages and whole plans of ``model`` on ``cluster``."""

    def __init__(self, model: ModelCost, cluster: Cluster):
        self.model = model
        self.cluster = cluster
        self.wire = model.bytes_per_grad_element / 4.0     # wire bytes per fp32 parameter byte
        self._layer = lru_cache(maxsize=None)(self._layer_uncached)
        self._transition = lru_cache(maxsize=None)(self._transition_uncached)

    def stage_devices(self, setting: Setting) -> int:
        devices = self.cluster.num_devices
        if setting.pp_deg < 1 or devices % setting.pp_deg:
            raise InputError(f"pp_deg {setting.pp_deg} does not divide the {devices} devices")
        return devices // setting.pp_deg

    # -- layers -------------------------------------------------------------------------------

    def layer(self, index: int, s: Strategy, setting: Setting, stage: int) -> LayerFigures:
        if setting.vtp != 1 or setting.embed_sdp or setting.pipeline_type != "pipedream_flush":
            # the embedding/head choices and the schedule do not change a layer's figures
            setting = Setting(setting.pp_deg, setting.global_bsz, setting.chunks, dp_kind=setting.dp_kind)
        return self._layer(self.model.layers[index], s, setting, stage)

    def _layer_uncached(self, layer: LayerCost, s: Strategy, setting: Setting, stage: int) -> LayerFigures:
        cluster, coe, lat = self.cluster, self.cluster.overlap_coe, self.cluster.latency_ms
        base = stage * self.stage_devices(setting)
        tp_ranks, dp_ranks = group_ranks(s, base)
        b = setting.micro_batch() / s.dp
        fwd = layer.fwd_ms(b) / s.tp / cluster.compute_speed
        bwd = layer.bwd_fwd_ratio * fwd + (fwd if s.ckpt else 0.0)
        comm = 0.0
        if s.tp > 1:
            count = layer.tp_allreduces * (3 if s.ckpt else 2)
            msg = b * layer.boundary_mb_per_sample
            comm += count * (lat + 2 * (s.tp - 1) / s.tp * msg / cluster.group_bandwidth(tp_ranks))
        grad_mb = layer.param_mb / s.tp * self.wire
        sync = 0.0
        if s.dp > 1:
            dp_bw = cluster.group_bandwidth(dp_ranks)
            sync = lat + 2 * (s.dp - 1) / s.dp * grad_mb / dp_bw
            if s.sdp:
                comm += lat + (s.dp - 1) / s.dp * grad_mb / dp_bw
        extra = overlapped(sync, bwd, coe) - bwd
        kind = "zero3" if s.sdp else setting.dp_kind
        states = 4 * layer.param_mb / s.tp * state_fraction(kind, s.dp, setting.chunks, self.model.mixed_precision)
        full_act = layer.act_mb(s.tp) * b
        act = layer.ckpt_act_mb_per_sample * b if s.ckpt else full_act
        return LayerFigures(fwd, bwd, comm, sync, extra, states, act, full_act if s.ckpt else 0.0)

    def transition(self, index: int, a: Strategy, b: Strategy, setting: Setting, stage: int) -> float:
        """ms per micro-batch (forward + backward) to re-lay the output of layer ``index`` from a to b."""
        if a.layout == b.layout:
            return 0.0
        return self._transition(self.model.layers[index], a, b, setting, stage)

    def _transition_uncached(self, layer: LayerCost, a: Strategy, b: Strategy, setting: Setting, stage: int) -> float:
        big, small = max(a.tp, b.tp), min(a.tp, b.tp)
        ratio = big // small if big != small else big
        base = stage * self.stage_devices(setting)
        bandwidth = self.cluster.group_bandwidth(tuple(range(base, base + ratio)))
        samples = setting.micro_batch() / min(a.dp, b.dp)
        return 2 * (self.cluster.latency_ms + (ratio - 1) / ratio * samples * layer.boundary_mb_per_sample / bandwidth)

    # -- stages -------------------------------------------------------------------------------

    def fixed(self, stage: int, setting: Setting) -> StageFigures:
        """Per-stage figures that do not depend on the layers' strategies: embedding/head, p2p, context."""
        cluster, vocab, coe, lat = self.cluster, self.model.vocab, self.cluster.overlap_coe, self.cluster.latency_ms
        P, devices = setting.pp_deg, self.stage_devices(setting)
        vtp = setting.vtp
        if devices % vtp:
            raise InputError(f"vtp {vtp} does not divide the {devices} devices of a stage")
        inflight = setting.inflight(stage)
        boundary = self.model.layers[0].boundary_mb_per_sample
        per_mb = bwd = sync = mem = compute = 0.0
        if P == 1:
            places, parts = ["off"], ["first", "last"]
        else:
            places = (["first"] if stage == 0 else []) + (["last"] if stage == P - 1 else [])
            parts = places
        if places:
            d_e = devices // vtp
            b_e = setting.micro_batch() / d_e
            base = stage * devices
            tp_ranks, dp_ranks = group_ranks(Strategy(vtp, d_e), base)
            kind = "zero3" if setting.embed_sdp else setting.dp_kind
            frac = state_fraction(kind, d_e, setting.chunks, self.model.mixed_precision)
            for where in places:
                mem += vocab.states_mb(where, vtp) * frac + vocab.act_mb(where, vtp) * b_e * inflight
                grad_mb = vocab.states_mb(where, vtp) / 4 * self.wire
                if d_e > 1:
                    dp_bw = cluster.group_bandwidth(dp_ranks)
                    sync += lat + 2 * (d_e - 1) / d_e * grad_mb / dp_bw
                    if setting.embed_sdp:
                        per_mb += lat + (d_e - 1) / d_e * grad_mb / dp_bw
            for part in parts:
                f = vocab.fwd_ms(part, b_e) / vtp / cluster.compute_speed
                per_mb += 3 * f
                bwd += 2 * f
                compute += 3 * f
                if vtp > 1:
                    per_mb += 2 * (lat + 2 * (vtp - 1) / vtp * b_e * boundary / cluster.group_bandwidth(tp_ranks))
        if P > 1:
            sends = (stage < P - 1) + (stage > 0)
            per_mb += sends * (lat + setting.micro_batch() / devices * boundary / cluster.p2p_bandwidth(P))
        extra = overlapped(sync, bwd, coe) - bwd
        return StageFigures(per_mb, bwd, extra, mem + cluster.context_memory_mb, inflight, compute)

    def stage(self, stage: int, first_layer: int, strategies: list[Strategy], setting: Setting) -> StageFigures:
        """Figures of one stage running layers ``first_layer ...`` with ``strategies``."""
        fixed = self.fixed(stage, setting)
        per_mb, bwd, extra, compute = fixed.per_microbatch, fixed.bwd, fixed.extra, fixed.compute
        states = act = transient = 0.0
        for offset, s in enumerate(strategies):
            index = first_layer + offset
            fig = self.layer(index, s, setting, stage)
            per_mb += fig.per_microbatch
            bwd += fig.bwd
            compute += fig.fwd + fig.bwd
            extra += fig.extra
            states += fig.states_mb
            act += fig.act_mb
            transient = max(transient, fig.transient_mb)
            if offset:
                per_mb += self.transition(index - 1, strategies[offset - 1], s, setting, stage)
        memory = fixed.memory_mb + states + act * fixed.inflight + transient
        return StageFigures(per_mb, bwd, extra, memory, fixed.inflight, compute)

    def step_ms(self, stages: list[StageFigures], chunks: int) -> float:
        """1F1B step time from the stages' figures."""
        total = sum(s.per_microbatch for s in stages)
        slowest = max(s.per_microbatch for s in stages)
        tail, finished_before = 0.0, 0.0
        for s in stages:
            tail = max(tail, s.extra - finished_before)
            finished_before += s.bwd
        return total + (chunks - 1) * slowest + tail

    def shared_cores_step_ms(self, cost: PlanCost, chunks: int) -> float:
        """Step time when the ranks share one machine's cores (CPU ranks, more ranks than cores).

        ``compute_speed`` is then the speed of a rank while every rank computes. A rank waiting in a
        pipeline bubble leaves its share of the cores to the busy ones, so the step takes the longer of
        (a) the ranks' average busy time, ``chunks * sum_k per_microbatch_k / P`` plus the unhidden
        gradient synchronization, and (b) the 1F1B critical path with each stage computing
        ``min(P, 1 / compute_speed)`` times faster (only its own ranks busy). With ``P = 1`` both
        equal ``step_ms``. The search does not use this; ``bench/suite_parallel.py`` predicts
        measured gloo runs with it.
        """
        stages = cost.stages
        P = len(stages)
        if P == 1:
            return cost.step_ms
        gain = min(float(P), 1.0 / min(self.cluster.compute_speed, 1.0))
        faster = [StageFigures(s.per_microbatch - s.compute * (1 - 1 / gain), s.bwd / gain, s.extra, s.memory_mb,
                               s.inflight, s.compute / gain) for s in stages]
        tail = self.step_ms(stages, 1) - sum(s.per_microbatch for s in stages)
        busy = chunks * sum(s.per_microbatch for s in stages) / P + tail
        return max(busy, self.step_ms(faster, chunks))

    def evaluate(self, plan) -> PlanCost:
        """Price a ``Plan`` (see ``plan.py``)."""
        setting = plan.setting
        if sum(plan.division) != self.model.num_layers or len(plan.division) != setting.pp_deg:
            raise InputError(f"plan: pp_division {list(plan.division)} does not cover {self.model.num_layers} "
                             f"layers in {setting.pp_deg} stages")
        stages, start = [], 0
        for k, count in enumerate(plan.division):
            stages.append(self.stage(k, start, list(plan.strategies[start:start + count]), setting))
            start += count
        step = self.step_ms(stages, setting.chunks)
        return PlanCost(step, setting.global_bsz / step * 1000.0, tuple(stages), self.cluster.memory_mb)
