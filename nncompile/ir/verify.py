"""The verifier: checks a graph's invariants. Runs between passes in tests.

Invariants: names unique (checked when a Graph is made); every node reads only values defined before
it (topological order); every op exists, has the right number of inputs and canonical attributes;
every node's type equals what its op's ``infer`` rule gives; outputs and the training spec name
existing values; ``given`` parameters have values of the right shape.
"""
from __future__ import annotations

from nncompile.errors import NNError, VerifyError
from nncompile.ir.graph import Graph
from nncompile.ops.base import get_op


def verify(graph: Graph) -> Graph:
    """Raise VerifyError listing the first problem found; return the graph when it is valid."""
    defined = {item.name: item.type for item in (*graph.inputs, *graph.params)}
    for p in graph.params:
        if p.init.kind == "given":
            value = graph.weights.get(p.name)
            if value is None:
                raise VerifyError(f"parameter '{p.name}' is 'given' but has no value", p.loc)
            if tuple(value.shape) != p.type.shape:
                raise VerifyError(f"parameter '{p.name}' value has shape {list(value.shape)}, type is {p.type}", p.loc)
    for node in graph.nodes:
        where = node.where()
        for src in node.inputs:
            if src not in defined:
                raise VerifyError(f"{where}: reads '{src}', which is not defined before it", node.loc)
        try:
            opdef = get_op(node.op)
            opdef.check_arity(len(node.inputs))
            bound = opdef.bind_attrs(dict(node.attrs), [defined[s] for s in node.inputs])
            if bound != dict(node.attrs):
                raise VerifyError(f"attributes {dict(node.attrs)} are not canonical (expected {bound})")
            expected = opdef.infer(*opdef.split_inputs([defined[s] for s in node.inputs]), **bound)
        except NNError as err:
            raise VerifyError(f"{where}: {err.message}", node.loc) from err
        if expected != node.type:
            raise VerifyError(f"{where}: type is {node.type}, but {node.op} gives {expected}", node.loc)
        defined[node.name] = node.type
    for name in graph.outputs:
        if name not in defined:
            raise VerifyError(f"output '{name}' is not defined")
    if graph.train is not None:
        if graph.train.loss not in defined:
            raise VerifyError(f"training loss '{graph.train.loss}' is not defined")
        if defined[graph.train.loss].numel != 1:
            raise VerifyError(f"training loss '{graph.train.loss}' is not a scalar ({defined[graph.train.loss]})")
        for label in graph.train.label_inputs:
            if label not in graph.input_names:
                raise VerifyError(f"training label '{label}' is not a graph input")
    return graph
