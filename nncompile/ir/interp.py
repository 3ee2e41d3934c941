"""The NumPy interpreter: runs any graph with each op's ``ref`` rule. It is the semantics.

    outs = run(graph, {"x": x})                      # initial weights from the initializers
    outs = run(graph, {"x": x}, weights, dtype=np.float64)   # float math in f64 (gradient checks)
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from nncompile.errors import InputError, NNError
from nncompile.ir.graph import Graph
from nncompile.ir.init import materialize
from nncompile.ir.types import numpy_dtype
from nncompile.ops.base import get_op


def check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> None:
    for item in graph.inputs:
        if item.name not in inputs:
            raise InputError(f"missing input '{item.name}' (expected {item.type})")
        shape = tuple(np.shape(inputs[item.name]))
        if shape != item.type.shape:
            raise InputError(f"input '{item.name}' has shape {list(shape)}, expected {item.type}")
        kind = np.asarray(inputs[item.name]).dtype.kind
        declared = "b" if item.type.dtype == "bool" else "i" if item.type.dtype.startswith("i") else "f"
        if kind != declared and not (declared == "i" and kind == "u") and not (declared == "f" and kind in "iu"):
            raise InputError(f"input '{item.name}' has dtype {np.asarray(inputs[item.name]).dtype}, expected {item.type}")
    extra = set(inputs) - set(graph.input_names)
    if extra:
        raise InputError(f"unexpected input '{sorted(extra)[0]}' (inputs are: {', '.join(graph.input_names)})")


def run_all(graph: Graph, inputs: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None = None,
            *, dtype=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Every value of the graph (inputs, params, node results) by name."""
    check_inputs(graph, inputs)
    weights = materialize(graph, seed) if weights is None else weights
    env: dict[str, np.ndarray] = {}

    def cast(name: str, array, declared: str) -> np.ndarray:
        array = np.asarray(array)
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            return array.astype(dtype)
        if dtype is None:
            return array.astype(numpy_dtype(declared), copy=False)
        return array

    for item in graph.inputs:
        env[item.name] = cast(item.name, inputs[item.name], item.type.dtype)
    for p in graph.params:
        if p.name not in weights:
            raise InputError(f"no value for parameter '{p.name}'")
        value = np.asarray(weights[p.name])
        if value.shape != p.type.shape:
            raise InputError(f"parameter '{p.name}' has shape {list(value.shape)}, expected {p.type}")
        env[p.name] = cast(p.name, value, p.type.dtype)
    for node in graph.nodes:
        opdef = get_op(node.op)
        args = opdef.split_inputs([env[s] for s in node.inputs])
        try:
            result = np.asarray(opdef.ref(*args, **node.attrs))
        except NNError as err:
            raise err.with_loc(node.loc)
        except Exception as err:  # a ref rule failing is a bug; say on which node
            raise RuntimeError(f"while executing {node.where()}: {type(err).__name__}: {err}") from err
        if result.shape != node.type.shape:
            raise RuntimeError(f"{node.where()}: ref produced shape {list(result.shape)}, type says {node.type}")
        if dtype is None or not np.issubdtype(result.dtype, np.floating):
            result = result.astype(numpy_dtype(node.type.dtype), copy=False)
        env[node.name] = result
    return env


def run(graph: Graph, inputs: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None = None,
        *, dtype=None, seed: int = 0) -> dict[str, np.ndarray]:
    """The graph's outputs by name."""
    env = run_all(graph, inputs, weights, dtype=dtype, seed=seed)
    return {name: env[name] for name in graph.outputs}
