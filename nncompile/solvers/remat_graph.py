"""The problem model of recomputation selection: a DAG of ops in a fixed topological order.

Every op ``v`` (numbered 0..n-1 in the given topological order) has a compute ``cost[v]`` and the
``mem[v]`` bytes of its output; ``preds[v]``/``succs[v]`` are its data dependences.  Ops flagged
``backward`` belong to the gradient part (and the loss) of a training graph.  The recomputation
solvers (``remat_exact``, ``remat_fast``) work on this model only, so the compiler pass can build a
``RematGraph`` from its training IR and call them, and ``nncompile remat`` can load one from JSON.

Two JSON flavours are read (networkx node-link data):

* Checkmate's profiled training graphs: nodes ``{"id", "name", "backward", "cost_cpu",
  "cost_ram"}``, links ``{"source", "target"}``, ``id`` a topological order.
* Random layered DAGs (Moccasin): nodes ``{"name", "duration", "out_cost"}``, links
  ``{"0": source, "1": target}``, a topological order in ``graph["order"]``.

Example::

    g = load_graph("vgg16_b256_train.json")
    budget = parse_budget("0.7", plain_peak(g))
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nncompile.errors import InputError, SourceLoc


@dataclass(frozen=True)
class RematGraph:
    """A DAG of ops in topological order (ids 0..n-1) with costs and output bytes."""

    names: tuple[str, ...]
    cost: tuple[float, ...]
    mem: tuple[int, ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    backward: tuple[bool, ...]
    title: str = ""
    ids: tuple = ()          # the ids of the source file (node-link "id"/"name"); default 0..n-1

    def source_id(self, v: int):
        """The id op ``v`` had in the file it was loaded from."""
        return self.ids[v] if self.ids else v

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def num_edges(self) -> int:
        return sum(len(p) for p in self.preds)

    @property
    def total_cost(self) -> float:
        """Compute of one plain forward + backward (every op once)."""
        return float(sum(self.cost))

    def op_footprint(self, v: int) -> int:
        """Bytes resident while ``v`` runs at the very least: its inputs plus its output."""
        return self.mem[v] + sum(self.mem[u] for u in self.preds[v])

    def floor_bytes(self) -> int:
        """No schedule can peak below the largest single op's inputs plus output."""
        return max(self.op_footprint(v) for v in range(self.n)) if self.n else 0


def make_graph(cost, mem, edges, names=None, backward=None, title: str = "", ids=()) -> RematGraph:
    """Build a ``RematGraph`` from lists; ``edges`` are (u, v) pairs that must satisfy u < v."""
    n = len(cost)
    if len(mem) != n:
        raise InputError(f"remat graph: {n} costs but {len(mem)} output sizes")
    preds: list[set[int]] = [set() for _ in range(n)]
    succs: list[set[int]] = [set() for _ in range(n)]
    for u, v in edges:
        if not (0 <= u < n and 0 <= v < n):
            raise InputError(f"remat graph: edge ({u}, {v}) names an op outside 0..{n - 1}")
        if u >= v:
            raise InputError(f"remat graph: edge ({u}, {v}) goes against the topological order")
        preds[v].add(u)
        succs[u].add(v)
    for v in range(n):
        if cost[v] < 0 or mem[v] < 0:
            raise InputError(f"remat graph: op {v} has a negative cost or size")
    return RematGraph(
        names=tuple(str(x) for x in (names if names is not None else range(n))),
        cost=tuple(float(c) for c in cost),
        mem=tuple(int(m) for m in mem),
        preds=tuple(tuple(sorted(p)) for p in preds),
        succs=tuple(tuple(sorted(s)) for s in succs),
        backward=tuple(bool(b) for b in (backward if backward is not None else [False] * n)),
        title=title,
        ids=tuple(ids),
    )


