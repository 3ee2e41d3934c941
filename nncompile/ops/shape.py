"""Data movement: reshape, flatten, transpose, permute, concat, slice, expand, squeeze, unsqueeze."""
from __future__ import annotations

import math

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import REQUIRED, Cost, defop, normalize_axis
from nncompile.ops.validate import as_int, normalizer, optional_int

FAMILY = "shape"


def _move_cost(out, *ins, **attrs):
    return Cost(0, out.nbytes, out.nbytes)


def _view_cost(out, *ins, **attrs):
    return Cost(0, 0, 0)


def _ints(op, name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ShapeError(f"{op}: {name} must be a tuple of ints, got {value!r}")
    return value


def resolve_shape(op: str, shape: tuple, numel: int) -> tuple[int, ...]:
    unknown = [i for i, d in enumerate(shape) if d == -1]
    if len(unknown) > 1 or any(d < -1 for d in shape):
        raise ShapeError(f"{op}: shape {list(shape)} may hold one -1 and otherwise non-negative sizes")
    known = math.prod(d for d in shape if d != -1)
    if unknown:
        if known == 0 or numel % known:
            raise ShapeError(f"{op}: cannot infer -1 in {list(shape)} for {numel} elements")
        shape = tuple(numel // known if d == -1 else d for d in shape)
    if math.prod(shape) != numel:
        raise ShapeError(f"{op}: cannot reshape {numel} elements into {list(shape)}")
    return tuple(shape)


def _reshape_normalize(attrs):
    attrs["shape"] = _ints("reshape", "shape", attrs["shape"])
    return attrs


defop("reshape", inputs=("x",), attrs={"shape": REQUIRED}, normalize=_reshape_normalize,
      infer=lambda x, shape: TensorType(resolve_shape("reshape", shape, x.numel), x.dtype),
      ref=lambda x, shape: x.reshape(resolve_shape("reshape", shape, x.size)).copy(), cost=_view_cost, family=FAMILY,
      doc="same elements in a new shape (one -1 is inferred); row-major, zero-copy")


def _flatten_shape(shape, start, end):
    rank = len(shape)
    if rank == 0:
        return (1,)
    s, e = normalize_axis("flatten", start, rank), normalize_axis("flatten", end, rank)
    if s > e:
        raise ShapeError(f"flatten: start axis {start} is after end axis {end}")
    return shape[:s] + (math.prod(shape[s:e + 1]),) + shape[e + 1:]


defop("flatten", inputs=("x",), attrs={"start": 1, "end": -1},
      normalize=normalizer("flatten", start=as_int, end=as_int),
      infer=lambda x, start, end: TensorType(_flatten_shape(x.shape, start, end), x.dtype),
      ref=lambda x, start, end: x.reshape(_flatten_shape(x.shape, start, end)).copy(), cost=_view_cost, family=FAMILY,
      doc="merge axes start..end into one (torch.flatten)")


def _transpose_dims(rank, dim0, dim1):
    dims = list(range(rank))
    a, b = normalize_axis("transpose", dim0, rank), normalize_axis("transpose", dim1, rank)
    dims[a], dims[b] = dims[b], dims[a]
    return tuple(dims)


defop("transpose", inputs=("x",), attrs={"dim0": REQUIRED, "dim1": REQUIRED},
      normalize=normalizer("transpose", dim0=as_int, dim1=as_int),
      infer=lambda x, dim0, dim1: TensorType(tuple(x.shape[d] for d in _transpose_dims(x.rank, dim0, dim1)), x.dtype),
      ref=lambda x, dim0, dim1: np.ascontiguousarray(np.transpose(x, _transpose_dims(x.ndim, dim0, dim1))),
      cost=_move_cost, family=FAMILY, doc="swap two axes")


def _permute_check(x, dims):
    norm = tuple(normalize_axis("permute", d, x.rank) for d in dims)
    if sorted(norm) != list(range(x.rank)):
        raise ShapeError(f"permute: dims {list(dims)} are not a permutation of {x.rank} axes")
    return norm


def _permute_normalize(attrs):
    attrs["dims"] = _ints("permute", "dims", attrs["dims"])
    return attrs


defop("permute", inputs=("x",), attrs={"dims": REQUIRED}, normalize=_permute_normalize,
      infer=lambda x, dims: TensorType(tuple(x.shape[d] for d in _permute_check(x, dims)), x.dtype),
      ref=lambda x, dims: np.ascontiguousarray(np.transpose(x, [d % x.ndim for d in dims])),
      cost=_move_cost, family=FAMILY, doc="reorder axes: out.shape[i] = x.shape[dims[i]]")


def _concat_infer(xs, axis):
    first = xs[0]
    a = normalize_axis("concat", axis, first.rank)
    for t in xs[1:]:
        if t.rank != first.rank or t.dtype != first.dtype or any(
                t.shape[d] != first.shape[d] for d in range(first.rank) if d != a):
            raise ShapeError(f"concat: {t} does not match {first} outside axis {axis}")
    size = sum(t.shape[a] for t in xs)
    return TensorType(first.shape[:a] + (size,) + first.shape[a + 1:], first.dtype)


defop("concat", inputs=("*xs",), attrs={"axis": 0}, infer=_concat_infer, normalize=normalizer("concat", axis=as_int),
      ref=lambda xs, axis: np.concatenate(xs, axis=axis), cost=_move_cost, family=FAMILY,
      doc="join tensors along an axis")


def _slice_normalize(attrs):
    attrs["axis"] = as_int("slice", "axis", attrs["axis"])
    attrs["start"] = 0 if attrs["start"] is None else as_int("slice", "start", attrs["start"])
    attrs["end"] = optional_int("slice", "end", attrs["end"])
    attrs["step"] = as_int("slice", "step", attrs["step"], minimum=1)
    return attrs


def _slice_check(op, x, axis, start, end, step):
    a = normalize_axis(op, axis, x.rank)
    length = len(range(*slice(start, end, step).indices(x.shape[a])))
    return a, length


def _slice_infer(x, axis, start, end, step):
    a, length = _slice_check("slice", x, axis, start, end, step)
    return TensorType(x.shape[:a] + (length,) + x.shape[a + 1:], x.dtype)


def _slice_ref(x, axis, start, end, step):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end, step)
    return x[tuple(index)].copy()


defop("slice", inputs=("x",), attrs={"axis": REQUIRED, "start": 0, "end": None, "step": 1},
      infer=_slice_infer, ref=_slice_ref, cost=_move_cost, normalize=_slice_normalize, family=FAMILY,
      doc="x[..., start:end:step, ...] along one axis (Python slice rules, step > 0)")


def _expand_shape(x, shape):
    if len(shape) < x.rank:
        raise ShapeError(f"expand: target {list(shape)} has fewer axes than {x}")
    pad = len(shape) - x.rank
    out = []
    for i, d in enumerate(shape):
        src = x.shape[i - pad] if i >= pad else None
        if d == -1:
            if src is None:
                raise ShapeError(f"expand: -1 is not allowed for a new leading axis ({list(shape)})")
            d = src
        if src is not None and src not in (1, d):
            raise ShapeError(f"expand: cannot expand {x} to {list(shape)}")
        out.append(d)
    return tuple(out)


def _expand_normalize(attrs):
    attrs["shape"] = _ints("expand", "shape", attrs["shape"])
    return attrs


defop("expand", inputs=("x",), attrs={"shape": REQUIRED}, normalize=_expand_normalize,
      infer=lambda x, shape: TensorType(_expand_shape(x, shape), x.dtype),
      ref=lambda x, shape: np.broadcast_to(x, _expand_shape(TensorType(x.shape), shape)).copy(),
      cost=_move_cost, family=FAMILY, doc="broadcast size-1 axes to a larger shape (torch.expand; -1 keeps)")


def _squeeze_shape(x, axes):
    norm = {normalize_axis("squeeze", a, x.rank) for a in axes}
    for a in norm:
        if x.shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of {x} has size {x.shape[a]}, not 1")
    return tuple(d for i, d in enumerate(x.shape) if i not in norm)


def _squeeze_normalize(attrs):
    attrs["axes"] = _ints("squeeze", "axes", attrs["axes"])
    return attrs


defop("squeeze", inputs=("x",), attrs={"axes": REQUIRED}, normalize=_squeeze_normalize,
      infer=lambda x, axes: TensorType(_squeeze_shape(x, axes), x.dtype),
      ref=lambda x, axes: x.reshape(_squeeze_shape(TensorType(x.shape), axes)).copy(), cost=_view_cost,
      family=FAMILY, doc="drop size-1 axes")


def _unsqueeze_shape(x, axis):
    a = normalize_axis("unsqueeze", axis, x.rank + 1)
    return x.shape[:a] + (1,) + x.shape[a:]


defop("unsqueeze", inputs=("x",), attrs={"axis": REQUIRED}, normalize=normalizer("unsqueeze", axis=as_int),
      infer=lambda x, axis: TensorType(_unsqueeze_shape(x, axis), x.dtype),
      ref=lambda x, axis: x.reshape(_unsqueeze_shape(TensorType(x.shape), axis)).copy(), cost=_view_cost,
      family=FAMILY, doc="insert a size-1 axis")
