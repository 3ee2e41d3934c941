"""Reverse-mode autodiff in the IR: forward + loss -> one graph that also computes every gradient.

    tg = training_graph(graph)           # graph.train names the loss, labels and optimizer
    tg.graph.outputs == (loss, *grads, *updates)

Each op's ``vjp`` rule builds its input gradients from other ops (``nncompile/ops/grads.py``), so the
backward pass goes through the same passes and emitters as the forward one. Before differentiating,
the graph is put in training mode (as torch's ``module.train()``): dropout nodes draw a fresh mask each
step (their seed is offset by the ``step`` input) and batch norm normalizes with batch statistics,
its running statistics becoming ``updates`` (new values written back to the buffers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nncompile.errors import NNError, ShapeError, UnsupportedError
from nncompile.ir.builder import GraphBuilder, prune
from nncompile.ir.graph import Attrs, Graph, Node
from nncompile.ir.types import TensorType
from nncompile.ops.base import get_op

STEP_INPUT = "step"
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class TrainingGraph:
    """A graph whose outputs are the loss, then one gradient per trainable parameter (``grads``:
    param -> value), then the new values of buffers (``updates``: buffer -> value)."""

    graph: Graph
    loss: str
    grads: dict[str, str]
    updates: dict[str, str] = field(default_factory=dict)
    step_input: str | None = None


class GradContext:
    """What a vjp rule uses to build gradient ops."""

    def __init__(self, builder: GraphBuilder, node: Node):
        self.b = builder
        self.node = node

    def op(self, op: str, inputs, **attrs) -> str:
        return self.b.op(op, list(inputs), attrs, name=f"d_{self.node.name}_{op}", loc=self.node.loc)

    def type(self, name: str) -> TensorType:
        return self.b.type_of(name)

    def const(self, value: float, dtype: str | None = None) -> str:
        """A scalar constant, by default of the node's own (float) dtype."""
        return self.op("full", [], shape=(), value=float(value), dtype=dtype or self.node.type.dtype)

    def unbroadcast(self, grad: str, shape: tuple[int, ...]) -> str:
        """Sum ``grad`` over the axes along which a value of ``shape`` was broadcast."""
        gshape = self.type(grad).shape
        if gshape == tuple(shape):
            return grad
        lead = len(gshape) - len(shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and gshape[lead + i] != 1)
        if axes:
            grad = self.op("sum", [grad], axes=axes, keepdim=False)
        if self.type(grad).shape != tuple(shape):
            grad = self.op("reshape", [grad], shape=tuple(shape))
        return grad


def training_mode(graph: Graph) -> tuple[Graph, dict[str, tuple[str, str]], str | None]:
    """Dropout on (seeded by a ``step`` input), batch norm on batch statistics.

    Returns the new graph, ``{batch_norm node: (running_mean, running_var)}`` and the step input name.
    """
    b = GraphBuilder(graph.name)
    for item in graph.inputs:
        b.input(item.name, item.type, item.loc)
    needs_step = any(n.op == "dropout" and n.attrs["p"] > 0 for n in graph.nodes)
    step = b.input(b.fresh(STEP_INPUT), TensorType((), "i64")) if needs_step else None
    for p in graph.params:
        b.param(p.name, p.type, p.init, trainable=p.trainable, loc=p.loc, value=graph.weights.get(p.name))
    norms = {}
    for node in graph.nodes:
        if node.op == "dropout" and node.attrs["p"] > 0:
            attrs = dict(node.attrs, training=True)
            b.add_node(Node(node.name, node.op, (node.inputs[0], step), Attrs(attrs), node.type, node.loc))
        elif node.op == "batch_norm":
            b.add_node(Node(node.name, node.op, node.inputs, node.attrs.updated(training=True), node.type, node.loc))
            norms[node.name] = (node.inputs[1], node.inputs[2])
        else:
            b.add_node(node)
    b.outputs = list(graph.outputs)
    b.train = graph.train
    return b.build(), norms, step


def _running_stat_updates(b: GraphBuilder, graph: Graph, norms: dict[str, tuple[str, str]]) -> dict[str, str]:
    updates = {}
    for node_name, (mean_name, var_name) in norms.items():
        node = graph.node(node_name)
        x = node.inputs[0]
        xt = graph.type_of(x)
        axes = (0,) + tuple(range(2, xt.rank))
        count = xt.numel // xt.shape[1]
        loc = node.loc
        batch_mean = b.op("mean", [x], {"axes": axes, "keepdim": False}, loc=loc, name=f"{node_name}_batch_mean")
        centered = b.op("sub", [x, b.op("reshape", [batch_mean], {"shape": (1, -1) + (1,) * (xt.rank - 2)}, loc=loc)], loc=loc)
        sq = b.op("mean", [b.op("mul", [centered, centered], loc=loc)], {"axes": axes, "keepdim": False}, loc=loc)
        unbiased = b.op("scale", [sq], {"factor": count / max(count - 1, 1)}, loc=loc)
        for stat, fresh in ((mean_name, batch_mean), (var_name, unbiased)):
            old = b.op("scale", [stat], {"factor": 1.0 - BN_MOMENTUM}, loc=loc)
            new = b.op("add", [old, b.op("scale", [fresh], {"factor": BN_MOMENTUM}, loc=loc)], loc=loc,
                       name=f"{stat}_new")
            updates[stat] = new
    return updates


