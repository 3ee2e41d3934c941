"""Built-in layers of `.nn`: calls that create their own parameters, the way torch.nn modules do.

``fc1 = Linear(x, 1024)`` declares ``fc1.weight`` [1024, in] and ``fc1.bias`` [1024] with torch's
default initialization and emits ``linear(x, fc1.weight, fc1.bias)``. Names, shapes and layouts
follow torch, so a torch ``state_dict`` maps onto the parameters one to one (BatchNorm's
``num_batches_tracked`` counter is not a parameter here). Layers build the inference form (torch's
``eval()``): BatchNorm uses its running statistics and Dropout is the identity unless called with
``training=true``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nncompile.errors import ShapeError, SourceLoc
from nncompile.ir.graph import Init
from nncompile.ir.types import Sparsity, TensorType, stable_seed
from nncompile.frontend.params import check_sparsity
from nncompile.frontend.values import (REQUIRED, Tensor, as_bool, as_int, as_ints, as_number, as_pair, as_tensor,
                                       bind_args, describe)


@dataclass(frozen=True)
class Layer:
    name: str
    args: dict[str, Any]
    build: Callable[..., Tensor]
    doc: str


LAYERS: dict[str, Layer] = {}


def layer(name: str, doc: str, **args):
    def register(build):
        LAYERS[name] = Layer(name, args, build, doc)
        return build

    return register


class LayerContext:
    """What a layer's build function may do: declare parameters and emit ops under its prefix."""

    def __init__(self, evaluator, name: str, loc: SourceLoc | None, prefix: str, out_name: str):
        self.evaluator = evaluator
        self.name = name
        self.loc = loc
        self.prefix = prefix
        self.out_name = out_name

    def param(self, local: str, shape, init: Init, dtype: str = "f32", trainable: bool = True,
              sparsity: Sparsity | None = None) -> Tensor:
        shape = tuple(int(d) for d in shape)
        if sparsity is not None:
            check_sparsity(sparsity, shape, self.loc)
        type_ = TensorType(shape, dtype, sparsity)
        return self.evaluator.new_param(f"{self.prefix}.{local}", type_, init, trainable, self.loc)

    def op(self, op: str, inputs: list[Tensor], attrs: dict | None = None, local: str | None = None) -> Tensor:
        """Emit an op; without ``local`` it is the layer's result and takes the layer's output name."""
        name = self.out_name if local is None else f"{self.prefix}.{local}"
        return self.evaluator.emit(op, inputs, attrs or {}, self.loc, None, None, name=name)

    def fail(self, message: str) -> ShapeError:
        return ShapeError(f"{self.name}: {message}", self.loc)


def call_layer(evaluator, name: str, positional: list, keywords: dict, loc: SourceLoc | None, prefix: str,
               out_name: str) -> Tensor:
    spec = LAYERS[name]
    args = bind_args(name, spec.args, positional, keywords, loc)
    return spec.build(LayerContext(evaluator, name, loc, prefix, out_name), **args)


def _float_dtype(x: Tensor) -> str:
    return x.type.dtype if x.type.is_float else "f32"


def _uniform(bound: float) -> Init:
    return Init("uniform", {"low": -bound, "high": bound})


_KAIMING_TORCH = Init("kaiming_uniform", {"a": math.sqrt(5.0)})  # torch's default for Linear/Conv weights


def _sparsity(ctx: LayerContext, value: Any) -> Sparsity | None:
    if value is None or isinstance(value, Sparsity):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value <= 1.0:
            raise ctx.fail(f"sparse= density must be in [0, 1], got {value}")
        return Sparsity("unstructured", density=float(value), seed=stable_seed(ctx.prefix) % 100000)
    raise ctx.fail(f"sparse= takes sparse(...) or a density, got {describe(value)}")


@layer("Linear", "y = x W^T + b. weight [out, in] kaiming_uniform(a=sqrt 5), bias [out] uniform(+-1/sqrt in)",
       x=REQUIRED, out=REQUIRED, bias=True, sparse=None)
