"""Scaled dot-product attention (torch.nn.functional.scaled_dot_product_attention semantics)."""
from __future__ import annotations

import math

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import Cost, broadcast_shapes, defop, require_float
from nncompile.ops.validate import as_bool, normalizer, optional_float


def _infer(q, k, v, causal, scale):
    require_float("sdpa", q, k, v)
    if min(q.rank, k.rank, v.rank) < 2:
        raise ShapeError(f"sdpa: q, k, v need rank >= 2, got {q}, {k}, {v}")
    if not q.dtype == k.dtype == v.dtype:
        raise ShapeError(f"sdpa: q, k, v have different dtypes ({q}, {k}, {v})")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"sdpa: q and k feature sizes differ ({q} vs {k})")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"sdpa: k and v sequence lengths differ ({k} vs {v})")
    batch = broadcast_shapes("sdpa", q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return TensorType(batch + (q.shape[-2], v.shape[-1]), q.dtype)


def _ref(q, k, v, causal, scale):
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * s
    if causal:
        length, keys = q.shape[-2], k.shape[-2]
        mask = np.tril(np.ones((length, keys), dtype=bool))
        scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.matmul(weights, v).astype(q.dtype)


def _cost(out, q, k, v, **attrs):
    length, d, keys = q.shape[-2], q.shape[-1], k.shape[-2]
    batch = out.numel // (length * v.shape[-1]) if out.numel else 0
    flops = batch * (2 * length * keys * d + 5 * length * keys + 2 * length * keys * v.shape[-1])
    return Cost(flops, q.nbytes + k.nbytes + v.nbytes, out.nbytes)


defop("sdpa", inputs=("q", "k", "v"), attrs={"causal": False, "scale": None}, infer=_infer, ref=_ref, cost=_cost,
      normalize=normalizer("sdpa", causal=as_bool, scale=optional_float),
      family="attention", doc="softmax(q k^T * scale [+ causal mask]) v; q [..., L, D], k [..., S, D], v [..., S, Dv]")
