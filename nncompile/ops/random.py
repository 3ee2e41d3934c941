"""Dropout with a counter-based generator, so every backend reproduces the same mask bit for bit.

Element i (flat, row-major) is kept iff ``hash32(seed, i) / 2^32 >= p``; kept values are scaled by
``1 / (1 - p)``. The optional integer scalar input ``offset`` (a training step's counter) changes the
seed to ``(seed + offset * 0x9E3779B1) mod 2^32``, so every step draws a new mask. ``hash32`` is a murmur3-style finalizer on uint32 arithmetic (see ``hash32``).
"""
from __future__ import annotations

import math

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ops.base import defop, elementwise_cost, require_float
from nncompile.ops.validate import as_bool, as_float, as_int


def hash32(seed: int, index: np.ndarray) -> np.ndarray:
    """The dropout hash on uint32 arithmetic (wrapping), for an array of flat indices."""
    i = index.astype(np.uint32)
    h = i * np.uint32(0x9E3779B1) + np.uint32((seed * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def keep_mask(shape: tuple[int, ...], p: float, seed: int) -> np.ndarray:
    """True where element i (flat, row-major) is kept: hash32(seed, i) >= p * 2^32 (exact integer test)."""
    threshold = np.uint64(math.ceil(p * 2**32))
    return (hash32(seed, np.arange(math.prod(shape), dtype=np.uint64)).astype(np.uint64) >= threshold).reshape(shape)


def _normalize(attrs):
    attrs["p"] = as_float("dropout", "p", attrs["p"])
    if not 0.0 <= attrs["p"] < 1.0:
        raise ShapeError(f"dropout: p must be in [0, 1), got {attrs['p']}")
    attrs["seed"] = as_int("dropout", "seed", attrs["seed"], minimum=0)
    if attrs["seed"] >= 2**32:
        raise ShapeError(f"dropout: seed must be an int in [0, 2^32), got {attrs['seed']!r}")
    attrs["training"] = as_bool("dropout", "training", attrs["training"])
    return attrs


def step_seed(seed: int, offset) -> int:
    """The seed used at a given step: a training step passes its counter as ``offset``."""
    if offset is None:
        return seed
    return (seed + int(np.asarray(offset).reshape(())) * 0x9E3779B1) & 0xFFFFFFFF


def _infer(x, offset, p, seed, training):
    require_float("dropout", x)
    if offset is not None and (offset.shape != () or offset.dtype not in ("i64", "i32")):
        raise ShapeError(f"dropout: offset must be an integer scalar, got {offset}")
    return x.dense()


def _ref(x, offset, p, seed, training):
    if not training or p == 0:
        return x.copy()
    mask = keep_mask(x.shape, p, step_seed(seed, offset))
    return np.where(mask, x * x.dtype.type(1.0 / (1.0 - p)), 0).astype(x.dtype)


defop("dropout", inputs=("x", "offset?"), attrs={"p": 0.5, "seed": 0, "training": True}, infer=_infer, ref=_ref,
      normalize=_normalize, cost=elementwise_cost(8), family="random",
      doc="zero each element with probability p (seeded, reproducible), scale the rest by 1/(1-p)")