def differentiate(graph: Graph, loss: str, wrt: list[str]) -> tuple[GraphBuilder, dict[str, str]]:
    """Append the backward pass of ``loss`` to ``graph``; returns the builder and {value: its gradient}."""
    if graph.type_of(loss).numel != 1:
        raise ShapeError(f"the loss '{loss}' must be a scalar, got {graph.type_of(loss)}")
    b = GraphBuilder.from_graph(graph)
    wanted = set(wrt)
    # values on a path from a parameter we differentiate to the loss
    depends = set(wanted)
    for node in graph.nodes:
        if any(src in depends for src in node.inputs):
            depends.add(node.name)
    contributions: dict[str, list[str]] = {loss: [b.op("full", [], {"shape": graph.type_of(loss).shape, "value": 1.0,
                                                                     "dtype": graph.type_of(loss).dtype},
                                                       name="d_loss_seed")]}
    grads: dict[str, str] = {}

    def total(name: str) -> str | None:
        parts = contributions.get(name)
        if not parts:
            return None
        value = parts[0]
        for part in parts[1:]:
            value = b.op("add", [value, part], name=f"d_{name}_acc")
        return value

    for node in reversed(graph.nodes):
        if node.name not in depends:
            continue
        out_grad = total(node.name)
        if out_grad is None:
            continue
        opdef = get_op(node.op)
        vjp = opdef.vjp
        if node.op == "linear" and graph.type_of(node.inputs[1]).sparsity is not None:
            from nncompile.ops.sparse import vjp_sparse_linear as vjp   # dW on the fixed pattern only
        if vjp is None:
            raise UnsupportedError(f"cannot differentiate through op '{node.op}' (it has no vjp rule)", node.loc)
        try:
            in_grads = vjp(GradContext(b, node), node, out_grad, *node.inputs)
        except NNError as err:
            raise err.with_loc(node.loc)
        for src, g in zip(node.inputs, in_grads):
            if g is None or src not in depends:
                continue
            if b.type_of(g).shape != graph.type_of(src).shape:
                raise ShapeError(f"vjp of {node.op} gave a gradient of shape {b.type_of(g)} for {graph.type_of(src)}",
                                 node.loc)
            contributions.setdefault(src, []).append(g)
    for name in wrt:
        g = total(name)
        if g is None:
            g = b.op("full", [], {"shape": graph.type_of(name).shape, "value": 0.0, "dtype": graph.type_of(name).dtype},
                     name=f"d_{name}_zero")
        producer = next((n.op for n in reversed(b.nodes) if n.name == g), "")
        if graph.type_of(name).sparsity is not None and producer != "sparse_weight_grad":
            from nncompile.ops import sparse  # noqa: F401  (defines sparse_mask)
            g = b.op("sparse_mask", [g, name], name=f"d_{name}_masked")   # the pattern never changes
        grads[name] = g
    return b, grads


def training_graph(graph: Graph, loss: str | None = None) -> TrainingGraph:
    """Forward + loss + backward (+ batch-norm running statistics) in one graph."""
    if loss is None:
        if graph.train is None:
            raise ShapeError(f"model '{graph.name}' has no training section (a loss to differentiate)")
        loss = graph.train.loss
    trained, norms, step = training_mode(graph)
    keep = prune(trained, [loss], keep_inputs=True)
    params = [p.name for p in keep.params if p.trainable and p.type.is_float]
    b, grads = differentiate(keep, loss, params)
    updates = _running_stat_updates(b, keep, norms)
    grad_values = []
    for name in params:
        value = grads[name]
        if value in grad_values or value == loss or not b.has(value):
            value = b.op("identity", [value], name=f"grad_{name}")
        grad_values.append(value)
        grads[name] = value
    b.outputs = [loss] + grad_values + list(updates.values())
    b.train = graph.train
    g = prune(b.build(), keep_inputs=True)
    return TrainingGraph(g, loss, grads, updates, step)


def with_loss(graph: Graph, loss: str) -> Graph:
    """Add a loss on the graph's single output: ``cross_entropy`` against an i64 ``labels`` input
    (logits [N, C]) or ``mse`` against an f32 ``target`` input of the output's shape."""
    from nncompile.ir.graph import TrainSpec

    if len(graph.outputs) != 1:
        raise ShapeError(f"loss='{loss}' needs a model with one output, '{graph.name}' has {len(graph.outputs)}")
    out = graph.outputs[0]
    t = graph.type_of(out)
    b = GraphBuilder.from_graph(graph, keep_outputs=True)
    if loss == "cross_entropy":
        if t.rank != 2:
            raise ShapeError(f"loss='cross_entropy' needs [N, C] logits, the output is {t}")
        labels = b.input(b.fresh("labels"), TensorType(t.shape[:1], "i64"))
    elif loss == "mse":
        labels = b.input(b.fresh("target"), t.dense())
    else:
        raise ShapeError(f"unknown loss '{loss}' (expected 'cross_entropy' or 'mse')")
    value = b.op("cross_entropy" if loss == "cross_entropy" else "mse_loss", [out, labels], name="loss")
    b.train = TrainSpec(value, (labels,), graph.train.optimizer if graph.train else "sgd",
                        graph.train.hyper if graph.train else Attrs())
    return b.build()
