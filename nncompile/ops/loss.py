"""Losses: cross-entropy over class indices, mean squared error. Both give a scalar."""
from __future__ import annotations

import numpy as np

from nncompile.errors import InputError, ShapeError
from nncompile.ir.types import INT_DTYPES, TensorType
from nncompile.ops.base import Cost, defop, require_float


def _reduction(op):
    def normalize(attrs):
        if attrs["reduction"] not in ("mean", "sum"):
            raise ShapeError(f"{op}: reduction must be 'mean' or 'sum', got {attrs['reduction']!r}")
        return attrs
    return normalize


def _ce_infer(logits, labels, reduction):
    require_float("cross_entropy", logits)
    if logits.rank != 2:
        raise ShapeError(f"cross_entropy: logits must be [N, C], got {logits}")
    if labels.dtype not in INT_DTYPES or labels.shape != logits.shape[:1]:
        raise ShapeError(f"cross_entropy: labels must be integer [{logits.shape[0]}], got {labels}")
    return TensorType((), logits.dtype)


def _ce_ref(logits, labels, reduction):
    n, c = logits.shape
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise InputError(f"cross_entropy: a label is out of range for {c} classes")
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = -logp[np.arange(n), labels]
    total = picked.sum(dtype=np.float64)
    return np.asarray(total / n if reduction == "mean" else total, dtype=logits.dtype)


defop("cross_entropy", inputs=("logits", "labels"), attrs={"reduction": "mean"}, infer=_ce_infer, ref=_ce_ref,
      normalize=_reduction("cross_entropy"),
      cost=lambda out, logits, labels, **a: Cost(5 * logits.numel, logits.nbytes + labels.nbytes, out.nbytes),
      family="loss", doc="softmax cross-entropy of logits[N, C] against class indices labels[N]")


def _mse_infer(pred, target, reduction):
    require_float("mse_loss", pred, target)
    if pred.shape != target.shape or pred.dtype != target.dtype:
        raise ShapeError(f"mse_loss: prediction {pred} and target {target} differ")
    return TensorType((), pred.dtype)


def _mse_ref(pred, target, reduction):
    sq = ((pred.astype(np.float64) - target) ** 2).sum()
    return np.asarray(sq / max(pred.size, 1) if reduction == "mean" else sq, dtype=pred.dtype)


defop("mse_loss", inputs=("pred", "target"), attrs={"reduction": "mean"}, infer=_mse_infer, ref=_mse_ref,
      normalize=_reduction("mse_loss"),
      cost=lambda out, pred, target, **a: Cost(3 * pred.numel, pred.nbytes + target.nbytes, out.nbytes),
      family="loss", doc="mean (or sum) of squared differences")