def _field(node: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if key in node:
            return node[key]
    raise InputError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")


def graph_from_node_link(data: dict, source: str = "<graph>") -> RematGraph:
    """Read either JSON flavour (see the module docstring) into a ``RematGraph``."""
    loc = SourceLoc(source, 1)
    if not isinstance(data, dict) or "nodes" not in data:
        raise InputError("not a node-link graph: expected an object with 'nodes' and 'links'", loc)
    nodes = data["nodes"]
    links = data.get("links", data.get("edges", []))
    if not isinstance(nodes, list) or not isinstance(links, list) or not nodes:
        raise InputError("'nodes' must be a non-empty list and 'links' a list", loc)
    key_of = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise InputError(f"node #{i} is not an object", loc)
        key_of.append(node["id"] if "id" in node else _field(node, ("name",), f"node #{i}"))
    index = {}
    for i, key in enumerate(key_of):
        if key in index:
            raise InputError(f"duplicate node id {key!r}", loc)
        index[key] = i
    edges = []
    for j, link in enumerate(links):
        try:
            u = link["source"] if "source" in link else link["0"]
            v = link["target"] if "target" in link else link["1"]
        except (KeyError, TypeError):
            raise InputError(f"link #{j} has no source/target ('source'/'target' or '0'/'1')", loc) from None
        if u not in index or v not in index:
            raise InputError(f"link #{j} ({u!r} -> {v!r}) names an unknown node", loc)
        edges.append((index[u], index[v]))
    order = _topological_order(data.get("graph", {}), key_of, index, edges, loc)
    position = {old: new for new, old in enumerate(order)}
    cost, mem, names, backward = [], [], [], []
    for old in order:
        node = nodes[old]
        where = f"{source}: node {key_of[old]!r}"
        c = _field(node, ("cost_cpu", "duration", "cost"), where)
        m = _field(node, ("cost_ram", "out_cost", "mem"), where)
        if not isinstance(c, (int, float)) or not isinstance(m, (int, float)) or c < 0 or m < 0:
            raise InputError(f"{where}: cost and output size must be non-negative numbers", loc)
        cost.append(c)
        mem.append(int(m))
        names.append(str(node.get("name", key_of[old])))
        backward.append(bool(node.get("backward", False)))
    new_edges = [(position[u], position[v]) for u, v in edges if u != v]
    title = str(data.get("graph", {}).get("name", Path(source).stem)) if isinstance(data.get("graph"), dict) else ""
    return make_graph(cost, mem, new_edges, names, backward, title=title, ids=[key_of[old] for old in order])


def _topological_order(meta, key_of, index, edges, loc) -> list[int]:
    """The given order (``graph.order``, else node ids), checked; else a topological sort."""
    n = len(key_of)
    if isinstance(meta, dict) and isinstance(meta.get("order"), list):
        try:
            order = [index[k] for k in meta["order"]]
        except (KeyError, TypeError):
            raise InputError("graph.order names an unknown node", loc) from None
        if sorted(order) != list(range(n)):
            raise InputError("graph.order is not a permutation of the nodes", loc)
    else:
        order = sorted(range(n), key=lambda i: (not isinstance(key_of[i], (int, float)), key_of[i]))
    position = {v: i for i, v in enumerate(order)}
    if all(position[u] < position[v] for u, v in edges):
        return order
    # not a topological order: sort by Kahn's algorithm, ties in the given order
    import heapq

    indeg = [0] * n
    out = [[] for _ in range(n)]
    for u, v in edges:
        indeg[v] += 1
        out[u].append(v)
    ready = [(position[v], v) for v in range(n) if indeg[v] == 0]
    heapq.heapify(ready)
    result = []
    while ready:
        _, u = heapq.heappop(ready)
        result.append(u)
        for v in out[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(ready, (position[v], v))
    if len(result) != n:
        raise InputError("the graph has a cycle", loc)
    return result


def load_graph(path: str | Path) -> RematGraph:
    """Load a node-link JSON graph file; bad files raise a located ``InputError``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read graph file {path}: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        lines = text.splitlines()
        line = lines[err.lineno - 1] if 0 < err.lineno <= len(lines) else None
        loc = SourceLoc(str(path), err.lineno, err.colno, line if line is not None and len(line) < 300 else None)
        raise InputError(f"invalid JSON: {err.msg}", loc) from None
    graph = graph_from_node_link(data, str(path))
    return graph


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_budget(text: str | float | int, peak0: int) -> int:
    """A budget in bytes from ``0.7`` / ``70%`` (of the plain peak ``peak0``) or ``12e9`` / ``12GB``.

    A plain number up to 1 (or one with a decimal point below 10) is a fraction of the plain
    peak; a larger integer, or a number with a unit, is bytes.
    """
    raw = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|[a-zA-Z]*)", raw)
    if not match:
        raise InputError(f"budget {raw!r}: expected a fraction (0.7), a percentage (70%) or bytes (12e9, 12GB)")
    value = float(match.group(1))
    unit = match.group(2).lower()
    if unit == "%":
        fraction = value / 100.0
    elif unit:
        if unit not in _UNITS:
            raise InputError(f"budget {raw!r}: unknown unit {match.group(2)!r}")
        return _positive(int(value * _UNITS[unit]), raw)
    elif value <= 1.0 or ("." in match.group(1) and "e" not in match.group(1).lower() and value < 10):
        fraction = value
    else:
        return _positive(int(value), raw)
    if fraction <= 0:
        raise InputError(f"budget {raw!r} must be positive")
    return int(fraction * peak0)


def _positive(value: int, raw: str) -> int:
    if value <= 0:
        raise InputError(f"budget {raw!r} must be positive")
    return value
