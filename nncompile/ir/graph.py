"""The IR: an immutable typed graph in A-normal form, nodes in a topological order.

Every value has one name in one namespace: graph inputs, parameters (weights, buffers such as batch
norm running statistics) and node results. A node applies one op from the op table to named inputs
and frozen attributes and produces one tensor of a static ``TensorType``. Passes never edit a graph:
they build a new one (``Graph.replace`` or ``GraphBuilder``).

    g = GraphBuilder("tiny")
    x = g.input("x", TensorType((4, 8)))
    w = g.param("w", TensorType((16, 8)), Init("normal", {"std": 0.02}))
    y = g.op("relu", [g.op("linear", [x, w])])
    g.output(y)
    graph = g.build()
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Iterator

import numpy as np

from nncompile.errors import NameError_, SourceLoc
from nncompile.ir.types import TensorType


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class Attrs(Mapping):
    """Frozen, hashable, ordered-by-name attribute mapping. Values: int, float, bool, str, None, tuples."""

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping[str, Any] | None = None, **kwargs):
        merged = dict(items or {}, **kwargs)
        self._items = tuple(sorted((k, _freeze(v)) for k, v in merged.items()))
        self._dict = dict(self._items)

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        if isinstance(other, Attrs):
            return self._items == other._items
        return isinstance(other, Mapping) and self._dict == dict(other)

    def __repr__(self) -> str:
        return f"Attrs({self._dict!r})"

    def updated(self, **changes) -> "Attrs":
        return Attrs({**self._dict, **changes})


@dataclass(frozen=True)
class Init:
    """How a parameter's initial value is made.

    kinds: zeros, ones, constant(value), normal(mean, std), uniform(low, high),
    kaiming_uniform(a) / kaiming_normal, xavier_uniform / xavier_normal (torch's conventions),
    file(path, key) — an array in a .npz/.npy — and given: the value is in ``Graph.weights``.
    """

    kind: str
    args: Attrs = field(default_factory=Attrs)

    def __init__(self, kind: str, args: Mapping[str, Any] | None = None):
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "args", args if isinstance(args, Attrs) else Attrs(args or {}))


@dataclass(frozen=True)
class Input:
    name: str
    type: TensorType
    loc: SourceLoc | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Param:
    """A weight or buffer. ``trainable=False`` marks buffers (e.g. running statistics)."""

    name: str
    type: TensorType
    init: Init = field(default_factory=lambda: Init("zeros"))
    trainable: bool = True
    loc: SourceLoc | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Node:
    """One op application: ``name = op(inputs...) {attrs} : type``."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Attrs
    type: TensorType
    loc: SourceLoc | None = field(default=None, compare=False)

    def where(self) -> str:
        return f"%{self.name} = {self.op}(...)" + (f" at {self.loc}" if self.loc else "")


@dataclass(frozen=True)
class TrainSpec:
    """The training section: which value is the loss, which inputs are labels, the optimizer."""

    loss: str
    label_inputs: tuple[str, ...]
    optimizer: str
    hyper: Attrs = field(default_factory=Attrs)


@dataclass(frozen=True, eq=False)
class Graph:
    """An immutable typed graph. ``weights`` holds values of params whose init kind is ``given``."""

    name: str
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    train: TrainSpec | None = None
    weights: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        types: dict[str, TensorType] = {}
        defs: dict[str, Input | Param | Node] = {}
        for item in (*self.inputs, *self.params, *self.nodes):
            if item.name in defs:
                raise NameError_(f"duplicate value name '{item.name}' in graph '{self.name}'", item.loc)
            defs[item.name] = item
            types[item.name] = item.type
        object.__setattr__(self, "_types", types)
        object.__setattr__(self, "_defs", defs)

    # lookups
    def type_of(self, name: str) -> TensorType:
        try:
            return self._types[name]
        except KeyError:
            raise NameError_(f"no value named '{name}' in graph '{self.name}'") from None

    def has(self, name: str) -> bool:
        return name in self._defs

    def definition(self, name: str) -> Input | Param | Node:
        self.type_of(name)
        return self._defs[name]

    def node(self, name: str) -> Node:
        item = self.definition(name)
        if not isinstance(item, Node):
            raise NameError_(f"'{name}' is a graph {type(item).__name__.lower()}, not a node")
        return item

    def param(self, name: str) -> Param:
        item = self.definition(name)
        if not isinstance(item, Param):
            raise NameError_(f"'{name}' is not a parameter")
        return item

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def users(self) -> dict[str, list[str]]:
        """value name -> names of the nodes that read it, in order."""
        found: dict[str, list[str]] = {name: [] for name in self._defs}
        for node in self.nodes:
            for src in node.inputs:
                found[src].append(node.name)
        return found

    def replace(self, **changes) -> "Graph":
        return replace(self, **changes)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.type.numel for p in self.params if p.trainable or not trainable_only)

    def __str__(self) -> str:
        from nncompile.ir.text import print_graph

        return print_graph(self)
