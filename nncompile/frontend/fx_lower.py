"""Shared lowering machinery of the torch frontends: the ``Lowering`` context and its op helpers.

Both frontends (torch.export ATen graphs and torch.fx symbolic traces) walk a torch graph node by
node and call the helpers here, which emit IR ops through one ``GraphBuilder``:

    low = Lowering("net")
    x = low.input("x", torch.randn(2, 8))
    w = low.state_param("0.weight", module.weight, trainable=True)
    y = low.emit("linear", [x, w])

Values of the torch graph are held as ``Value`` (an IR tensor), Python scalars/lists (shapes,
dims), tuples (multi-output ops) or ``Missing`` (an output of a tuple op that the IR does not
compute, e.g. max-pool indices; using it is an error).
"""
from __future__ import annotations

import linecache
import os
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nncompile.errors import NNError, SourceLoc, UnsupportedError
from nncompile.frontend.fx_attention import AttentionOps
from nncompile.frontend.fx_shapes import ShapeOps, flat_ints
from nncompile.ir.builder import GraphBuilder, clean_name
from nncompile.ir.graph import Graph, Init
from nncompile.ir.types import TensorType, stable_seed

# torch dtype -> IR dtype name
TORCH_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.bool: "bool",
}
IR_TO_TORCH = {v: k for k, v in TORCH_DTYPES.items()}
# key of the Init args that records a parameter's torch state_dict name
STATE_KEY = "torch_name"

_TORCH_DIR = os.path.dirname(torch.__file__)
_NNCOMPILE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n(?P<code>[^\n]*)')


@dataclass(frozen=True)
class Value:
    """An IR tensor value (by name) inside the lowering environment."""

    name: str


@dataclass(frozen=True)
class Missing:
    """An output of a multi-output torch op that the IR does not compute (e.g. max-pool indices)."""

    what: str


def user_frame(stack_trace: str | None, op_text: str | None = None) -> SourceLoc | None:
    """The user's source line from an fx ``stack_trace``: the last frame outside torch and nncompile.

    The column points at ``op_text`` (e.g. ``cumsum``) when the line contains it.
    """
    if not stack_trace:
        return None
    frames = [m.groupdict() for m in _FRAME.finditer(stack_trace)]
    if not frames:
        return None
    user = [f for f in frames if not os.path.abspath(f["file"]).startswith((_TORCH_DIR, _NNCOMPILE_DIR))]
    if not user:  # all frames inside torch (e.g. an nn.Sequential of torch layers): no user line
        return None
    frame = user[-1]
    line = int(frame["line"])
    text = linecache.getline(frame["file"], line).rstrip("\n") or frame["code"].strip()
    col = 0
    if op_text:
        found = text.find(op_text)
        col = found + 1 if found >= 0 else 0
    return SourceLoc(frame["file"], line, col, text)


def exception_frame(err: BaseException) -> SourceLoc | None:
    """The user's line where a capture failed: the last traceback frame outside torch and nncompile."""
    user = [f for f in traceback.extract_tb(err.__traceback__)
            if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _NNCOMPILE_DIR))]
    if not user:
        return None
    frame = user[-1]
    text = linecache.getline(frame.filename, frame.lineno).rstrip("\n") or (frame.line or "")
    return SourceLoc(frame.filename, frame.lineno, 0, text or None)


def innermost_frame(stack_trace: str | None) -> str | None:
    """``file:line`` of the innermost frame of a stack trace (where torch itself made the node)."""
    frames = list(_FRAME.finditer(stack_trace or ""))
    return f"{frames[-1]['file']}:{frames[-1]['line']}" if frames else None


def ir_dtype(dtype: torch.dtype, what: str) -> str:
    if dtype not in TORCH_DTYPES:
        raise UnsupportedError(f"{what}: dtype {dtype} is not supported")
    return TORCH_DTYPES[dtype]


def to_numpy(tensor: torch.Tensor, what: str) -> np.ndarray:
    """A private NumPy copy of a tensor (bf16 has no NumPy dtype and is refused)."""
    tensor = tensor.detach()
    ir_dtype(tensor.dtype, what)
    if tensor.dtype == torch.bfloat16:
        raise UnsupportedError(f"{what}: bfloat16 weights are not supported (convert the module with .float())")
    return tensor.cpu().contiguous().numpy().copy()


def python_scalar(value) -> bool:
    return isinstance(value, (int, float, bool))


