"""GEMM-shaped ops: batched matmul and linear (torch convention)."""
from __future__ import annotations

import math

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import Cost, broadcast_shapes, defop, require_float


def _matmul_shape(a: tuple, b: tuple) -> tuple:
    if not a or not b:
        raise ShapeError(f"matmul: operands must have rank >= 1, got [{','.join(map(str, a))}] "
                         f"and [{','.join(map(str, b))}]")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ShapeError(f"matmul: inner dimensions differ: a is [{','.join(map(str, a))}] (K={a2[-1]}), "
                         f"b is [{','.join(map(str, b))}] (K={b2[-2]})")
    batch = broadcast_shapes("matmul", a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _matmul_infer(a, b):
    require_float("matmul", a, b)
    if a.dtype != b.dtype:
        raise ShapeError(f"matmul: operands have different dtypes ({a} and {b})")
    return TensorType(_matmul_shape(a.shape, b.shape), a.dtype)


def _matmul_cost(out, a, b):
    k = a.shape[-1]
    return Cost(2 * out.numel * k, a.nbytes + b.nbytes, out.nbytes)


defop("matmul", inputs=("a", "b"), infer=_matmul_infer, ref=lambda a, b: np.matmul(a, b), cost=_matmul_cost,
      family="matmul", doc="np.matmul: batched matrix product with broadcast batch dimensions")


def _linear_infer(x, weight, bias):
    require_float("linear", x, weight, bias)
    if weight.rank != 2:
        raise ShapeError(f"linear: weight must be [out, in], got {weight}")
    if x.rank < 1 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear: input features {x.shape[-1] if x.rank else '?'} do not match weight {weight} "
                         f"(expects {weight.shape[1]})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"linear: bias must be [{weight.shape[0]}], got {bias}")
    if x.dtype != weight.dtype:
        raise ShapeError(f"linear: input {x} and weight {weight} have different dtypes")
    return TensorType(x.shape[:-1] + (weight.shape[0],), x.dtype)


def _linear_ref(x, weight, bias):
    y = np.matmul(x, weight.T)
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _linear_cost(out, x, weight, bias):
    rows = math.prod(x.shape[:-1])
    flops = 2 * rows * weight.shape[0] * weight.shape[1] + (out.numel if bias is not None else 0)
    read = x.nbytes + weight.nbytes + (bias.nbytes if bias is not None else 0)
    return Cost(flops, read, out.nbytes)


defop("linear", inputs=("x", "weight", "bias?"), infer=_linear_infer, ref=_linear_ref, cost=_linear_cost,
      family="matmul", doc="x[..., in] @ weight[out, in]^T + bias[out]")
