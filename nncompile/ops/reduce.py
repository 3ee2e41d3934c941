"""Reductions over axes: sum, mean, max."""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import Cost, defop, normalize_axis
from nncompile.ops.validate import as_bool


def _normalize(op):
    def normalize(attrs):
        axes = attrs["axes"]
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = (axes,)
        if axes is not None and (not isinstance(axes, tuple)
                                 or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)):
            raise ShapeError(f"{op}: axes must be an int, a tuple of ints or none, got {axes!r}")
        if axes is not None and all(a >= 0 for a in axes):
            axes = tuple(sorted(axes))   # negative axes need the rank: ``canonicalize`` does them
        attrs["axes"] = axes
        attrs["keepdim"] = as_bool(op, "keepdim", attrs["keepdim"])
        return attrs
    return normalize


def _axes(op, x_rank, axes):
    if axes is None:
        return tuple(range(x_rank))
    norm = tuple(sorted({normalize_axis(op, a, x_rank) for a in axes}))
    if len(norm) != len(axes):
        raise ShapeError(f"{op}: repeated axis in {list(axes)}")
    return norm


def _infer(op):
    def infer(x, axes, keepdim):
        if op != "max" and not x.is_float:
            raise ShapeError(f"{op}: expected a floating-point tensor, got {x}")
        red = _axes(op, x.rank, axes)
        if op == "max" and any(x.shape[a] == 0 for a in red):
            raise ShapeError(f"max: cannot reduce an empty axis of {x}")
        shape = tuple(1 if i in red else d for i, d in enumerate(x.shape)) if keepdim else \
            tuple(d for i, d in enumerate(x.shape) if i not in red)
        return TensorType(shape, x.dtype)
    return infer


def _ref(fn):
    def ref(x, axes, keepdim):
        red = _axes("reduce", x.ndim, axes)
        if fn is np.max:
            return np.max(x, axis=red, keepdims=keepdim)
        return fn(x, axis=red, keepdims=keepdim, dtype=np.float64).astype(x.dtype)
    return ref


def _canonicalize(op):
    def canonicalize(attrs, x):
        if attrs["axes"] is not None:
            attrs["axes"] = _axes(op, x.rank, attrs["axes"])
        return attrs
    return canonicalize


def _cost(out, x, **attrs):
    return Cost(x.numel, x.nbytes, out.nbytes)


for _name, _fn, _doc in (("sum", np.sum, "sum"), ("mean", np.mean, "mean"), ("max", np.max, "maximum")):
    defop(_name, inputs=("x",), attrs={"axes": None, "keepdim": False}, infer=_infer(_name), ref=_ref(_fn),
          cost=_cost, normalize=_normalize(_name), canonicalize=_canonicalize(_name), family="reduce",
          doc=f"{_doc} over axes (none = all axes); keepdim keeps them as size 1")
