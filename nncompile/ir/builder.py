"""GraphBuilder: the one way frontends, autodiff and passes make graphs.

Each ``op(...)`` call checks arity and attributes against the op table and infers the result type
at once, so a mistake is reported at the source location of the call that made it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nncompile.errors import NameError_, NNError, ShapeError, SourceLoc
from nncompile.ir.graph import Attrs, Graph, Init, Input, Node, Param, TrainSpec
from nncompile.ir.types import TensorType
from nncompile.ops.base import get_op

_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def clean_name(text: str) -> str:
    """A legal value name from arbitrary text (letters, digits, '_' and '.')."""
    name = re.sub(r"[^A-Za-z0-9_.]", "_", text).strip(".") or "v"
    return name if not name[0].isdigit() else "v" + name


class GraphBuilder:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Input] = []
        self.params: list[Param] = []
        self.nodes: list[Node] = []
        self.outputs: list[str] = []
        self.weights: dict[str, np.ndarray] = {}
        self.train: TrainSpec | None = None
        self._types: dict[str, TensorType] = {}
        self._counts: dict[str, int] = {}

    @classmethod
    def from_graph(cls, graph: Graph, *, keep_nodes: bool = True, keep_outputs: bool = False) -> "GraphBuilder":
        """Start a new graph from an existing one (its inputs and params; optionally its nodes)."""
        b = cls(graph.name)
        for item in graph.inputs:
            b.input(item.name, item.type, item.loc)
        for p in graph.params:
            b.param(p.name, p.type, p.init, trainable=p.trainable, loc=p.loc, value=graph.weights.get(p.name))
        if keep_nodes:
            for node in graph.nodes:
                b.add_node(node)
        if keep_outputs:
            b.outputs = list(graph.outputs)
        b.train = graph.train
        return b

    # names
    def fresh(self, base: str) -> str:
        """A new unique name based on ``base`` (``h``, ``h_1``, ``h_2``, ...)."""
        base = clean_name(base)
        if base not in self._types:
            return base
        count = self._counts.get(base, 0)
        while True:
            count += 1
            candidate = f"{base}_{count}"
            if candidate not in self._types:
                self._counts[base] = count
                return candidate

    def _claim(self, name: str, type_: TensorType, loc: SourceLoc | None) -> None:
        if not _NAME_OK.match(name):
            raise NameError_(f"illegal value name '{name}'", loc)
        if name in self._types:
            raise NameError_(f"'{name}' is already defined", loc)
        self._types[name] = type_

    def type_of(self, name: str) -> TensorType:
        try:
            return self._types[name]
        except KeyError:
            raise NameError_(f"no value named '{name}'") from None

    def has(self, name: str) -> bool:
        return name in self._types

    # definitions
    def input(self, name: str, type_: TensorType, loc: SourceLoc | None = None) -> str:
        self._claim(name, type_, loc)
        self.inputs.append(Input(name, type_, loc))
        return name

    def param(self, name: str, type_: TensorType, init: Init | None = None, *, trainable: bool = True,
              loc: SourceLoc | None = None, value: np.ndarray | None = None) -> str:
        if value is not None:
            value = np.asarray(value)
            if tuple(value.shape) != type_.shape:
                raise ShapeError(f"value for parameter '{name}' has shape {list(value.shape)}, expected {list(type_.shape)}", loc)
            self.weights[name] = value
            init = init or Init("given")
        self._claim(name, type_, loc)
        self.params.append(Param(name, type_, init or Init("zeros"), trainable, loc))
        return name

    def op(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None, *,
           name: str | None = None, loc: SourceLoc | None = None) -> str:
        """Append ``name = op(inputs) {attrs}``; returns the new value's name."""
        try:
            opdef = get_op(op)
            opdef.check_arity(len(inputs))
            for src in inputs:
                if src not in self._types:
                    raise NameError_(f"{op}: no value named '{src}'")
            types = [self._types[s] for s in inputs]
            bound = opdef.bind_attrs(attrs or {}, types)
            in_types = opdef.split_inputs(types)
            out_type = opdef.infer(*in_types, **bound)
        except NNError as err:
            raise err.with_loc(loc)
        result = self.fresh(name or op) if name is None or name in self._types else name
        self._claim(result, out_type, loc)
        self.nodes.append(Node(result, op, tuple(inputs), Attrs(bound), out_type, loc))
        return result

    def add_node(self, node: Node) -> str:
        """Append an existing node unchanged (its name must be free)."""
        for src in node.inputs:
            if src not in self._types:
                raise NameError_(f"node '{node.name}' reads unknown value '{src}'", node.loc)
        self._claim(node.name, node.type, node.loc)
        self.nodes.append(node)
        return node.name

    def output(self, *names: str) -> None:
        for name in names:
            self.type_of(name)
            self.outputs.append(name)

    def build(self) -> Graph:
        return Graph(self.name, tuple(self.inputs), tuple(self.params), tuple(self.nodes),
                     tuple(self.outputs), self.train, dict(self.weights))


def prune(graph: Graph, outputs: Sequence[str] | None = None, *, keep_inputs: bool = False) -> Graph:
    """Drop nodes (and, unless ``keep_inputs``, inputs and params) that no output depends on."""
    outputs = tuple(outputs if outputs is not None else graph.outputs)
    needed = set(outputs)
    for node in reversed(graph.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    nodes = tuple(n for n in graph.nodes if n.name in needed)
    inputs = graph.inputs if keep_inputs else tuple(i for i in graph.inputs if i.name in needed)
    params = graph.params if keep_inputs else tuple(p for p in graph.params if p.name in needed)
    weights = {k: v for k, v in graph.weights.items() if any(p.name == k for p in params)}
    train = graph.train if graph.train is not None and graph.train.loss in needed else None
    return Graph(graph.name, inputs, params, nodes, outputs, train, weights)
