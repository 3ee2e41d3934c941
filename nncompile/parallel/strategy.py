"""Per-layer parallel strategies and the decision tree that prunes them.

Within one pipeline stage of ``D`` devices a layer runs with tensor parallelism of degree ``tp`` and
data parallelism of degree ``dp = D / tp``; the data-parallel part is plain DP (ZeRO-2 optimizer
sharding, Galvatron's default, ``dp_type 0``) or sharded DP (ZeRO-3 / FSDP, ``dp_type 1``), never
both; TP groups are consecutive ranks (``tp_consec``) or strided; the layer may be checkpointed.

The decision tree (Galvatron-BMW, section 4.1) has the pipeline degree at the root, then the TP x DP
split of the stage, then the DP type, then checkpointing. Its pruning rules are:

1. TP never spans nodes (``tp <= cluster.tp_limit``): cross-node TP all-reduces on every layer's
   critical path are an order of magnitude slower than the alternatives.
2. With ``dp == 1`` sharded DP is plain DP (nothing to shard over): one branch is kept.
3. With ``tp == 1`` or ``dp == 1`` the placement of TP groups changes nothing: one branch is kept.
4. The micro-batch must split evenly over the DP replicas (``global_bsz / chunks / dp`` an integer).
5. Dominance: among strategies with the same layout (same TP degree and placement, hence the same
   transition costs to any neighbour) one that is no faster and no smaller than another on every
   layer of the stage is dropped (done by the search, which knows the stage's costs).

Rules 2-4 and 5 never remove an optimum; rule 1 is a heuristic that tests check against exhaustive
enumeration on small cases.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Strategy:
    """How one layer is parallelized inside its pipeline stage."""

    tp: int
    dp: int
    sdp: bool = False
    ckpt: bool = False
    tp_consec: bool = True

    @property
    def layout(self) -> tuple[int, bool]:
        """What decides how activations are laid out across the stage's devices."""
        return (self.tp, self.tp_consec if self.tp > 1 and self.dp > 1 else True)

    def label(self) -> str:
        kind = "sdp" if self.sdp else "dp"
        text = f"tp{self.tp}x{kind}{self.dp}"
        if self.tp > 1 and self.dp > 1 and not self.tp_consec:
            text += "(strided-tp)"
        return text + ("+ckpt" if self.ckpt else "")


def powers_of_two_up_to(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        if n % k == 0:
            out.append(k)
        k *= 2
    return out


def all_strategies(stage_devices: int) -> list[Strategy]:
    """Every strategy for a stage of ``stage_devices`` devices, without any pruning."""
    out = []
    for tp in powers_of_two_up_to(stage_devices):
        dp = stage_devices // tp
        for sdp in (False, True):
            for ckpt in (False, True):
                for consec in (True, False):
                    out.append(Strategy(tp, dp, sdp, ckpt, consec))
    return out


def batch_fits(strategy: Strategy, global_bsz: int, chunks: int) -> bool:
    """Rule 4: the micro-batch splits evenly over the strategy's DP replicas."""
    if global_bsz % chunks:
        return False
    micro = global_bsz // chunks
    return micro % strategy.dp == 0 and micro >= strategy.dp


def pruned_strategies(stage_devices: int, tp_limit: int, global_bsz: int, chunks: int) -> list[Strategy]:
    """The strategies left by rules 1-4 of the decision tree for one stage."""
    kept = []
    for s in all_strategies(stage_devices):
        if s.tp > tp_limit:
            continue                                    # rule 1
        if s.dp == 1 and s.sdp:
            continue                                    # rule 2
        if (s.tp == 1 or s.dp == 1) and not s.tp_consec:
            continue                                    # rule 3
        if not batch_fits(s, global_bsz, chunks):
            continue                                    # rule 4
        kept.append(s)
    return kept


def feasible_strategies(stage_devices: int, global_bsz: int, chunks: int) -> list[Strategy]:
    """All strategies that can run at all (rule 4 only): the space exhaustive search walks."""
    return [s for s in all_strategies(stage_devices) if batch_fits(s, global_bsz, chunks)]


def group_ranks(strategy: Strategy, base: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(TP group, DP group) containing the stage's first rank ``base``, as global ranks."""
    tp, dp = strategy.tp, strategy.dp
    if strategy.layout[1]:          # TP groups are consecutive ranks, DP groups strided by tp
        return tuple(base + i for i in range(tp)), tuple(base + j * tp for j in range(dp))
    return tuple(base + i * dp for i in range(tp)), tuple(base + j for j in range(dp))
