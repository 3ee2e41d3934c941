"""Normalization and softmax: batch norm, layer norm, softmax, log-softmax."""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import defop, elementwise_cost, normalize_axis, require_float
from nncompile.ops.validate import as_bool, as_float, as_int, normalizer


def _bn_infer(x, running_mean, running_var, weight, bias, eps, training):
    require_float("batch_norm", x, running_mean, running_var, weight, bias)
    if not 2 <= x.rank <= 5:
        raise ShapeError(f"batch_norm: input must have rank 2..5 with channels on axis 1, got {x}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ShapeError(f"batch_norm: {name} must be [{c}], got {t}")
    return x.dense()


def _bn_ref(x, running_mean, running_var, weight, bias, eps, training):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mean = x.mean(axis=axes, dtype=np.float64)
        var = x.var(axis=axes, dtype=np.float64)
    else:
        mean, var = running_mean, running_var
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype)


defop("batch_norm", inputs=("x", "running_mean", "running_var", "weight?", "bias?"),
      attrs={"eps": 1e-5, "training": False}, infer=_bn_infer, ref=_bn_ref, cost=elementwise_cost(4),
      normalize=normalizer("batch_norm", eps=as_float, training=as_bool),
      family="norm", doc="batch normalization over axis 1 (running statistics, or batch statistics when training)")


def _ln_infer(x, weight, bias, normalized_ndim, eps):
    require_float("layer_norm", x, weight, bias)
    if not 1 <= normalized_ndim <= x.rank:
        raise ShapeError(f"layer_norm: normalized_ndim={normalized_ndim} does not fit {x}")
    inner = x.shape[x.rank - normalized_ndim:]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != inner:
            raise ShapeError(f"layer_norm: {name} must be [{','.join(map(str, inner))}], got {t}")
    return x.dense()


def _ln_ref(x, weight, bias, normalized_ndim, eps):
    if x.size == 0:
        return x.copy()
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = x.var(axis=axes, keepdims=True, dtype=np.float64)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


defop("layer_norm", inputs=("x", "weight?", "bias?"), attrs={"normalized_ndim": 1, "eps": 1e-5},
      infer=_ln_infer, ref=_ln_ref, cost=elementwise_cost(6), family="norm",
      normalize=normalizer("layer_norm", normalized_ndim=as_int, eps=as_float),
      doc="normalize over the last normalized_ndim axes, then scale and shift")


def _softmax_infer(op):
    def infer(x, axis):
        require_float(op, x)
        normalize_axis(op, axis, x.rank)
        return x.dense()
    return infer


def _softmax_ref(x, axis):
    if x.size == 0:
        return x.copy()
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def _log_softmax_ref(x, axis):
    if x.size == 0:
        return x.copy()
    shifted = x - x.max(axis=axis, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))).astype(x.dtype)


defop("softmax", inputs=("x",), attrs={"axis": -1}, infer=_softmax_infer("softmax"), ref=_softmax_ref,
      normalize=normalizer("softmax", axis=as_int),
      cost=elementwise_cost(5), family="norm", doc="exp(x) / sum(exp(x)) along axis (numerically stable)")
defop("log_softmax", inputs=("x",), attrs={"axis": -1}, infer=_softmax_infer("log_softmax"), ref=_log_softmax_ref,
      normalize=normalizer("log_softmax", axis=as_int),
      cost=elementwise_cost(5), family="norm", doc="x - logsumexp(x) along axis (numerically stable)")
