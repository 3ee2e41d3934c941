"""Initial parameter values: ``materialize(graph, seed)`` -> name -> array.

Each parameter draws from its own generator, seeded from the base seed and its name, so adding a
parameter never changes the values of the others. Sparse weights are masked with their pattern.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nncompile.errors import InputError, ShapeError
from nncompile.ir.graph import Graph, Param
from nncompile.ir.types import numpy_dtype, stable_seed

INIT_KINDS = ("zeros", "ones", "constant", "normal", "uniform", "kaiming_uniform", "kaiming_normal",
              "xavier_uniform", "xavier_normal", "file", "given")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) with torch's convention: shape = [out, in, *receptive field]."""
    if len(shape) < 2:
        return (shape[0] if shape else 1,) * 2
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_value(param: Param, seed: int = 0, weights: dict | None = None, base_dir: Path | None = None) -> np.ndarray:
    shape, args, kind = param.type.shape, param.init.args, param.init.kind
    rng = np.random.default_rng(stable_seed(seed, param.name))
    fan_in, fan_out = fans(shape)
    if kind == "zeros":
        value = np.zeros(shape)
    elif kind == "ones":
        value = np.ones(shape)
    elif kind == "constant":
        value = np.full(shape, float(args.get("value", 0.0)))
    elif kind == "normal":
        value = rng.normal(float(args.get("mean", 0.0)), float(args.get("std", 1.0)), shape)
    elif kind == "uniform":
        value = rng.uniform(float(args.get("low", -1.0)), float(args.get("high", 1.0)), shape)
    elif kind == "kaiming_uniform":
        a = float(args.get("a", math.sqrt(5)))
        bound = math.sqrt(6.0 / ((1 + a * a) * max(fan_in, 1)))
        value = rng.uniform(-bound, bound, shape)
    elif kind == "kaiming_normal":
        a = float(args.get("a", 0.0))
        value = rng.normal(0.0, math.sqrt(2.0 / ((1 + a * a) * max(fan_in, 1))), shape)
    elif kind == "xavier_uniform":
        bound = float(args.get("gain", 1.0)) * math.sqrt(6.0 / max(fan_in + fan_out, 1))
        value = rng.uniform(-bound, bound, shape)
    elif kind == "xavier_normal":
        value = rng.normal(0.0, float(args.get("gain", 1.0)) * math.sqrt(2.0 / max(fan_in + fan_out, 1)), shape)
    elif kind == "file":
        value = load_array(args["path"], args.get("key") or param.name, base_dir)
    elif kind == "given":
        if weights is None or param.name not in weights:
            raise InputError(f"parameter '{param.name}' has no given value", param.loc)
        value = weights[param.name]
    else:
        raise InputError(f"parameter '{param.name}': unknown initializer '{kind}'", param.loc)
    value = np.asarray(value)
    if tuple(value.shape) != shape:
        raise ShapeError(f"parameter '{param.name}': initial value has shape {list(value.shape)}, expected {list(shape)}", param.loc)
    value = value.astype(numpy_dtype(param.type.dtype), copy=True)
    if param.type.sparsity is not None:
        value[~param.type.sparsity.mask(shape)] = 0
    return value


def load_array(path: str, key: str, base_dir: Path | None = None) -> np.ndarray:
    file = Path(path)
    if not file.is_absolute() and base_dir is not None:
        file = base_dir / file
    if not file.exists():
        raise InputError(f"weights file '{path}' not found")
    data = np.load(file)
    if isinstance(data, np.ndarray):
        return data
    if key not in data.files:
        raise InputError(f"weights file '{path}' has no array '{key}' (it has: {', '.join(data.files[:8])})")
    return data[key]


def materialize(graph: Graph, seed: int = 0, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Initial values of every parameter of ``graph``."""
    return {p.name: init_value(p, seed, dict(graph.weights), base_dir) for p in graph.params}
