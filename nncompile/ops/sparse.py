"""Ops for training weights with a fixed sparsity pattern (the weight's type carries the pattern).

``sparse_input_grad(grad, weight)`` is ``grad @ weight`` (linear's input gradient) through the pattern;
``sparse_weight_grad(grad, x, weight)`` is the weight gradient of ``linear(x, weight)`` computed on the
pattern only (a sampled product ``grad^T @ x``); ``sparse_mask(g, weight)`` zeroes a gradient off the
pattern. Both output exact zeros off the pattern, so every optimizer (sgd with momentum / weight decay,
adam, adamw) keeps the pruned weights at zero: the pattern never changes. The NumPy references read the
pattern from the weight's nonzeros (the weight is masked at initialization); the C++ kernels use the
pattern of the weight's type, baked into the code (``codegen/cpp_sparse.py``).

Imported by ``autodiff`` and by the C++ rules; not part of ``import nncompile.ops``.
"""
from __future__ import annotations

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import OPS, Cost, defop, require_float


def _wgrad_infer(grad, x, weight):
    require_float("sparse_weight_grad", grad, x, weight)
    if weight.sparsity is None:
        raise ShapeError(f"sparse_weight_grad: the weight {weight} has no sparsity pattern")
    if grad.rank != 2 or x.rank != 2 or weight.rank != 2 or grad.shape[0] != x.shape[0] \
            or (grad.shape[1], x.shape[1]) != weight.shape:
        raise ShapeError(f"sparse_weight_grad: expects grad [M, N], x [M, K], weight [N, K]; got {grad}, {x}, {weight}")
    return TensorType(weight.shape, weight.dtype)


def _wgrad_ref(grad, x, weight):
    return ((grad.T @ x) * (weight != 0)).astype(weight.dtype)


def _wgrad_cost(out, grad, x, weight):
    density = weight.sparsity.expected_density or 1.0
    return Cost(int(2 * grad.shape[0] * out.numel * density), grad.nbytes + x.nbytes, out.nbytes)


def _mask_infer(g, weight):
    require_float("sparse_mask", g, weight)
    if weight.sparsity is None or g.shape != weight.shape:
        raise ShapeError(f"sparse_mask: expects a gradient of the shape of a sparse weight; got {g}, {weight}")
    return g.dense()


if "sparse_weight_grad" not in OPS:
    defop("sparse_weight_grad", inputs=("grad", "x", "weight"), infer=_wgrad_infer, ref=_wgrad_ref, cost=_wgrad_cost,
          family="sparse", doc="(grad^T @ x) on the weight's sparsity pattern, zero elsewhere")
    defop("sparse_mask", inputs=("g", "weight"), infer=_mask_infer,
          ref=lambda g, weight: (g * (weight != 0)).astype(g.dtype),
          cost=lambda out, g, w: Cost(out.numel, g.nbytes, out.nbytes), family="sparse",
          doc="g on the weight's sparsity pattern, zero elsewhere")


def _igrad_infer(grad, weight):
    require_float("sparse_input_grad", grad, weight)
    if weight.sparsity is None or weight.rank != 2 or grad.rank != 2 or grad.shape[1] != weight.shape[0]:
        raise ShapeError(f"sparse_input_grad: expects grad [M, N] and a sparse weight [N, K]; got {grad}, {weight}")
    return TensorType((grad.shape[0], weight.shape[1]), grad.dtype)


if "sparse_input_grad" not in OPS:
    defop("sparse_input_grad", inputs=("grad", "weight"), infer=_igrad_infer,
          ref=lambda grad, weight: (grad @ weight).astype(grad.dtype),
          cost=lambda out, g, w: Cost(int(2 * g.shape[0] * w.numel * (w.sparsity.expected_density or 1.0)),
                                      g.nbytes + w.nbytes, out.nbytes),
          family="sparse", doc="grad @ weight for a sparse weight (the input gradient of linear)")


def vjp_sparse_linear(ctx, node, g, x, weight, bias=None):
    """linear's vjp when the weight is sparse: dW only on the pattern."""
    xt, wt = ctx.type(x), ctx.type(weight)
    rows = xt.numel // xt.shape[-1] if xt.shape[-1] else 0
    g2 = g if ctx.type(g).rank == 2 else ctx.op("reshape", [g], shape=(rows, wt.shape[0]))
    x2 = x if xt.rank == 2 else ctx.op("reshape", [x], shape=(rows, wt.shape[1]))
    gx = ctx.op("sparse_input_grad", [g2, weight])
    if xt.rank != 2:
        gx = ctx.op("reshape", [gx], shape=xt.shape)
    grads = [gx, ctx.op("sparse_weight_grad", [g2, x2, weight])]
    if bias is not None:
        grads.append(ctx.op("sum", [g2], axes=(0,), keepdim=False))
    return tuple(grads)


def is_masked_grad(op: str) -> bool:
    return op in ("sparse_weight_grad", "sparse_mask")

