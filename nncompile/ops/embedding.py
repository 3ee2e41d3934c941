"""Embedding lookup."""
from __future__ import annotations

import numpy as np

from nncompile.errors import InputError, ShapeError
from nncompile.ir.types import INT_DTYPES, TensorType
from nncompile.ops.base import Cost, defop


def _infer(ids, weight):
    if ids.dtype not in INT_DTYPES:
        raise ShapeError(f"embedding: ids must be integers, got {ids}")
    if weight.rank != 2:
        raise ShapeError(f"embedding: weight must be [vocab, dim], got {weight}")
    return TensorType(ids.shape + (weight.shape[1],), weight.dtype)


def _ref(ids, weight):
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        bad = ids[(ids < 0) | (ids >= weight.shape[0])][0]
        raise InputError(f"embedding: id {int(bad)} is out of range for a vocabulary of {weight.shape[0]}")
    return weight[ids]


defop("embedding", inputs=("ids", "weight"), infer=_infer, ref=_ref,
      cost=lambda out, ids, weight: Cost(0, ids.nbytes + out.nbytes, out.nbytes), family="embedding",
      doc="rows of weight[vocab, dim] picked by integer ids: [...] -> [..., dim]")
