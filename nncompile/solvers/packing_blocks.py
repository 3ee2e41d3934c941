"""Bi-level planning for repeated blocks (MEMO, SIGMOD 2025).

A training step of an L-layer model repeats the same layer L times forward and L times backward.
Instead of one flat problem with every buffer, plan one instance of each block kind (its buffers
with lifetimes relative to the block start), reuse that layout (relative offsets) for every
identical instance, then plan at block granularity: each block instance becomes one rectangle, a
"super-buffer" alive over the block's span with the block's arena as its size, planned together
with the buffers outside any block (e.g. activations saved for the backward pass). A buffer in a
block instance ends at ``super_offset + relative_offset``.

The top level sees a few dozen rectangles instead of thousands of buffers, so the plan is fast;
it loses only what a block wastes by reserving its whole arena over its whole span.

Example::

    groups = {buffer_id: ("layer_fwd", layer_index), ...}   # buffers outside any block: absent
    placement = plan_with_blocks(buffers, groups, alignment=64)
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from nncompile.errors import SolverError
from nncompile.solvers import packing_greedy
from nncompile.solvers.packing import Buffer, Placement, Problem, max_live_bytes, plan_problem


def _signature(buffers: Sequence[Buffer], origin: int) -> list[tuple[int, int, int, int]]:
    return sorted((b.start - origin, b.end - origin, b.size, b.align) for b in buffers)


def _canonical(buffers: Sequence[Buffer], origin: int) -> list[Buffer]:
    """The instance's buffers sorted by their relative signature (so instances match up)."""
    return sorted(buffers, key=lambda b: (b.start - origin, b.end - origin, b.size, b.align, str(b.id)))


def plan_with_blocks(buffers: Sequence[Buffer], groups: Mapping[Hashable, tuple[Hashable, Hashable]], *,
                     method: str = "auto", time_limit: float = 10.0, alignment: int | None = 64,
                     progress: Callable[[str], None] | None = None, greedy_shortcut: bool = True) -> Placement:
    """Plan ``buffers`` where ``groups[id] = (block_kind, instance)`` marks the buffers of block
    instances; every instance of a kind must repeat the first one up to a shift in time.

    Returns a ``Placement`` for all buffers; ``details`` holds each kind's block arena and the
    top-level figures (``blocks``, ``top_buffers``, ``block_seconds``, ``top_seconds``).
    """
    started = time.perf_counter()
    deadline = started + time_limit
    if alignment is not None:
        buffers = [Buffer(b.id, b.start, b.end, b.size, max(b.align, alignment)) for b in buffers]
    by_id = {b.id: b for b in buffers}
    if len(by_id) != len(buffers):
        raise SolverError("memory plan: duplicate buffer ids")
    instances: dict[Hashable, dict[Hashable, list[Buffer]]] = defaultdict(lambda: defaultdict(list))
    rest = []
    for b in buffers:
        if b.id in groups:
            kind, instance = groups[b.id]
            instances[kind][instance].append(b)
        else:
            rest.append(b)
    unknown = set(groups) - set(by_id)
    if unknown:
        raise SolverError(f"memory plan: block groups name unknown buffers {sorted(map(str, unknown))[:5]}")

    offsets: dict = {}
    top_buffers: list[Buffer] = list(rest)
    members: dict[Hashable, tuple[list[Buffer], list[int]]] = {}
    block_arenas: dict = {}
    kinds = list(instances)
    block_seconds = 0.0
    for k, kind in enumerate(kinds):
        group = instances[kind]
        names = list(group)
        first = group[names[0]]
        origin = min(b.start for b in first)
        reference = _signature(first, origin)
        for name in names[1:]:
            other_origin = min(b.start for b in group[name])
            if _signature(group[name], other_origin) != reference:
                raise SolverError(f"memory plan: block {kind!r} instance {name!r} differs from instance "
                                  f"{names[0]!r} (lifetimes or sizes)")
        # plan the block once, with lifetimes relative to its start
        layout = _canonical(first, origin)
        relative = [Buffer(i, b.start - origin, b.end - origin, b.size, b.align) for i, b in enumerate(layout)]
        share = max(deadline - time.perf_counter(), 0.0) / (2 * (len(kinds) - k))
        t0 = time.perf_counter()
        block = plan_problem(Problem.from_buffers(relative), method=method, time_limit=share, progress=progress,
                             greedy_shortcut=greedy_shortcut)
        block_seconds += time.perf_counter() - t0
        rel_offsets = [block.offsets[i] for i in range(len(relative))]
        block_align = math.lcm(*(b.align for b in relative))
        block_arenas[kind] = {"arena": block.arena, "lower_bound": block.lower_bound, "status": block.status,
                              "buffers": len(relative), "instances": len(names)}
        span = max(b.end for b in relative)
        for name in names:
            inst_origin = min(b.start for b in group[name])
            key = ("__block__", kind, name)
            top_buffers.append(Buffer(key, inst_origin, inst_origin + span, block.arena, block_align))
            members[key] = (_canonical(group[name], inst_origin), rel_offsets)

    t0 = time.perf_counter()
    top = plan_problem(Problem.from_buffers(top_buffers), method=method,
                       time_limit=max(deadline - time.perf_counter(), 0.0), progress=progress,
                       greedy_shortcut=greedy_shortcut)
    top_seconds = time.perf_counter() - t0
    for b in rest:
        offsets[b.id] = top.offsets[b.id]
    for key, (bufs, rel_offsets) in members.items():
        base = top.offsets[key]
        for b, rel in zip(bufs, rel_offsets):
            offsets[b.id] = base + rel
    refined = _refine_rest(buffers, rest, offsets)
    bound = max_live_bytes([b.start for b in buffers], [b.end for b in buffers], [b.size for b in buffers])
    arena = max((offsets[b.id] + b.size for b in buffers), default=0)
    status = "optimal" if arena <= bound else "feasible"
    details = {"blocks": block_arenas, "top_buffers": len(top_buffers), "top_status": top.status,
               "top_arena": top.arena, "refined_arena": refined, "block_seconds": block_seconds, "top_seconds": top_seconds}
    return Placement(offsets, arena, bound, status, (arena - bound) / arena if arena else 0.0,
                     time.perf_counter() - started, "blocks", details)


