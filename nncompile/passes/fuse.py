"""fuse: group elementwise chains, and the GEMM/conv that feeds them, into ``fused`` nodes.

Needs: a valid graph. Guarantees: same values at every output (``interp(fuse(g)) == interp(g)``),
fused nodes keep the name of their last step, so outputs are unchanged. A group is a tree of
elementwise nodes whose inner values have exactly one reader (the group) and are not graph outputs,
optionally headed by one ``linear``/``matmul``/``conv2d`` whose output has the group's full shape
(so its epilogue runs on the GEMM tile). Reports: groups made, nodes fused, bytes of intermediate
traffic saved.

    graph, report = fuse(graph, FuseOptions())
"""
from __future__ import annotations

from dataclasses import dataclass

from nncompile.ir.graph import Attrs, Graph, Node
from nncompile.ops.base import get_op
from nncompile.passes.base import PassReport, Timer

ELEMENTWISE = frozenset({
    "relu", "gelu", "tanh", "sigmoid", "silu", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf",
    "leaky_relu", "clamp", "scale", "add_scalar", "pow_scalar", "add", "sub", "mul", "div", "maximum",
    "minimum", "where", "dropout", "identity", "gt", "ge", "eq",
})
HEADS = frozenset({"linear", "matmul", "conv2d"})


@dataclass(frozen=True)
class FuseOptions:
    elementwise: bool = True
    epilogue: bool = True


@dataclass
class _Group:
    members: list[Node]

    @property
    def result(self) -> Node:
        return self.members[-1]

    @property
    def head(self) -> Node | None:
        return next((m for m in self.members if m.op in HEADS), None)


def _broadcasts_to(shape: tuple[int, ...], final: tuple[int, ...]) -> bool:
    if len(shape) > len(final):
        return False
    return all(d in (1, f) for d, f in zip(reversed(shape), reversed(final)))


def _can_absorb(group: _Group, final_shape: tuple[int, ...]) -> bool:
    for member in group.members:
        if member.op in HEADS or member.op == "dropout":
            if member.type.shape != final_shape:
                return False
        elif not _broadcasts_to(member.type.shape, final_shape):
            return False
    return True


def fuse(graph: Graph, options: FuseOptions = FuseOptions()) -> tuple[Graph, PassReport]:
    with Timer() as timer:
        users = graph.users()
        outputs = set(graph.outputs) | ({graph.train.loss} if graph.train else set())
        group_of: dict[str, _Group] = {}
        for node in graph.nodes:
            group = _Group([node])
            if node.op in ELEMENTWISE and options.elementwise:
                for src in dict.fromkeys(node.inputs):
                    producer = group_of.get(src)
                    if producer is None or producer.result.name != src:
                        continue
                    if any(m.op not in ELEMENTWISE and m.op not in HEADS for m in producer.members):
                        continue
                    if len(set(users[src])) != 1 or src in outputs:
                        continue
                    if producer.head is not None and (group.head is not None or not options.epilogue):
                        continue
                    if not _can_absorb(producer, node.type.shape) or not _can_absorb(group, node.type.shape):
                        continue
                    group = _Group(sorted(producer.members + group.members, key=_order(graph)))
            for member in group.members:
                group_of[member.name] = group
        nodes, made, fused_count, saved = [], 0, 0, 0
        emitted = set()
        for node in graph.nodes:
            group = group_of[node.name]
            if group.result.name != node.name or id(group) in emitted:
                continue
            emitted.add(id(group))
            if len(group.members) == 1:
                nodes.append(node)
                continue
            nodes.append(_make_fused(group))
            made += 1
            fused_count += len(group.members)
            saved += 2 * sum(m.type.nbytes for m in group.members[:-1])
        fused_graph = graph.replace(nodes=tuple(nodes))
    report = PassReport("fuse", {"groups": made, "nodes_fused": fused_count, "intermediate_bytes_saved": saved},
                        seconds=timer.seconds)
    return fused_graph, report


def _order(graph: Graph):
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    return lambda node: position[node.name]


def _make_fused(group: _Group) -> Node:
    local = {m.name: f"t{i}" for i, m in enumerate(group.members)}
    externals: list[str] = []
    body = []
    for member in group.members:
        args = []
        for src in member.inputs:
            if src in local:
                args.append(local[src])
            else:
                if src not in externals:
                    externals.append(src)
                args.append(f"x{externals.index(src)}")
        body.append((member.op, tuple(args), tuple(member.attrs.items())))
    result = group.result
    opdef = get_op("fused")
    attrs = opdef.bind_attrs({"body": tuple(body)})
    return Node(result.name, "fused", tuple(externals), Attrs(attrs), result.type, result.loc)
