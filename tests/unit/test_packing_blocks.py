"""Bi-level (MEMO) planning of repeated blocks against the flat plan."""
from __future__ import annotations

import time

import pytest

from nncompile.errors import SolverError
from nncompile.solvers.packing import Buffer, plan_offsets, validate
from nncompile.solvers.packing_blocks import plan_with_blocks, transformer_trace


def aligned(buffers, alignment=64):
    return [Buffer(b.id, b.start, b.end, b.size, max(b.align, alignment)) for b in buffers]


def test_transformer_blocks_reuse_one_layout_and_nearly_match_flat():
    buffers, groups = transformer_trace(12)
    started = time.perf_counter()
    bi = plan_with_blocks(buffers, groups, time_limit=10)
    bi_seconds = time.perf_counter() - started
    assert bi_seconds < 2.0
    assert validate(aligned(buffers), bi.offsets) == bi.arena
    flat = plan_offsets(buffers, time_limit=10)
    assert validate(aligned(buffers), flat.offsets) == flat.arena
    assert flat.lower_bound == bi.lower_bound <= flat.arena <= bi.arena <= 1.02 * flat.arena
    # every layer's block has the same relative layout as layer 0's
    for kind, names in (("forward", ["ln", "qkv", "scores", "fws3"]), ("backward", ["d_out", "d_qkv", "bws5"])):
        base = {n: bi.offsets[f"L0.{n}"] for n in names}
        for layer in range(1, 12):
            rel = {n: bi.offsets[f"L{layer}.{n}"] - bi.offsets[f"L{layer}.{names[0]}"] for n in names}
            assert rel == {n: base[n] - base[names[0]] for n in names}, (kind, layer)
    assert bi.details["blocks"]["forward"]["instances"] == 12
    assert bi.details["top_buffers"] < len(buffers) / 4


def test_blocks_without_outside_buffers():
    buffers = [Buffer(f"{i}.{j}", 10 * i + s, 10 * i + e, z)
               for i in range(4) for j, (s, e, z) in enumerate([(0, 3, 5), (1, 4, 7), (2, 6, 3)])]
    groups = {b.id: ("blk", b.id.split(".")[0]) for b in buffers}
    p = plan_with_blocks(buffers, groups, alignment=1)
    assert validate(buffers, p.offsets) == p.arena == 15


def test_mismatched_instances_are_rejected():
    buffers = [Buffer("a0", 0, 2, 4), Buffer("a1", 1, 3, 4), Buffer("b0", 5, 7, 4), Buffer("b1", 6, 9, 4)]
    groups = {"a0": ("L", 0), "a1": ("L", 0), "b0": ("L", 1), "b1": ("L", 1)}
    with pytest.raises(SolverError, match="differs"):
        plan_with_blocks(buffers, groups)
    with pytest.raises(SolverError, match="unknown buffers"):
        plan_with_blocks(buffers[:2], {"a0": ("L", 0), "zz": ("L", 0)})