class Lowering(ShapeOps, AttentionOps):
    """The state of one import: builder, parameters by state_dict name, constants, current location."""

    def __init__(self, graph_name: str):
        self.b = GraphBuilder(clean_name(graph_name))
        self.loc: SourceLoc | None = None
        self.torch_frame: str | None = None  # where torch made the current node, when no user line is known
        self.node_name: str | None = None
        self.op_text = ""
        self._state: dict[str, Value] = {}
        self._producers: dict[str, object] = {}  # IR value name -> the node that made it
        self._by_tensor: dict[int, Value] = {}  # id of the torch tensor -> its parameter (tensors outlive the import)
        # values known at import time (factory results, lifted constants, buffers): ops on them fold
        self.known: dict[str, torch.Tensor] = {}

    # errors -----------------------------------------------------------------------------------
    def unsupported(self, message: str) -> UnsupportedError:
        return UnsupportedError(message, self.loc, notes=self.notes())

    def notes(self) -> tuple[str, ...]:
        """Context for an error without a user source line: the torch frame that made the node."""
        if self.loc is None and self.torch_frame:
            return (f"node '{self.node_name}' comes from torch code at {self.torch_frame}",)
        return ()

    # definitions -------------------------------------------------------------------------------
    def input(self, name: str, example) -> Value:
        if not isinstance(example, torch.Tensor):
            raise self.unsupported(f"input '{name}' is a {type(example).__name__}, only tensor inputs become graph inputs")
        type_ = TensorType(tuple(example.shape), ir_dtype(example.dtype, f"input '{name}'"))
        return Value(self.b.input(self.b.fresh(name), type_))

    def state_param(self, state_name: str, tensor: torch.Tensor, *, trainable: bool) -> Value:
        """A parameter or buffer under its state_dict name, with its value (created once)."""
        if state_name in self._state:
            return self._state[state_name]
        if id(tensor) in self._by_tensor:  # a tied weight (one Parameter under two names): one IR parameter
            self._state[state_name] = self._by_tensor[id(tensor)]
            return self._state[state_name]
        value = to_numpy(tensor, f"parameter '{state_name}'")
        type_ = TensorType(value.shape, ir_dtype(tensor.dtype, state_name))
        name = self.b.fresh(state_name)
        self.b.param(name, type_, Init("given", {STATE_KEY: state_name}), trainable=trainable, loc=self.loc,
                     value=value)
        result = Value(name)
        self._state[state_name] = result
        self._by_tensor[id(tensor)] = result
        if not trainable:  # buffers (masks, running statistics) do not train: foldable at import time
            self.known[name] = tensor.detach().clone()
        return result

    def constant(self, value, dtype: str = "f32", base: str = "const") -> Value:
        """A constant tensor (Python scalar -> rank 0) as a non-trainable given parameter."""
        if isinstance(value, torch.Tensor):
            tensor = value.detach().clone()
        else:
            tensor = torch.tensor(value, dtype=IR_TO_TORCH[dtype])
        array = to_numpy(tensor, "constant")
        name = self.b.fresh(base)
        self.b.param(name, TensorType(array.shape, ir_dtype(tensor.dtype, "constant")), Init("given"),
                     trainable=False, loc=self.loc, value=array)
        self.known[name] = tensor
        return Value(name)

    # values ------------------------------------------------------------------------------------
    def type(self, v: Value) -> TensorType:
        return self.b.type_of(v.name)

    def shape(self, v: Value) -> tuple[int, ...]:
        return self.type(v).shape

    def rank(self, v: Value) -> int:
        return len(self.shape(v))

    def tensor(self, v, like: Value | None = None) -> Value:
        """``v`` as an IR tensor: Python scalars become constants of ``like``'s dtype."""
        if isinstance(v, Value):
            return v
        if isinstance(v, Missing):
            raise self.unsupported(f"{v.what} is not computed by nncompile")
        if python_scalar(v):
            dtype = self.type(like).dtype if like is not None else ("f32" if isinstance(v, float) else "i64")
            return self.constant(v, dtype)
        if isinstance(v, torch.Tensor):
            return self.constant(v)
        raise self.unsupported(f"expected a tensor, got {type(v).__name__} {v!r}")

    def emit(self, op: str, inputs: Sequence[Value], attrs: dict | None = None, name: str | None = None) -> Value:
        """Append one IR op at the current source location."""
        names = [self.tensor(v).name for v in inputs]
        try:
            result = self.b.op(op, names, attrs or {}, name=clean_name(name) if name else None, loc=self.loc)
            self._producers[result] = self.b.nodes[-1]
        except NNError as err:
            if self.op_text and self.op_text not in err.message:
                err.message = f"{self.op_text}: {err.message}"
            raise
        return Value(result)

    def producer(self, v: Value):
        """The IR node that defines ``v`` (None for inputs and parameters)."""
        return self._producers.get(v.name)

    def seed(self) -> int:
        return stable_seed("dropout", self.node_name or "")

    # elementwise -------------------------------------------------------------------------------
    def cast(self, v: Value, dtype: str) -> Value:
        return v if self.type(v).dtype == dtype else self.emit("cast", [v], {"dtype": dtype})

    def promote(self, a: Value, b: Value) -> tuple[Value, Value]:
        """Bring two tensors to one dtype the way torch does (float beats int, wider float wins)."""
        ta, tb = self.type(a), self.type(b)
        if ta.dtype == tb.dtype:
            return a, b
        if tb.rank == 0 and b.name in self.known and ta.is_float:
            return a, self.cast(b, ta.dtype)
        if ta.rank == 0 and a.name in self.known and tb.is_float:
            return self.cast(a, tb.dtype), b
        common = ir_dtype(torch.promote_types(IR_TO_TORCH[ta.dtype], IR_TO_TORCH[tb.dtype]), "binary op")
        return self.cast(a, common), self.cast(b, common)

    def binary(self, op: str, a, b):
        """add/sub/mul/div with tensors or Python scalars on either side."""
        if not isinstance(a, Value) and not isinstance(b, Value) and python_scalar(a) and python_scalar(b):
            return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[op]
        if isinstance(a, Value) and python_scalar(b) and self.type(a).is_float:
            if op == "add":
                return self.emit("add_scalar", [a], {"value": float(b)})
            if op == "sub":
                return self.emit("add_scalar", [a], {"value": -float(b)})
            if op == "mul":
                return self.emit("scale", [a], {"factor": float(b)})
            return self.emit("div", [a, self.constant(float(b), self.type(a).dtype)])
        if python_scalar(a) and isinstance(b, Value) and self.type(b).is_float:
            if op == "add":
                return self.emit("add_scalar", [b], {"value": float(a)})
            if op == "mul":
                return self.emit("scale", [b], {"factor": float(a)})
            if op == "sub":
                return self.emit("add_scalar", [self.emit("neg", [b])], {"value": float(a)})
        like = a if isinstance(a, Value) else b
        if not self.type(like).is_float and (op == "div" or isinstance(a, float) or isinstance(b, float)):
            # int tensor with a float scalar or true division: torch computes in the default float dtype
            a = self.cast(a, "f32") if isinstance(a, Value) else a
            b = self.cast(b, "f32") if isinstance(b, Value) else b
            return self.binary(op, a, b)
        a, b = self.promote(self.tensor(a, like), self.tensor(b, like))
        return self.emit(op, [a, b])

    def scaled_add(self, op: str, a, b, alpha) -> Value:
        """torch's ``add(a, b, alpha=...)`` / ``sub``."""
        if alpha not in (1, 1.0, None):
            b = self.binary("mul", b, alpha)
        return self.binary(op, a, b)

    def clamp(self, x: Value, low, high) -> Value:
        if isinstance(low, Value) or isinstance(high, Value):
            raise self.unsupported("clamp with tensor bounds is not supported")
        return self.emit("clamp", [x], {"min": None if low is None else float(low),
                                         "max": None if high is None else float(high)})

    # reductions --------------------------------------------------------------------------------
    def reduce(self, op: str, x: Value, dims, keepdim: bool) -> Value:
        rank = self.rank(x)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            axes = None
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            axes = tuple(sorted({self.axis(d, rank) for d in dims}))
        if op == "mean" and not self.type(x).is_float:
            raise self.unsupported("mean of an integer tensor is not supported")
        if op == "mean" and axes == (rank - 2, rank - 1) and keepdim and rank == 4:
            return self.emit("global_avg_pool2d", [x])
        return self.emit(op, [x], {"axes": axes, "keepdim": bool(keepdim)})

    def reduce_min(self, x: Value, dims, keepdim: bool) -> Value:
        """min as -max(-x)."""
        return self.emit("neg", [self.reduce("max", self.emit("neg", [x]), dims, keepdim)])

    def logsumexp(self, x: Value, dims, keepdim: bool) -> Value:
        """max + log(sum(exp(x - max))): stable for large inputs."""
        top = self.reduce("max", x, dims, True)
        total = self.reduce("sum", self.emit("exp", [self.emit("sub", [x, top])]), dims, True)
        out = self.emit("add", [self.emit("log", [total]), top])
        return out if keepdim else self.squeeze(out, self.reduced_axes(x, dims))

    def reduced_axes(self, x: Value, dims) -> list[int]:
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return list(range(self.rank(x)))
        return [self.axis(d, self.rank(x)) for d in ([dims] if isinstance(dims, int) else dims)]

    def vector_norm(self, x: Value, ord, dims, keepdim: bool) -> Value:
        """p-norm over ``dims`` for ord 1, 2 and inf."""
        if ord in (2, 2.0):
            return self.emit("sqrt", [self.reduce("sum", self.emit("mul", [x, x]), dims, keepdim)])
        if ord in (1, 1.0):
            return self.reduce("sum", self.emit("abs", [x]), dims, keepdim)
        if ord == float("inf"):
            return self.reduce("max", self.emit("abs", [x]), dims, keepdim)
        raise self.unsupported(f"vector norm of order {ord} is not supported (1, 2 and inf are)")

    def pad_constant(self, x: Value, pad, value: float = 0.0) -> Value:
        """torch's constant padding: ``pad`` pairs (before, after) from the last axis backwards."""
        pad = [int(p) for p in pad]
        dtype = self.type(x).dtype
        for i in range(len(pad) // 2):
            axis = self.rank(x) - 1 - i
            before, after = pad[2 * i], pad[2 * i + 1]
            if before < 0 or after < 0:
                x = self.slice(x, axis, max(-before, 0), self.shape(x)[axis] - max(-after, 0))
                before, after = max(before, 0), max(after, 0)
            parts = []
            for width in (before, None, after):
                if width is None:
                    parts.append(x)
                elif width > 0:
                    shape = list(self.shape(x))
                    shape[axis] = width
                    parts.append(self.constant(torch.full(shape, value, dtype=IR_TO_TORCH[dtype]), base="pad"))
            x = self.cat(parts, axis) if len(parts) > 1 else x
        return x

    def var(self, x: Value, dims, correction, keepdim: bool) -> Value:
        """Variance as mean((x - mean)^2) * n / (n - correction)."""
        mean = self.reduce("mean", x, dims, True)
        diff = self.emit("sub", [x, mean])
        var = self.reduce("mean", self.emit("mul", [diff, diff]), dims, keepdim)
        count = max(self.type(x).numel // max(self.type(mean).numel, 1), 1)
        return self.binary("mul", var, count / (count - correction)) if correction else var

    # nn ----------------------------------------------------------------------------------------
    def linear(self, x: Value, weight: Value, bias) -> Value:
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return self.emit("linear", inputs)

    def matmul(self, a: Value, b: Value) -> Value:
        return self.emit("matmul", [self._unbroadcast(a), self._unbroadcast(b)])

    def _unbroadcast(self, v: Value) -> Value:
        """The source of ``expand`` that only adds leading axes: matmul broadcasts those itself."""
        node = self.producer(v)
        if node is not None and node.op == "expand":
            source = Value(node.inputs[0])
            rank = self.rank(source)
            if rank >= 2 and self.shape(source) == self.shape(v)[len(self.shape(v)) - rank:]:
                return source
        return v

    def addmm(self, bias, a: Value, b: Value, beta=1, alpha=1) -> Value:
        """``beta * bias + alpha * (a @ b)``; ``a @ w.T + bias`` becomes one ``linear``."""
        node = self.producer(b)
        if alpha == 1 and beta == 1 and node is not None and self.rank(b) == 2 and (
                (node.op == "transpose") or (node.op == "permute" and node.attrs["dims"] == (1, 0))):
            weight = Value(node.inputs[0])
            if isinstance(bias, Value) and self.shape(bias) == (self.shape(weight)[0],):
                return self.linear(a, weight, bias)
            if bias is None:
                return self.linear(a, weight, None)
        product = self.binary("mul", self.matmul(a, b), alpha) if alpha != 1 else self.matmul(a, b)
        if bias is None or beta == 0:
            return product
        return self.binary("add", product, self.binary("mul", bias, beta) if beta != 1 else bias)

    def conv(self, x: Value, weight: Value, bias, stride, padding, dilation, groups: int) -> Value:
        """conv2d; conv1d runs as conv2d over a height-1 image."""
        rank = self.rank(x)
        if rank not in (3, 4):
            raise self.unsupported(f"convolution of a rank-{rank} input is not supported (conv1d/conv2d only)")
        spatial = rank - 2
        stride, dilation = expand_ints(stride, spatial), expand_ints(dilation, spatial)
        kernel = self.shape(weight)[2:]
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * spatial
            elif padding == "same":
                totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
                if any(t % 2 for t in totals):
                    raise self.unsupported("padding='same' with an even kernel is not supported (asymmetric padding)")
                padding = tuple(t // 2 for t in totals)
            else:
                raise self.unsupported(f"unknown padding mode {padding!r}")
        padding = expand_ints(padding, spatial)
        bias_in = [bias] if bias is not None else []
        if spatial == 2:
            return self.emit("conv2d", [x, weight] + bias_in, {"stride": stride, "padding": padding,
                                                               "dilation": dilation, "groups": int(groups)})
        x2 = self.unsqueeze(x, 2)
        w2 = self.unsqueeze(weight, 2)
        y = self.emit("conv2d", [x2, w2] + bias_in, {"stride": (1,) + stride, "padding": (0,) + padding,
                                                     "dilation": (1,) + dilation, "groups": int(groups)})
        return self.squeeze(y, [2])

    def batch_norm(self, x, weight, bias, mean, var, training: bool, eps: float) -> Value:
        if mean is None or var is None:
            if not training:
                raise self.unsupported("batch norm without running statistics in eval mode is not supported")
            channels = self.shape(x)[1]
            mean = self.constant(torch.zeros(channels, dtype=IR_TO_TORCH[self.type(x).dtype]), base="bn_mean")
            var = self.constant(torch.ones(channels, dtype=IR_TO_TORCH[self.type(x).dtype]), base="bn_var")
        inputs = [x, mean, var]
        if weight is not None or bias is not None:
            channels = self.shape(x)[1]
            dtype = IR_TO_TORCH[self.type(x).dtype]
            inputs.append(weight if weight is not None else self.constant(torch.ones(channels, dtype=dtype), base="bn_weight"))
            if bias is not None:
                inputs.append(bias)
        return self.emit("batch_norm", inputs, {"eps": float(eps), "training": bool(training)})

    def layer_norm(self, x, normalized_shape, weight, bias, eps: float) -> Value:
        normalized_shape = tuple(flat_ints(normalized_shape))
        if tuple(self.shape(x)[len(self.shape(x)) - len(normalized_shape):]) != normalized_shape:
            raise self.unsupported(f"layer_norm over {list(normalized_shape)} does not match the input shape {list(self.shape(x))}")
        inputs = [x]
        if weight is not None or bias is not None:
            dtype = IR_TO_TORCH[self.type(x).dtype]
            inputs.append(weight if weight is not None else self.constant(torch.ones(normalized_shape, dtype=dtype), base="ln_weight"))
            if bias is not None:
                inputs.append(bias)
        return self.emit("layer_norm", inputs, {"normalized_ndim": len(normalized_shape), "eps": float(eps)})

    def softmax(self, op: str, x: Value, dim, dtype=None) -> Value:
        if dim is None:
            raise self.unsupported(f"{op} without an explicit dim is not supported")
        if dtype is not None:
            x = self.cast(x, ir_dtype(dtype, op))
        return self.emit(op, [x], {"axis": self.axis(int(dim), self.rank(x))})

    def pool(self, op: str, x: Value, kernel, stride, padding, dilation=1, ceil_mode=False,
             count_include_pad=True, divisor_override=None) -> Value:
        if self.rank(x) != 4:
            raise self.unsupported(f"{op} of a rank-{self.rank(x)} input is not supported (NCHW only)")
        kernel = expand_ints(kernel, 2)
        stride = expand_ints(stride, 2) if stride not in (None, [], ()) else kernel
        attrs = {"kernel": kernel, "stride": stride, "padding": expand_ints(padding, 2), "ceil_mode": bool(ceil_mode)}
        if op == "max_pool2d":
            attrs["dilation"] = expand_ints(dilation, 2)
        else:
            if divisor_override is not None:
                raise self.unsupported("avg_pool2d with divisor_override is not supported")
            attrs["count_include_pad"] = bool(count_include_pad)
        return self.emit(op, [x], attrs)

    def adaptive_avg_pool(self, x: Value, output_size) -> Value:
        if self.rank(x) != 4:
            raise self.unsupported(f"adaptive_avg_pool2d of a rank-{self.rank(x)} input is not supported")
        height, width = self.shape(x)[2:]
        out_h, out_w = (height if s is None else s for s in expand_ints_or_none(output_size, 2))
        if (out_h, out_w) == (1, 1):
            return self.emit("global_avg_pool2d", [x])
        if (out_h, out_w) == (height, width):
            return x
        if height % out_h == 0 and width % out_w == 0:
            kernel = (height // out_h, width // out_w)
            return self.emit("avg_pool2d", [x], {"kernel": kernel, "stride": kernel})
        # uneven windows [floor(i*in/out), ceil((i+1)*in/out)): average rows, then columns (separable)
        for axis, size, out in ((2, height, out_h), (3, width, out_w)):
            if size != out:
                cells = [self.reduce("mean", self.slice(x, axis, i * size // out, -(-(i + 1) * size // out)),
                                     [axis], True) for i in range(out)]
                x = self.cat(cells, axis)
        return x

    def dropout(self, x: Value, p: float, training: bool) -> Value:
        if not training or p == 0:
            return x
        return self.emit("dropout", [x], {"p": float(p), "seed": self.seed(), "training": True})

    def embedding(self, weight: Value, ids: Value) -> Value:
        return self.emit("embedding", [ids, weight])

    def cross_entropy(self, logits: Value, labels: Value, reduction: str) -> Value:
        if reduction == "none":
            raise self.unsupported("cross_entropy with reduction='none' is not supported")
        if self.rank(logits) != 2:
            raise self.unsupported("cross_entropy needs [N, C] logits")
        return self.emit("cross_entropy", [logits, labels], {"reduction": reduction})

    def mse_loss(self, pred: Value, target: Value, reduction: str) -> Value:
        if reduction == "none":
            diff = self.emit("sub", [pred, target])
            return self.emit("mul", [diff, diff])
        return self.emit("mse_loss", [pred, target], {"reduction": reduction})

    # result ------------------------------------------------------------------------------------
    def finish(self, outputs: Sequence) -> Graph:
        """Set the outputs and drop nodes and parameters that no output needs (inputs stay)."""
        names = []
        for i, out in enumerate(outputs):
            if isinstance(out, Missing) or not isinstance(out, Value):
                kind = out.what if isinstance(out, Missing) else f"a {type(out).__name__} ({out!r})"
                raise UnsupportedError(f"output {i} of the model is {kind}; only tensor outputs are supported")
            names.append(out.name)
        needed = set(names)
        for node in reversed(self.b.nodes):
            if node.name in needed:
                needed.update(node.inputs)
        final = GraphBuilder(self.b.name)
        for item in self.b.inputs:
            final.input(item.name, item.type, item.loc)
        for p in self.b.params:
            if p.name in needed:
                final.param(p.name, p.type, p.init, trainable=p.trainable, loc=p.loc, value=self.b.weights[p.name])
        for node in self.b.nodes:
            if node.name in needed:
                final.add_node(node)
        final.output(*names)
        return final.build()


def expand_ints(value, count: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * count
    value = tuple(int(v) for v in value)
    return value * count if len(value) == 1 else value


def expand_ints_or_none(value, count: int) -> tuple:
    if value is None or isinstance(value, int):
        return (value,) * count
    value = tuple(value)
    return value * count if len(value) == 1 else value


def state_dict_names(graph: Graph) -> dict[str, str]:
    """IR parameter name -> torch state_dict name, for the parameters an import created."""
    return {p.name: p.init.args[STATE_KEY] for p in graph.params if STATE_KEY in p.init.args}


def to_state_dict(graph: Graph, weights=None) -> dict[str, torch.Tensor]:
    """Parameter values of ``graph`` (or ``weights``, by IR name) as a torch state_dict by torch name.

    ``module.load_state_dict(to_state_dict(graph, trained), strict=False)`` copies weights back.
    """
    values = graph.weights if weights is None else weights
    return {source: torch.from_numpy(np.array(values[name])) for name, source in state_dict_names(graph).items()}