def _refine_rest(buffers: Sequence[Buffer], rest: Sequence[Buffer], offsets: dict) -> int | None:
    """Re-place the buffers outside blocks around the blocks' real buffers (not their rectangles),
    so they may use space a block reserves but does not touch at that time. Updates ``offsets``
    in place when that lowers the arena; returns the new arena (None if nothing improved)."""
    if not rest:
        return None
    problem = Problem.from_buffers(buffers)
    position = {bid: i for i, bid in enumerate(problem.ids)}
    current = np.array([offsets[bid] for bid in problem.ids], dtype=np.int64)
    fixed = current.copy()
    rest_index = np.array([position[b.id] for b in rest], dtype=np.int64)
    fixed[rest_index] = -1
    arena = int((current + problem.size).max())
    result = packing_greedy.greedy_offsets(problem, fixed_offsets=fixed, index=rest_index, bound=0)
    if result.arena >= arena:
        return None
    for i in rest_index:
        offsets[problem.ids[i]] = int(result.offsets[i])
    return result.arena


def transformer_trace(layers: int = 12, *, hidden: int = 768, seq: int = 512, batch: int = 8,
                      heads: int = 12, dtype_bytes: int = 4, workspaces: int = 12,
                      seed: int = 0) -> tuple[list[Buffer], dict]:
    """A synthetic training-step trace shaped like a transformer: per layer, a forward block of
    temporaries, activations saved for backward (outside the blocks), a backward block, and
    weight gradients that live until the optimizer step. Each block also has ``workspaces``
    kernel workspaces of irregular sizes and lifetimes (the same in every layer, drawn from
    ``seed``), which make the flat problem hard for greedy packing. Returns (buffers, groups)."""
    tokens = batch * seq
    act = tokens * hidden * dtype_bytes
    scores = batch * heads * seq * seq * dtype_bytes
    mlp = 4 * act
    weight = hidden * hidden * dtype_bytes
    # (name, start, end, size) relative to the block start
    forward = [("ln", 0, 2, act), ("qkv", 1, 4, 3 * act), ("scores", 3, 5, scores), ("probs", 4, 6, scores),
               ("ctx", 5, 7, act), ("proj", 6, 8, act), ("ln2", 7, 9, act), ("h", 8, 10, mlp),
               ("gelu", 9, 11, mlp), ("out", 10, 12, act)]
    backward = [("d_out", 0, 3, act), ("d_gelu", 1, 4, mlp), ("d_h", 2, 5, mlp), ("d_ln2", 4, 6, act),
                ("d_proj", 5, 8, act), ("d_ctx", 6, 9, act), ("d_probs", 7, 10, scores),
                ("d_scores", 8, 11, scores), ("d_qkv", 10, 13, 3 * act), ("d_ln", 12, 14, act)]
    rng = np.random.default_rng(seed)
    for kind, block_len in ((forward, 12), (backward, 14)):
        for w in range(workspaces):
            s = int(rng.integers(0, block_len - 1))
            e = int(rng.integers(s + 1, min(s + 4, block_len) + 1))
            kind.append((f"{'f' if block_len == 12 else 'b'}ws{w}", s, e, int(rng.integers(1, 64)) * act // 16))
    saved = [("x", act), ("qkv_s", 3 * act), ("probs_s", scores), ("h_s", mlp), ("gelu_s", mlp)]
    fwd_len, bwd_len = 12, 14
    buffers: list[Buffer] = []
    groups: dict = {}
    end_of_backward = layers * fwd_len + layers * bwd_len + 1
    for layer in range(layers):
        t0 = layer * fwd_len
        for name, s, e, size in forward:
            bid = f"L{layer}.{name}"
            buffers.append(Buffer(bid, t0 + s, t0 + e, size))
            groups[bid] = ("forward", layer)
        b0 = layers * fwd_len + (layers - 1 - layer) * bwd_len
        for name, size in saved:
            buffers.append(Buffer(f"L{layer}.{name}", t0 + 2, b0 + 6, size))
        for name, s, e, size in backward:
            bid = f"L{layer}.{name}"
            buffers.append(Buffer(bid, b0 + s, b0 + e, size))
            groups[bid] = ("backward", layer)
        buffers.append(Buffer(f"L{layer}.dW", b0 + 9, end_of_backward, 12 * weight))
    buffers.append(Buffer("loss", layers * fwd_len - 1, layers * fwd_len + 2, tokens * dtype_bytes))
    buffers.append(Buffer("optimizer_tmp", end_of_backward - 1, end_of_backward + 2, 12 * weight))
    return buffers, groups
