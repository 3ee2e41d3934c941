"""What the parallelism search needs to know about a model: a chain of layers with per-layer costs.

The search never looks at a graph. It prices a model given as a sequence of ``LayerCost`` records
(one per repeated block: a transformer layer, an MLP block) plus one ``VocabCost`` for what sits
outside the chain (embedding on the first pipeline stage, head and loss on the last). Two producers
fill these records:

* ``profile.load_galvatron_profile`` reads Galvatron's measured JSON profiles as they are;
* ``from_ir.model_cost_from_graph`` fills them from a ``.nn`` model's IR: the op table's ``cost``
  rule gives FLOPs, hence ``fwd_ms_points`` through a device speed; parameter bytes give
  ``param_mb``; the block's node outputs give the activation figures;
* ``calibrate.profile_chain`` measures a torch chain model on this machine.

Units follow Galvatron: times in milliseconds, sizes in MiB ("MB"). ``param_mb`` is the fp32 size
of the layer's parameters; with Adam in mixed precision a parameter costs 16 bytes of model state
(bf16 weight and gradient, fp32 master weight and two moments), i.e. ``4 * param_mb``.

    layer = LayerCost("block", fwd_ms_points=((1, 4.6),), param_mb=768.9,
                      act_mb_per_sample={1: 272.3, 2: 176.2, 4: 128.1, 8: 104.1},
                      ckpt_act_mb_per_sample=16.0, boundary_mb_per_sample=16.0)
    model = ModelCost("gpt-6.7b", (layer,) * 32, VocabCost(...))
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nncompile.errors import InputError


def _frozen_map(mapping) -> tuple[tuple[int, float], ...]:
    return tuple(sorted((int(k), float(v)) for k, v in dict(mapping).items()))


def _per_tp(table: tuple[tuple[int, float], ...], tp: int, what: str) -> float:
    """Value of a per-TP-degree table at ``tp``; degrees not measured scale as 1/tp from the nearest."""
    exact = dict(table)
    if tp in exact:
        return exact[tp]
    if not table:
        raise InputError(f"{what}: no figures for any TP degree")
    below = [k for k, _ in table if k <= tp]
    base = max(below) if below else min(k for k, _ in table)
    return exact[base] * base / tp


@dataclass(frozen=True)
class LayerCost:
    """Cost figures of one layer of the chain (everything the cost model prices per layer).

    fwd_ms_points: ((batch, forward ms per sample at that batch), ...), at least one point; the
        forward time of ``b`` samples is ``b * per_sample(b)`` with ``per_sample`` interpolated
        linearly between points and held constant outside them. One point = time linear in batch.
    param_mb: fp32 MiB of the layer's parameters (unsharded, TP degree 1).
    act_mb_per_sample: {tp degree: MiB of activations kept for backward, per sample}.
    ckpt_act_mb_per_sample: MiB kept per sample when the layer is checkpointed (its input).
    boundary_mb_per_sample: MiB of the layer's output per sample (the tensor that crosses layer,
        stage and TP boundaries), in the training dtype.
    tp_allreduces: all-reduces of the boundary tensor per forward under TP (2 for a transformer
        layer: after attention and after the MLP); the backward has as many.
    bwd_fwd_ratio: backward time over forward time.
    flops_per_sample: forward FLOPs per sample, informational (the IR path derives time from it).
    """

    name: str
    fwd_ms_points: tuple[tuple[int, float], ...]
    param_mb: float
    act_mb_per_sample: tuple[tuple[int, float], ...]
    ckpt_act_mb_per_sample: float
    boundary_mb_per_sample: float
    tp_allreduces: int = 2
    bwd_fwd_ratio: float = 2.0
    flops_per_sample: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "fwd_ms_points", tuple(sorted((int(b), float(t)) for b, t in self.fwd_ms_points)))
        object.__setattr__(self, "act_mb_per_sample", _frozen_map(self.act_mb_per_sample))
        if not self.fwd_ms_points:
            raise InputError(f"layer {self.name}: no forward time given")
        if self.param_mb < 0 or self.ckpt_act_mb_per_sample < 0 or self.boundary_mb_per_sample < 0:
            raise InputError(f"layer {self.name}: negative size")

    @classmethod
    def from_counts(cls, name: str, flops_per_sample: float, device_tflops: float, param_bytes: float,
                    act_bytes_per_sample: dict[int, float], boundary_bytes_per_sample: float,
                    ckpt_bytes_per_sample: float | None = None, tp_allreduces: int = 2,
                    bwd_fwd_ratio: float = 2.0) -> "LayerCost":
        """A layer from static counts (what the IR's op-table ``cost`` rules give): forward FLOPs per
        sample at ``device_tflops`` sustained, fp32 parameter bytes, kept activation bytes per sample
        by TP degree, and the bytes of the layer's output per sample."""
        if device_tflops <= 0 or flops_per_sample < 0:
            raise InputError(f"layer {name}: FLOPs must be non-negative and device TFLOP/s positive")
        ms_per_sample = flops_per_sample / (device_tflops * 1e12) * 1e3
        mb = 2.0**20
        return cls(name, ((1, ms_per_sample),), param_bytes / mb,
                   {tp: b / mb for tp, b in act_bytes_per_sample.items()},
                   (ckpt_bytes_per_sample if ckpt_bytes_per_sample is not None else boundary_bytes_per_sample) / mb,
                   boundary_bytes_per_sample / mb, tp_allreduces, bwd_fwd_ratio, flops_per_sample)

    def fwd_ms(self, batch: float) -> float:
        """Forward time (ms) of ``batch`` samples on one device, without tensor parallelism."""
        return batch * _interp_per_sample(self.fwd_ms_points, batch)

    def act_mb(self, tp: int) -> float:
        """Activation MiB per sample kept for backward at TP degree ``tp`` (no checkpointing)."""
        return _per_tp(self.act_mb_per_sample, tp, f"layer {self.name} activations")


def _interp_per_sample(points: tuple[tuple[int, float], ...], batch: float) -> float:
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


@dataclass(frozen=True)
class VocabCost:
    """The layers outside the chain: embedding (first stage) and head + loss (last stage).

    Memory figures are per TP degree of the vocabulary layers ("vtp"): model states in MiB (all 16
    bytes per parameter, unsharded) and activation MiB per sample, for the whole model on one stage
    (``*_off``, no pipelining) and split over the first/last stage (``*_first``/``*_last``).
    ``fwd_ms_points_first``/``_last``: ((batch, forward ms per sample), ...) of the embedding and of
    the head + loss, interpolated as ``LayerCost.fwd_ms_points`` are (empty = free).
    """

    states_mb_off: tuple[tuple[int, float], ...]
    act_mb_off: tuple[tuple[int, float], ...]
    states_mb_first: tuple[tuple[int, float], ...]
    act_mb_first: tuple[tuple[int, float], ...]
    states_mb_last: tuple[tuple[int, float], ...]
    act_mb_last: tuple[tuple[int, float], ...]
    fwd_ms_points_first: tuple[tuple[int, float], ...] = ()
    fwd_ms_points_last: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "fwd_ms_points_first", tuple(sorted(self.fwd_ms_points_first)))
        object.__setattr__(self, "fwd_ms_points_last", tuple(sorted(self.fwd_ms_points_last)))
        for name in ("states_mb_off", "act_mb_off", "states_mb_first", "act_mb_first", "states_mb_last", "act_mb_last"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))

    def states_mb(self, where: str, vtp: int) -> float:
        """Unsharded model-state MiB of the vocabulary layers at ``where`` in (off, first, last)."""
        return _per_tp(getattr(self, f"states_mb_{where}"), vtp, f"vocabulary model states ({where})")

    def act_mb(self, where: str, vtp: int) -> float:
        return _per_tp(getattr(self, f"act_mb_{where}"), vtp, f"vocabulary activations ({where})")

    def fwd_ms(self, where: str, batch: float) -> float:
        """Forward ms of ``batch`` samples through the embedding (first) or head + loss (last)."""
        points = self.fwd_ms_points_first if where == "first" else self.fwd_ms_points_last
        return batch * _interp_per_sample(points, batch) if points else 0.0

    @property
    def param_mb_first(self) -> float:
        return self.states_mb("first", 1) / 4.0

    @property
    def param_mb_last(self) -> float:
        return self.states_mb("last", 1) / 4.0


NO_VOCAB = VocabCost({1: 0.0}, {1: 0.0}, {1: 0.0}, {1: 0.0}, {1: 0.0}, {1: 0.0})


@dataclass(frozen=True)
class ModelCost:
    """A model as the search sees it: the chain of layers, the vocabulary layers, and the precision."""

    name: str
    layers: tuple[LayerCost, ...]
    vocab: VocabCost = NO_VOCAB
    mixed_precision: bool = True
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise InputError(f"model {self.name}: no layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_grad_element(self) -> int:
        """Bytes per element of gradients and all-gathered weights on the wire."""
        return 2 if self.mixed_precision else 4
