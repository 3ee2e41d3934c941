"""Ops that training graphs need besides the forward ops: comparisons, constants, and the backward
pieces that are not worth composing from other ops (cross-entropy gradient, embedding scatter-add,
slice scatter, attention probabilities and the fused attention gradient)."""
from __future__ import annotations

import math

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import DTYPES, INT_DTYPES, TensorType, numpy_dtype
from nncompile.ops.base import REQUIRED, Cost, broadcast_shapes, defop, elementwise_cost, normalize_axis, require_float
from nncompile.ops.validate import as_bool, as_choice, as_float, as_int, normalizer, optional_float


def _compare_infer(op):
    def infer(a, b):
        if a.dtype != b.dtype:
            raise ShapeError(f"{op}: operands have different dtypes ({a} and {b})")
        return TensorType(broadcast_shapes(op, a.shape, b.shape), "bool")
    return infer


for _name, _fn, _doc in (("gt", np.greater, "a > b"), ("ge", np.greater_equal, "a >= b"), ("eq", np.equal, "a == b")):
    defop(_name, inputs=("a", "b"), infer=_compare_infer(_name), ref=lambda a, b, _fn=_fn: _fn(a, b),
          cost=elementwise_cost(1), family="compare", doc=f"{_doc}, elementwise with broadcasting -> bool")


def _shape_attr(op, value):
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ShapeError(f"{op}: shape must be a tuple of non-negative ints, got {value!r}")
    return value


def _full_normalize(attrs):
    attrs["shape"] = _shape_attr("full", attrs["shape"])
    attrs["value"] = as_float("full", "value", attrs["value"])
    if attrs["dtype"] not in DTYPES:
        raise ShapeError(f"full: unknown dtype {attrs['dtype']!r}")
    return attrs


defop("full", inputs=(), attrs={"shape": REQUIRED, "value": REQUIRED, "dtype": "f32"}, normalize=_full_normalize,
      infer=lambda shape, value, dtype: TensorType(shape, dtype),
      ref=lambda shape, value, dtype: np.full(shape, value, dtype=numpy_dtype(dtype)),
      cost=lambda out, **a: Cost(0, 0, out.nbytes), family="constant", doc="a tensor filled with one value")


def _ce_grad_infer(logits, labels, grad, reduction):
    require_float("cross_entropy_grad", logits, grad)
    if logits.rank != 2 or labels.shape != logits.shape[:1] or labels.dtype not in INT_DTYPES or grad.shape != ():
        raise ShapeError(f"cross_entropy_grad: expects logits [N, C], labels [N], a scalar grad; got {logits}, {labels}, {grad}")
    return logits.dense()


def _ce_grad_ref(logits, labels, grad, reduction):
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(n), labels] -= 1
    scale = grad / n if reduction == "mean" else grad
    return (p * scale).astype(logits.dtype)


defop("cross_entropy_grad", inputs=("logits", "labels", "grad"), attrs={"reduction": "mean"},
      normalize=lambda a: {**a, "reduction": as_choice("cross_entropy_grad", "reduction", a["reduction"], ("mean", "sum"))},
      infer=_ce_grad_infer, ref=_ce_grad_ref, cost=elementwise_cost(6), family="loss",
      doc="d cross_entropy / d logits = (softmax(logits) - onehot(labels)) * grad [/ N]")


def _emb_grad_infer(ids, grad, vocab):
    if ids.dtype not in INT_DTYPES or grad.shape[:-1] != ids.shape:
        raise ShapeError(f"embedding_grad: grad {grad} does not match ids {ids}")
    return TensorType((vocab, grad.shape[-1]), grad.dtype)


