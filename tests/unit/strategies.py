"""Hypothesis strategies for random *valid* IR graphs, built through ``GraphBuilder`` (shared by tests).

pytest puts this folder on ``sys.path`` for the tests in it, so a test file imports it directly:

    from strategies import graphs, random_inputs

    @given(graphs(max_nodes=8))
    def test_something(graph):
        outs = run(graph, random_inputs(graph, seed=0))

``graphs()`` draws a DAG (values are reused, some results are dead ends) of elementwise ops, matmul /
linear, conv2d / pooling, reshape / transpose / permute / concat / slice / (un)squeeze, softmax, layer
and batch norm, reductions and dropout, with parameters of every initializer kind (``given`` values
included), sparse weight types (unstructured, block, N:M), attributes of every value kind (floats such
as 1e-5 and inf, tuples, strings, None, bools), source locations on some values, and optionally a
training section (a loss node, label inputs, optimizer hyper-parameters). Every tensor stays small
(at most ``MAX_ELEMENTS`` elements) so the interpreter runs a graph in milliseconds.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from nncompile.errors import SourceLoc
from nncompile.ir import Graph, GraphBuilder, Init, Sparsity, TensorType, TrainSpec
from nncompile.ir.graph import Attrs

MAX_ELEMENTS = 1024
DIMS = st.integers(1, 5)
FILES = st.sampled_from(["model.nn", "nets/gpt.nn", "my model.nn", 'q"uote.nn', "back\\slash.nn"])

UNARY = ["relu", "tanh", "sigmoid", "silu", "neg", "abs", "erf", "identity"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]
STEPS = ["unary", "unary_attr", "binary", "bias", "linear", "matmul", "reshape", "flatten", "transpose", "permute",
         "concat", "slice", "expand", "softmax", "layer_norm", "batch_norm", "reduce", "unsqueeze", "squeeze",
         "dropout", "conv", "pool", "attention", "embedding", "where"]


def shapes(min_dims: int = 1, max_dims: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(DIMS, min_size=min_dims, max_size=max_dims).map(tuple)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def inits(draw, shape: tuple[int, ...] = (4, 4)) -> Init:
    """An initializer of any kind but ``file``/``given`` (those need data outside the text)."""
    kind = draw(st.sampled_from(["zeros", "ones", "constant", "normal", "uniform", "kaiming_uniform",
                                 "kaiming_normal", "xavier_uniform", "xavier_normal"]))
    small = st.sampled_from([1e-5, 0.02, 0.5, 1.0, 2.5e-3, 1 / 3])
    if kind == "constant":
        return Init(kind, {"value": draw(small | st.integers(-3, 3))})
    if kind == "normal":
        return Init(kind, draw(st.fixed_dictionaries({}, optional={"mean": st.sampled_from([0.0, -1.5]),
                                                                     "std": small})))
    if kind == "uniform":
        low = draw(st.sampled_from([-1.0, -0.1, 0.0]))
        return Init(kind, {"low": low, "high": low + draw(small)})
    if kind == "kaiming_uniform":
        return Init(kind, draw(st.sampled_from([{}, {"a": math.sqrt(5)}, {"a": 0}])))
    if kind in ("xavier_uniform", "xavier_normal"):
        return Init(kind, draw(st.sampled_from([{}, {"gain": 1.0}, {"gain": 5 / 3}])))
    return Init(kind)


@st.composite
def sparsities(draw, shape: tuple[int, ...]) -> Sparsity | None:
    """A sparsity pattern that fits a weight of ``shape`` (or None)."""
    kinds = ["dense", "unstructured"]
    if len(shape) == 2:
        kinds.append("block")
    if shape and shape[-1] > 1:
        kinds.append("nm")
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    if kind == "unstructured":
        return Sparsity("unstructured", density=draw(st.sampled_from([0.1, 0.25, 0.5, 1.0, 0.0])), seed=seed)
    if kind == "block":
        block = (draw(st.sampled_from(divisors(shape[0]))), draw(st.sampled_from(divisors(shape[1]))))
        return Sparsity("block", density=draw(st.sampled_from([0.5, 0.25, 1.0])), seed=seed, block=block)
    if kind == "nm":
        m = draw(st.sampled_from(divisors(shape[-1])[1:]))
        return Sparsity("nm", n=draw(st.integers(1, m)), m=m, seed=seed)
    return None


class _Drawer:
    """Grows one graph step by step; ``pool`` holds the float values ops may read."""

    def __init__(self, draw, dtype: str):
        self.draw = draw
        self.dtype = dtype
        self.b = GraphBuilder(draw(st.sampled_from(["main", "mlp", "net_1", "g.v2"])))
        self.pool: list[str] = []
        self.params = 0

    def loc(self) -> SourceLoc | None:
        if not self.draw(st.booleans()):
            return None
        return SourceLoc(self.draw(FILES), self.draw(st.integers(1, 500)), self.draw(st.integers(1, 80)))

    def type(self, name: str) -> TensorType:
        return self.b.type_of(name)

    def pick(self, where=lambda t: True) -> str | None:
        found = [v for v in self.pool if where(self.type(v))]
        return self.draw(st.sampled_from(found)) if found else None

    def param(self, base: str, shape: tuple[int, ...], *, sparse: bool = False, trainable: bool = True,
              init: Init | None = None) -> str:
        self.params += 1
        name = self.b.fresh(f"{base}{self.params}.{self.draw(st.sampled_from(['weight', 'bias', 'w', 'p']))}")
        sparsity = self.draw(sparsities(shape)) if sparse else None
        type_ = TensorType(shape, self.dtype, sparsity)
        if init is None and self.draw(st.integers(0, 5)) == 0:
            value = np.random.default_rng(self.params).standard_normal(shape)
            return self.b.param(name, type_, trainable=trainable, value=value.astype(self.dtype_np()), loc=self.loc())
        return self.b.param(name, type_, init or self.draw(inits(shape)), trainable=trainable, loc=self.loc())

    def dtype_np(self):
        return np.float32 if self.dtype == "f32" else np.float64

    def op(self, op: str, inputs: list[str], attrs: dict | None = None, keep: bool = True) -> str:
        name = self.draw(st.sampled_from([None, None, op, f"h.{op}"]))
        out = self.b.op(op, inputs, attrs or {}, name=name, loc=self.loc())
        if keep and 1 <= self.type(out).numel <= MAX_ELEMENTS and self.type(out).rank >= 1:
            self.pool.append(out)
        return out

    # one step of each kind; a step returns False when nothing in the pool fits it
    def step(self, kind: str) -> bool:
        return getattr(self, f"step_{kind}")()

    def step_unary(self):
        self.op(self.draw(st.sampled_from(UNARY)), [self.pick()])
        return True

    def step_unary_attr(self):
        x = self.pick()
        choice = self.draw(st.integers(0, 4))
        if choice == 0:
            self.op("gelu", [x], {"approximate": self.draw(st.sampled_from(["none", "tanh"]))})
        elif choice == 1:
            slope = self.draw(st.sampled_from([{}, {"negative_slope": 1e-5}, {"negative_slope": 0.2}]))
            self.op("leaky_relu", [x], slope)
        elif choice == 2:
            bounds = self.draw(st.sampled_from([(None, 6.0), (-1.0, None), (-math.inf, 0.5), (0.0, math.inf),
                                                (None, None), (-2, 2)]))
            self.op("clamp", [x], {"min": bounds[0], "max": bounds[1]})
        elif choice == 3:
            self.op("scale", [x], {"factor": self.draw(st.sampled_from([0.5, -2, 1e-5, 1 / 7]))})
        else:
            self.op("add_scalar", [x], {"value": self.draw(st.sampled_from([1, -0.25, 3e-3]))})
        return True

    def step_binary(self):
        a = self.pick()
        shape = self.type(a).shape
        partners = [v for v in self.pool if self.type(v).shape in (shape, shape[1:], shape[-1:], ())]
        if self.draw(st.booleans()) and partners:
            b = self.draw(st.sampled_from(partners))
        else:
            b = self.param("t", shape[self.draw(st.integers(0, len(shape))):])
        args = [a, b] if self.draw(st.booleans()) else [b, a]
        self.op(self.draw(st.sampled_from(BINARY)), args)
        return True

    def step_bias(self):
        x = self.pick()
        self.op("add", [x, self.param("b", self.type(x).shape[-1:], init=Init("zeros"))])
        return True

    def step_linear(self):
        x = self.pick()
        fin, fout = self.type(x).shape[-1], self.draw(DIMS)
        if self.type(x).numel // fin * fout > MAX_ELEMENTS:
            return False
        inputs = [x, self.param("fc", (fout, fin), sparse=True)]
        if self.draw(st.booleans()):
            inputs.append(self.param("fc", (fout,)))
        self.op("linear", inputs)
        return True

    def step_matmul(self):
        a = self.pick(lambda t: t.rank >= 2)
        if a is None:
            return False
        k, n = self.type(a).shape[-1], self.draw(DIMS)
        if self.type(a).numel // k * n > MAX_ELEMENTS:
            return False
        self.op("matmul", [a, self.param("mm", (k, n), sparse=True)])
        return True

    def step_reshape(self):
        x = self.pick()
        shape = self.type(x).shape
        form = self.draw(st.integers(0, 2))
        if form == 0:
            target = (-1,)
        elif form == 1:
            target = tuple(self.draw(st.permutations(shape)))
        else:
            target = (shape[0], -1) if len(shape) > 1 else (1, shape[0])
        self.op("reshape", [x], {"shape": target})
        return True

    def step_flatten(self):
        x = self.pick(lambda t: t.rank >= 2)
        if x is None:
            return False
        rank = self.type(x).rank
        start = self.draw(st.integers(0, rank - 1))
        end = self.draw(st.integers(start, rank - 1))
        self.op("flatten", [x], {"start": start, "end": end - rank if self.draw(st.booleans()) else end})
        return True

    def step_expand(self):
        x = self.pick(lambda t: 1 in t.shape)
        if x is None:
            return False
        target = tuple(self.draw(st.integers(1, 3)) if d == 1 else self.draw(st.sampled_from([d, -1]))
                       for d in self.type(x).shape)
        if math.prod(abs(d) for d in target) * self.type(x).numel > MAX_ELEMENTS:
            return False
        self.op("expand", [x], {"shape": target})
        return True

    def step_attention(self):
        q = self.pick(lambda t: t.rank >= 2)
        if q is None:
            return False
        shape = self.type(q).shape
        keys = self.draw(DIMS)
        k = self.param("attn", shape[:-2] + (keys, shape[-1]))
        v = self.param("attn", shape[:-2] + (keys, self.draw(DIMS)))
        self.op("sdpa", [q, k, v], {"causal": self.draw(st.booleans()),
                                    "scale": self.draw(st.sampled_from([None, 0.125, 1]))})
        return True

    def step_embedding(self):
        vocab, dim = self.draw(DIMS), self.draw(DIMS)
        ids_type = TensorType(self.draw(shapes(1, 2)), self.draw(st.sampled_from(["i64", "i32"])))
        ids = self.b.input(self.b.fresh("ids"), ids_type, self.loc())
        self.op("embedding", [ids, self.param("emb", (vocab, dim))])
        return True

    def step_where(self):
        a = self.pick()
        shape = self.type(a).shape
        cond = self.b.input(self.b.fresh("mask"), TensorType(shape[self.draw(st.integers(0, len(shape) - 1)):], "bool"),
                            self.loc())
        b = self.pick(lambda t: t.shape == shape) or a
        self.op("where", [cond, a, b])
        return True

    def step_transpose(self):
        x = self.pick(lambda t: t.rank >= 2)
        if x is None:
            return False
        rank = self.type(x).rank
        self.op("transpose", [x], {"dim0": self.draw(st.integers(-rank, rank - 1)),
                                   "dim1": self.draw(st.integers(-rank, rank - 1))})
        return True

    def step_permute(self):
        x = self.pick()
        self.op("permute", [x], {"dims": tuple(self.draw(st.permutations(range(self.type(x).rank))))})
        return True

    def step_concat(self):
        x = self.pick()
        shape = self.type(x).shape
        axis = self.draw(st.integers(0, len(shape) - 1))
        same = [v for v in self.pool if self.type(v).rank == len(shape)
                and all(d == e for i, (d, e) in enumerate(zip(self.type(v).shape, shape)) if i != axis)]
        parts = self.draw(st.lists(st.sampled_from(same), min_size=1, max_size=3))
        if sum(self.type(p).numel for p in parts) > MAX_ELEMENTS:
            return False
        self.op("concat", parts, {"axis": axis - len(shape) if self.draw(st.booleans()) else axis})
        return True

    def step_slice(self):
        x = self.pick()
        rank = self.type(x).rank
        axis = self.draw(st.integers(-rank, rank - 1))
        size = self.type(x).shape[axis]
        start = self.draw(st.integers(0, size - 1))          # non-empty results, start and end in any spelling
        end = self.draw(st.none() | st.integers(start + 1, size + 2))
        if self.draw(st.booleans()):
            start -= size
        if end is not None and end <= size and self.draw(st.booleans()):
            end -= size
        self.op("slice", [x], {"axis": axis, "start": start, "end": end, "step": self.draw(st.integers(1, 3))})
        return True

    def step_softmax(self):
        x = self.pick()
        rank = self.type(x).rank
        self.op(self.draw(st.sampled_from(["softmax", "log_softmax"])), [x],
                {"axis": self.draw(st.integers(-rank, rank - 1))})
        return True

    def step_layer_norm(self):
        x = self.pick()
        ndim = self.draw(st.integers(1, self.type(x).rank))
        inner = self.type(x).shape[self.type(x).rank - ndim:]
        inputs = [x]
        if self.draw(st.booleans()):
            inputs += [self.param("ln", inner, init=Init("ones")), self.param("ln", inner, init=Init("zeros"))]
        self.op("layer_norm", inputs, {"normalized_ndim": ndim, "eps": self.draw(st.sampled_from([1e-5, 1e-6, 0.1]))})
        return True

    def step_batch_norm(self):
        x = self.pick(lambda t: 2 <= t.rank <= 5)
        if x is None:
            return False
        c = self.type(x).shape[1]
        mean = self.param("bn", (c,), trainable=False, init=Init("zeros"))
        var = self.param("bn", (c,), trainable=False, init=Init("uniform", {"low": 0.5, "high": 1.5}))
        inputs = [x, mean, var]
        if self.draw(st.booleans()):
            inputs += [self.param("bn", (c,), init=Init("ones")), self.param("bn", (c,))]
        self.op("batch_norm", inputs, {"eps": 1e-5, "training": self.draw(st.booleans())})
        return True

    def step_reduce(self):
        x = self.pick(lambda t: t.rank >= 2)
        if x is None:
            return False
        rank = self.type(x).rank
        axes = self.draw(st.none() | st.integers(0, rank - 1)   # canonical: non-negative (see ops/README.md)
                         | st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True).map(tuple))
        keepdim = self.draw(st.booleans())
        if axes is None and not keepdim:
            keepdim = True   # keep results of rank >= 1 in the pool
        self.op(self.draw(st.sampled_from(["sum", "mean", "max"])), [x], {"axes": axes, "keepdim": keepdim})
        return True

    def step_unsqueeze(self):
        x = self.pick(lambda t: t.rank <= 4)
        if x is None:
            return False
        rank = self.type(x).rank
        self.op("unsqueeze", [x], {"axis": self.draw(st.integers(-rank - 1, rank))})
        return True

    def step_squeeze(self):
        x = self.pick(lambda t: t.rank >= 2 and 1 in t.shape)
        if x is None:
            return False
        ones = [i for i, d in enumerate(self.type(x).shape) if d == 1][: self.type(x).rank - 1]
        self.op("squeeze", [x], {"axes": tuple(self.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True)))})
        return True

    def step_dropout(self):
        x = self.pick()
        self.op("dropout", [x], {"p": self.draw(st.sampled_from([0.0, 0.1, 0.5])),
                                 "seed": self.draw(st.integers(0, 99)),
                                 "training": self.draw(st.booleans())})
        return True

    def step_conv(self):
        x = self.pick(lambda t: t.rank == 4)
        if x is None:
            x = self.b.input(self.b.fresh("image"), TensorType((self.draw(st.integers(1, 2)), self.draw(DIMS),
                                                                self.draw(st.integers(3, 8)),
                                                                self.draw(st.integers(3, 8))), self.dtype),
                             self.loc())
        n, c, h, w = self.type(x).shape
        kernel = self.draw(st.integers(1, min(h, w, 3)))
        out = self.draw(DIMS)
        if n * out * (h + 2) * (w + 2) > MAX_ELEMENTS:
            return False
        weight = self.param("conv", (out, c, kernel, kernel), init=Init("kaiming_normal"))
        attrs = {"stride": self.draw(st.sampled_from([1, 2, (1, 2)])), "padding": self.draw(st.sampled_from([0, 1]))}
        self.op("conv2d", [x, weight], attrs)
        return True

    def step_pool(self):
        x = self.pick(lambda t: t.rank == 4 and min(t.shape[2:]) >= 2)
        if x is None:
            return False
        if self.draw(st.booleans()):
            self.op("max_pool2d", [x], {"kernel": 2, "ceil_mode": self.draw(st.booleans())})
        elif self.draw(st.booleans()):
            self.op("avg_pool2d", [x], {"kernel": (2, 1), "stride": 1, "count_include_pad": False})
        else:
            self.op("global_avg_pool2d", [x])
        return True


@st.composite
def graphs(draw, max_nodes: int = 10, train: bool | None = None, steps: list[str] | None = None,
           dtype: str | None = None) -> Graph:
    """A random valid graph of 1..max_nodes steps.

    ``train`` forces (True) or forbids (False) a training section; ``steps`` restricts the kinds of
    steps (names from ``STEPS``); ``dtype`` fixes the float dtype (default: f32 mostly, some f64).
    """
    d = _Drawer(draw, dtype or draw(st.sampled_from(["f32", "f32", "f64"])))
    for _ in range(draw(st.integers(1, 2))):
        d.pool.append(d.b.input(d.b.fresh("x"), TensorType(draw(shapes()), d.dtype), d.loc()))
    for _ in range(draw(st.integers(1, max_nodes))):
        kind = draw(st.sampled_from(steps or STEPS))
        if not d.step(kind):
            d.step("unary")
    nodes = [n.name for n in d.b.nodes]
    outputs = [nodes[-1]] + draw(st.lists(st.sampled_from(nodes), max_size=2, unique=True))
    d.b.output(*dict.fromkeys(outputs))
    with_training = draw(st.integers(0, 3)) == 0 if train is None else train
    if with_training:
        _add_training(d, nodes[-1])
    return d.b.build()


def _add_training(d: _Drawer, value: str) -> None:
    t = d.type(value)
    if t.rank == 2 and d.draw(st.booleans()):
        labels = d.b.input(d.b.fresh("labels"), TensorType(t.shape[:1], "i64"), d.loc())
        loss = d.op("cross_entropy", [value, labels], {"reduction": d.draw(st.sampled_from(["mean", "sum"]))},
                    keep=False)
    else:
        labels = d.b.input(d.b.fresh("target"), t.dense(), d.loc())
        loss = d.op("mse_loss", [value, labels], {"reduction": "mean"}, keep=False)
    d.b.output(loss)
    hyper = d.draw(st.sampled_from([
        {"lr": 0.1, "momentum": 0.9, "nesterov": False},
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True},
        {"lr": 3e-4, "schedule": "cosine", "clip": None, "max_norm": math.inf},
        {},
    ]))
    d.b.train = TrainSpec(loss, (labels,), d.draw(st.sampled_from(["sgd", "adam", "adamw"])), Attrs(hyper))


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for every graph input: normal floats, random bools, in-range ids and class labels."""
    rng = np.random.default_rng(seed)
    values = {}
    for item in graph.inputs:
        t = item.type
        if t.is_float:
            values[item.name] = rng.standard_normal(t.shape).astype(np.float32 if t.dtype == "f32" else np.float64)
        elif t.dtype == "bool":
            values[item.name] = rng.random(t.shape) < 0.5
        else:
            values[item.name] = rng.integers(0, _int_bound(graph, item.name), t.shape).astype(
                np.int64 if t.dtype == "i64" else np.int32)
    return values


def _int_bound(graph: Graph, name: str) -> int:
    """Exclusive upper bound for an integer input: the vocabulary of an embedding, the classes of a loss."""
    for node in graph.nodes:
        if node.op == "embedding" and node.inputs[0] == name:
            return graph.type_of(node.inputs[1]).shape[0]
        if node.op == "cross_entropy" and node.inputs[1] == name:
            return graph.type_of(node.inputs[0]).shape[-1]
    return 2