def _linear(ctx: LayerContext, x, out, bias, sparse) -> Tensor:
    x = as_tensor("Linear: x", x, ctx.loc)
    out = as_int("Linear: out", out, ctx.loc, 1)
    if x.type.rank < 1:
        raise ctx.fail(f"x must have at least one dimension, got {x.type.dense()}")
    fan_in = x.shape[-1]
    dtype = _float_dtype(x)
    weight = ctx.param("weight", (out, fan_in), _KAIMING_TORCH, dtype, sparsity=_sparsity(ctx, sparse))
    inputs = [x, weight]
    if as_bool("Linear: bias", bias, ctx.loc):
        inputs.append(ctx.param("bias", (out,), _uniform(1.0 / math.sqrt(max(fan_in, 1))), dtype))
    return ctx.op("linear", inputs)


@layer("Conv2d", "2-D convolution, NCHW. weight [out, in/groups, kh, kw], bias [out] (torch's init)",
       x=REQUIRED, out=REQUIRED, kernel=REQUIRED, stride=1, padding=0, dilation=1, groups=1, bias=True, sparse=None)
def _conv2d(ctx: LayerContext, x, out, kernel, stride, padding, dilation, groups, bias, sparse) -> Tensor:
    x = as_tensor("Conv2d: x", x, ctx.loc)
    out = as_int("Conv2d: out", out, ctx.loc, 1)
    kh, kw = as_pair("Conv2d: kernel", kernel, ctx.loc, 1)
    groups = as_int("Conv2d: groups", groups, ctx.loc, 1)
    if x.type.rank != 4:
        raise ctx.fail(f"x must be [batch, channels, height, width], got {x.type.dense()}")
    channels = x.shape[1]
    if channels % groups or out % groups:
        raise ctx.fail(f"groups={groups} must divide the input channels ({channels}) and out ({out})")
    dtype = _float_dtype(x)
    fan_in = channels // groups * kh * kw
    weight = ctx.param("weight", (out, channels // groups, kh, kw), _KAIMING_TORCH, dtype,
                       sparsity=_sparsity(ctx, sparse))
    inputs = [x, weight]
    if as_bool("Conv2d: bias", bias, ctx.loc):
        inputs.append(ctx.param("bias", (out,), _uniform(1.0 / math.sqrt(max(fan_in, 1))), dtype))
    stride = as_pair("Conv2d: stride", stride, ctx.loc, 1)
    dilation = as_pair("Conv2d: dilation", dilation, ctx.loc, 1)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = _same_padding(ctx, (kh, kw), stride, dilation)
    attrs = {"stride": stride, "padding": as_pair("Conv2d: padding", padding, ctx.loc, 0), "dilation": dilation,
             "groups": groups}
    return ctx.op("conv2d", inputs, attrs)


def _locally_connected(ctx: LayerContext, x, out, kernel, stride, padding, bias) -> Tensor:
    """A conv-shaped layer without weight sharing, lowered to ``linear`` with a ``local`` sparsity pattern.

    x [B, C, *spatial] is flattened channel-first to [B, C * prod(spatial)], multiplied by
    weight [out * prod(out_spatial), C * prod(spatial)] (nonzero only inside each output position's
    window) and reshaped to [B, out, *out_spatial]; bias has one entry per output unit (channel and position).
    """
    spatial_rank = 1 if ctx.name.endswith("1d") else 2
    layout = "[batch, channels, length]" if spatial_rank == 1 else "[batch, channels, height, width]"
    x = as_tensor(f"{ctx.name}: x", x, ctx.loc)
    if x.type.rank != spatial_rank + 2:
        raise ctx.fail(f"x must be {layout}, got {x.type.dense()}")
    out = as_int(f"{ctx.name}: out", out, ctx.loc, 1)
    kernel = as_ints(f"{ctx.name}: kernel", kernel, ctx.loc, 1, spatial_rank)
    stride = as_ints(f"{ctx.name}: stride", stride, ctx.loc, 1, spatial_rank)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = _same_padding(ctx, kernel, stride, (1,) * spatial_rank)
    padding = as_ints(f"{ctx.name}: padding", padding, ctx.loc, 0, spatial_rank)
    batch, channels, size = x.shape[0], x.shape[1], x.shape[2:]
    for axis_size, k, p in zip(size, kernel, padding):
        if k > axis_size + 2 * p:
            raise ctx.fail(f"kernel {list(kernel)} is larger than the padded input "
                           f"{[s + 2 * q for s, q in zip(size, padding)]} (x is {x.type.dense()})")
    pattern = Sparsity("local", in_size=size, in_channels=channels, kernel=kernel, stride=stride, padding=padding)
    out_size = pattern.out_size
    in_features = channels * math.prod(size)
    out_features = out * math.prod(out_size)
    dtype = _float_dtype(x)
    # torch's Conv default, U(+-1/sqrt(fan_in)), with the window's fan-in (kaiming_uniform would use all K columns)
    bound = 1.0 / math.sqrt(channels * math.prod(kernel))
    weight = ctx.param("weight", (out_features, in_features), _uniform(bound), dtype, sparsity=pattern)
    flat = ctx.op("reshape", [x], {"shape": (batch, in_features)}, local="flat")
    inputs = [flat, weight]
    if as_bool(f"{ctx.name}: bias", bias, ctx.loc):
        inputs.append(ctx.param("bias", (out_features,), _uniform(bound), dtype))
    y = ctx.op("linear", inputs, local="linear")
    return ctx.op("reshape", [y], {"shape": (batch, out, *out_size)})


for _name, _layout in (("LocallyConnected1d", "x [B, C, L]"), ("LocallyConnected2d", "x [B, C, H, W]")):
    layer(_name, f"convolution-shaped layer without weight sharing, {_layout}: linear with a local sparsity pattern. "
          "weight [out * out positions, C * in positions] U(+-1/sqrt(C * kernel)), bias [out * out positions]",
          x=REQUIRED, out=REQUIRED, kernel=REQUIRED, stride=1, padding=0, bias=True)(_locally_connected)


def _same_padding(ctx: LayerContext, kernel, stride, dilation) -> list[int]:
    """torch's padding="same": output size = input size; needs stride 1 and a symmetric padding."""
    if any(st != 1 for st in stride):
        raise ctx.fail("padding=\"same\" needs stride=1")
    padding = []
    for k, d in zip(kernel, dilation):
        if d * (k - 1) % 2:
            raise ctx.fail(f"padding=\"same\" needs an odd effective kernel size, got kernel {k}"
                           + (f" dilation {d}" if d != 1 else ""))
        padding.append(d * (k - 1) // 2)
    return padding


def _batch_norm(ctx: LayerContext, x, eps, affine, training) -> Tensor:
    x = as_tensor(f"{ctx.name}: x", x, ctx.loc)
    if not 2 <= x.type.rank <= 5:
        raise ctx.fail(f"x must have rank 2 to 5 with channels on axis 1, got {x.type.dense()}")
    channels = x.shape[1]
    dtype = _float_dtype(x)
    affine_params = []
    if as_bool(f"{ctx.name}: affine", affine, ctx.loc):
        affine_params = [ctx.param("weight", (channels,), Init("ones"), dtype),
                         ctx.param("bias", (channels,), Init("zeros"), dtype)]
    mean = ctx.param("running_mean", (channels,), Init("zeros"), dtype, trainable=False)
    var = ctx.param("running_var", (channels,), Init("ones"), dtype, trainable=False)
    inputs = [x, mean, var, *affine_params]
    attrs = {"eps": as_number(f"{ctx.name}: eps", eps, ctx.loc),
             "training": as_bool(f"{ctx.name}: training", training, ctx.loc)}
    return ctx.op("batch_norm", inputs, attrs)


for _name in ("BatchNorm", "BatchNorm1d", "BatchNorm2d"):
    layer(_name, "batch norm over axis 1. weight ones, bias zeros [C]; buffers running_mean zeros, running_var ones",
          x=REQUIRED, eps=1e-5, affine=True, training=False)(_batch_norm)


@layer("LayerNorm", "layer norm over the last `dims` axes. weight ones, bias zeros",
       x=REQUIRED, eps=1e-5, affine=True, dims=1)
def _layer_norm(ctx: LayerContext, x, eps, affine, dims) -> Tensor:
    x = as_tensor("LayerNorm: x", x, ctx.loc)
    dims = as_int("LayerNorm: dims", dims, ctx.loc, 1)
    if dims > x.type.rank:
        raise ctx.fail(f"dims={dims} is more than the rank of x {x.type.dense()}")
    shape = x.shape[x.type.rank - dims:]
    inputs = [x]
    if as_bool("LayerNorm: affine", affine, ctx.loc):
        dtype = _float_dtype(x)
        inputs += [ctx.param("weight", shape, Init("ones"), dtype), ctx.param("bias", shape, Init("zeros"), dtype)]
    return ctx.op("layer_norm", inputs, {"normalized_ndim": dims, "eps": as_number("LayerNorm: eps", eps, ctx.loc)})


@layer("Embedding", "table lookup. weight [vocab, dim] normal(0, 1); ids must be integers",
       ids=REQUIRED, vocab=REQUIRED, dim=REQUIRED)
def _embedding(ctx: LayerContext, ids, vocab, dim) -> Tensor:
    ids = as_tensor("Embedding: ids", ids, ctx.loc)
    if ids.type.is_float:
        raise ctx.fail(f"ids must be an integer tensor, got {ids.type.dense()}")
    vocab = as_int("Embedding: vocab", vocab, ctx.loc, 1)
    dim = as_int("Embedding: dim", dim, ctx.loc, 1)
    weight = ctx.param("weight", (vocab, dim), Init("normal", {"mean": 0.0, "std": 1.0}))
    return ctx.op("embedding", [ids, weight])


@layer("MultiHeadAttention", "self-attention on [batch, seq, dim] (torch nn.MultiheadAttention, batch_first): "
       "in_proj_weight [3d, d] xavier_uniform, in_proj_bias zeros, out_proj.weight/bias",
       x=REQUIRED, heads=REQUIRED, causal=False, bias=True)
def _attention(ctx: LayerContext, x, heads, causal, bias) -> Tensor:
    x = as_tensor("MultiHeadAttention: x", x, ctx.loc)
    heads = as_int("MultiHeadAttention: heads", heads, ctx.loc, 1)
    if x.type.rank != 3:
        raise ctx.fail(f"x must be [batch, seq, dim], got {x.type.dense()}")
    batch, seq, dim = x.shape
    if dim % heads:
        raise ctx.fail(f"dim {dim} is not divisible by heads={heads}")
    head_dim = dim // heads
    dtype = _float_dtype(x)
    with_bias = as_bool("MultiHeadAttention: bias", bias, ctx.loc)
    in_weight = ctx.param("in_proj_weight", (3 * dim, dim), Init("xavier_uniform", {"gain": 1.0}), dtype)
    qkv_inputs = [x, in_weight]
    if with_bias:
        qkv_inputs.append(ctx.param("in_proj_bias", (3 * dim,), Init("zeros"), dtype))
    qkv = ctx.op("linear", qkv_inputs, local="qkv")
    heads_split = []
    for index, part in enumerate(("q", "k", "v")):
        piece = ctx.op("slice", [qkv], {"axis": 2, "start": index * dim, "end": (index + 1) * dim}, local=part)
        piece = ctx.op("reshape", [piece], {"shape": (batch, seq, heads, head_dim)}, local=f"{part}_heads")
        heads_split.append(ctx.op("transpose", [piece], {"dim0": 1, "dim1": 2}, local=f"{part}_t"))
    attended = ctx.op("sdpa", heads_split, {"causal": as_bool("MultiHeadAttention: causal", causal, ctx.loc)},
                      local="attn")
    merged = ctx.op("transpose", [attended], {"dim0": 1, "dim1": 2}, local="attn_t")
    merged = ctx.op("reshape", [merged], {"shape": (batch, seq, dim)}, local="merged")
    out_weight = ctx.param("out_proj.weight", (dim, dim), _KAIMING_TORCH, dtype)
    out_inputs = [merged, out_weight]
    if with_bias:
        out_inputs.append(ctx.param("out_proj.bias", (dim,), Init("zeros"), dtype))
    return ctx.op("linear", out_inputs)


@layer("Dropout", "dropout with probability p; the identity unless training=true (seed derived from the name)",
       x=REQUIRED, p=0.5, seed=None, training=False)
def _dropout(ctx: LayerContext, x, p, seed, training) -> Tensor:
    x = as_tensor("Dropout: x", x, ctx.loc)
    p = as_number("Dropout: p", p, ctx.loc)
    if not 0.0 <= p < 1.0:
        raise ctx.fail(f"p must be in [0, 1), got {p}")
    seed = stable_seed(ctx.prefix) if seed is None else as_int("Dropout: seed", seed, ctx.loc, 0)
    return ctx.op("dropout", [x], {"p": p, "seed": seed, "training": as_bool("Dropout: training", training, ctx.loc)})