def _emb_grad_ref(ids, grad, vocab):
    out = np.zeros((vocab, grad.shape[-1]), dtype=grad.dtype)
    np.add.at(out, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
    return out


defop("embedding_grad", inputs=("ids", "grad"), attrs={"vocab": REQUIRED},
      normalize=lambda a: {**a, "vocab": as_int("embedding_grad", "vocab", a["vocab"], minimum=1)},
      infer=_emb_grad_infer, ref=_emb_grad_ref, cost=lambda out, ids, g, **a: Cost(g.numel, g.nbytes + ids.nbytes, out.nbytes),
      family="embedding", doc="scatter-add rows of grad into a [vocab, dim] table at ids")


def _slice_scatter_normalize(attrs):
    attrs["shape"] = _shape_attr("slice_scatter", attrs["shape"])
    attrs["step"] = as_int("slice_scatter", "step", attrs["step"], minimum=1)
    return attrs


def _slice_scatter_infer(grad, shape, axis, start, end, step):
    a = normalize_axis("slice_scatter", axis, len(shape))
    length = len(range(*slice(start, end, step).indices(shape[a])))
    expected = shape[:a] + (length,) + shape[a + 1:]
    if grad.shape != expected:
        raise ShapeError(f"slice_scatter: grad {grad} does not match the slice {list(expected)} of {list(shape)}")
    return TensorType(shape, grad.dtype)


def _slice_scatter_ref(grad, shape, axis, start, end, step):
    out = np.zeros(shape, dtype=grad.dtype)
    index = [slice(None)] * len(shape)
    index[axis] = slice(start, end, step)
    out[tuple(index)] = grad
    return out


defop("slice_scatter", inputs=("grad",), attrs={"shape": REQUIRED, "axis": REQUIRED, "start": 0, "end": None, "step": 1},
      normalize=_slice_scatter_normalize, infer=_slice_scatter_infer, ref=_slice_scatter_ref,
      cost=lambda out, g, **a: Cost(0, g.nbytes, out.nbytes), family="shape",
      doc="zeros of `shape` with grad written at [..., start:end:step, ...] (the gradient of slice)")


def _attention_probs(q, k, causal, scale):
    """softmax(q k^T * scale [+ causal mask]): the probabilities sdpa_grad's reference recomputes."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * s
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    return (p / p.sum(axis=-1, keepdims=True)).astype(q.dtype)


def _sdpa_grad_parts(q, k, v):
    """Shapes of the three gradients packed in sdpa_grad's output: dq, dk, dv over the broadcast batch."""
    batch = broadcast_shapes("sdpa_grad", q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return batch + q.shape[-2:], batch + k.shape[-2:], batch + v.shape[-2:]


def _sdpa_grad_infer(q, k, v, grad, causal, scale):
    require_float("sdpa_grad", q, k, v, grad)
    if min(q.rank, k.rank, v.rank) < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"sdpa_grad: q {q}, k {k} and v {v} do not fit")
    if not q.dtype == k.dtype == v.dtype == grad.dtype:
        raise ShapeError(f"sdpa_grad: q, k, v and grad have different dtypes ({q}, {k}, {v}, {grad})")
    dq, dk, dv = _sdpa_grad_parts(q, k, v)
    if grad.shape != dq[:-1] + (v.shape[-1],):
        raise ShapeError(f"sdpa_grad: grad {grad} does not match the attention output {list(dq[:-1] + (v.shape[-1],))}")
    return TensorType((math.prod(dq) + math.prod(dk) + math.prod(dv),), q.dtype)


def _sdpa_grad_ref(q, k, v, grad, causal, scale):
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dq_shape, dk_shape, dv_shape = _sdpa_grad_parts(q, k, v)
    q, k, v = np.broadcast_to(q, dq_shape), np.broadcast_to(k, dk_shape), np.broadcast_to(v, dv_shape)
    p = _attention_probs(q, k, causal, scale)
    dv = np.matmul(np.swapaxes(p, -1, -2), grad)
    dp = np.matmul(grad, np.swapaxes(v, -1, -2))
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * s
    dq = np.matmul(ds, k)
    dk = np.matmul(np.swapaxes(ds, -1, -2), q)
    return np.concatenate([dq.ravel(), dk.ravel(), dv.ravel()]).astype(q.dtype)


def _sdpa_grad_cost(out, q, k, v, grad, **attrs):
    length, d, keys, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    batch = grad.numel // (length * dv) if grad.numel else 0
    flops = batch * (2 * length * keys * (3 * d + 2 * dv) + 10 * length * keys)
    return Cost(flops, q.nbytes + k.nbytes + v.nbytes + grad.nbytes, out.nbytes)


defop("sdpa_grad", inputs=("q", "k", "v", "grad"), attrs={"causal": False, "scale": None}, infer=_sdpa_grad_infer,
      ref=_sdpa_grad_ref, cost=_sdpa_grad_cost, normalize=normalizer("sdpa_grad", causal=as_bool, scale=optional_float),
      family="attention",
      doc="the gradients of sdpa(q, k, v) for the output gradient grad, flattened and packed as [dq, dk, dv] "
          "(each over the broadcast batch dimensions)")
