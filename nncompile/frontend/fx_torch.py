"""torch.fx tables of the symbolic-trace frontend: torch functions, Tensor methods and nn modules.

A symbolic trace (``torch.fx.symbolic_trace``) keeps the user's Python-level calls: ``call_function``
nodes hold torch functions and operators (``torch.relu``, ``F.linear``, ``operator.add``),
``call_method`` nodes hold Tensor method names (``view``, ``size``), ``call_module`` nodes hold
leaf modules (fx_modules.py). Each rule has the Python signature of
the call it lowers, so torch's own argument conventions bind the arguments:

    @fx_function(torch.relu, F.relu, method="relu")
    def _relu(low, input, inplace=False):
        return low.emit("relu", [input])
"""
from __future__ import annotations

import builtins
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nncompile.frontend.fx_lower import IR_TO_TORCH, Lowering, Missing, Value, ir_dtype
from nncompile.frontend.fx_shapes import flat_ints

FX_FUNCTIONS: dict[Callable, Callable] = {}
FX_METHODS: dict[str, Callable] = {}

_REDUCTION = {"mean": "mean", "sum": "sum", "none": "none"}


def fx_function(*targets, method: str | tuple[str, ...] | None = None):
    """Register a rule for torch functions (call_function targets) and Tensor method names."""
    def register(fn):
        for target in targets:
            FX_FUNCTIONS[target] = fn
        for name in ((method,) if isinstance(method, str) else method or ()):
            FX_METHODS[name] = fn
        return fn
    return register


# elementwise ------------------------------------------------------------------------------------

def _unary(ir_op: str, *targets, method: str):
    def rule(low: Lowering, input, inplace=False):
        return low.emit(ir_op, [input])
    fx_function(*targets, method=(method, method + "_"))(rule)


_unary("relu", torch.relu, F.relu, method="relu")
_unary("tanh", torch.tanh, F.tanh, method="tanh")
_unary("sigmoid", torch.sigmoid, F.sigmoid, method="sigmoid")
_unary("silu", F.silu, method="silu")
_unary("exp", torch.exp, method="exp")
_unary("log", torch.log, method="log")
_unary("sqrt", torch.sqrt, method="sqrt")
_unary("rsqrt", torch.rsqrt, method="rsqrt")
_unary("abs", torch.abs, method="abs")
_unary("erf", torch.erf, method="erf")
_unary("neg", torch.neg, operator.neg, method="neg")


@fx_function(F.gelu, method="gelu")
def _gelu(low, input, approximate="none"):
    return low.emit("gelu", [input], {"approximate": approximate})


@fx_function(F.leaky_relu, method="leaky_relu")
def _leaky_relu(low, input, negative_slope=0.01, inplace=False):
    return low.emit("leaky_relu", [input], {"negative_slope": float(negative_slope)})


@fx_function(F.relu6)
def _relu6(low, input, inplace=False):
    return low.clamp(input, 0.0, 6.0)


@fx_function(F.hardtanh)
def _hardtanh(low, input, min_val=-1.0, max_val=1.0, inplace=False):
    return low.clamp(input, min_val, max_val)


@fx_function(torch.clamp, torch.clip, method=("clamp", "clip"))
def _clamp(low, input, min=None, max=None):
    return low.clamp(input, min, max)


def _binary(op: str, *targets, method: tuple[str, ...]):
    def rule(low: Lowering, input, other, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            raise low.unsupported(f"division with rounding_mode={rounding_mode!r} is not supported")
        return low.scaled_add(op, input, other, alpha) if op in ("add", "sub") else low.binary(op, input, other)
    fx_function(*targets, method=method)(rule)


_binary("add", torch.add, operator.add, operator.iadd, method=("add", "add_", "__add__", "__radd__"))
_binary("sub", torch.sub, operator.sub, operator.isub, method=("sub", "sub_", "__sub__"))
_binary("mul", torch.mul, operator.mul, operator.imul, method=("mul", "mul_", "__mul__", "__rmul__"))
_binary("div", torch.div, operator.truediv, operator.itruediv, method=("div", "div_", "__truediv__"))


@fx_function(torch.rsub, method="__rsub__")
def _rsub(low, input, other, alpha=1):
    return low.scaled_add("sub", other, input, alpha)


@fx_function(operator.pow, torch.pow, method=("pow", "__pow__"))
def _pow(low, input, exponent):
    if isinstance(exponent, Value):
        raise low.unsupported("pow with a tensor exponent is not supported")
    if exponent == 2:
        return low.emit("mul", [input, input])
    return low.emit("pow_scalar", [input], {"exponent": float(exponent)})


@fx_function(torch.maximum, method="maximum")
def _maximum(low, input, other):
    return low.emit("maximum", list(low.promote(input, other)))


@fx_function(torch.minimum, method="minimum")
def _minimum(low, input, other):
    return low.emit("minimum", list(low.promote(input, other)))


@fx_function(torch.where)
def _where(low, condition, input, other):
    like = input if isinstance(input, Value) else other
    a, b = low.promote(low.tensor(input, like), low.tensor(other, like))
    return low.emit("where", [low.cast(low.tensor(condition), "bool"), a, b])


@fx_function(torch.masked_fill, method=("masked_fill", "masked_fill_"))
def _masked_fill(low, input, mask, value):
    fill = low.cast(low.tensor(value, input), low.type(input).dtype)
    return low.emit("where", [low.cast(mask, "bool"), fill, input])


@fx_function(method=("contiguous", "clone", "detach", "cpu", "requires_grad_"))
def _same(low, input, *args, **kwargs):
    return input


@fx_function(method="to")
def _to(low, input, *args, **kwargs):
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    other = next((a for a in args if isinstance(a, Value)), None)
    if other is not None:
        return low.cast(input, low.type(other).dtype)
    return input if dtype is None else low.cast(input, ir_dtype(dtype, "to"))


@fx_function(method="type_as")
def _type_as(low, input, other):
    return low.cast(input, low.type(other).dtype)


@fx_function(method="float")
def _float(low, input, *args):
    return low.cast(input, "f32")


@fx_function(method="long")
def _long(low, input, *args):
    return low.cast(input, "i64")


# matmul and nn ---------------------------------------------------------------------------------

@fx_function(F.linear)
def _linear(low, input, weight, bias=None):
    return low.linear(input, weight, bias)


@fx_function(torch.matmul, torch.mm, torch.bmm, operator.matmul, method=("matmul", "mm", "bmm", "__matmul__"))
def _matmul(low, input, other):
    return low.matmul(input, other)


@fx_function(torch.addmm)
def _addmm(low, input, mat1, mat2, beta=1, alpha=1):
    return low.addmm(input, mat1, mat2, beta, alpha)


@fx_function(torch.t, method="t")
def _t(low, input):
    return low.t(input)


@fx_function(F.conv2d, F.conv1d, torch.conv2d, torch.conv1d)
def _conv(low, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return low.conv(input, weight, bias, stride, padding, dilation, groups)


@fx_function(F.batch_norm)
def _batch_norm(low, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return low.batch_norm(input, weight, bias, running_mean, running_var, training, eps)


@fx_function(F.layer_norm)
def _layer_norm(low, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return low.layer_norm(input, normalized_shape, weight, bias, eps)


@fx_function(F.softmax, torch.softmax, method="softmax")
def _softmax(low, input, dim=None, _stacklevel=3, dtype=None):
    return low.softmax("softmax", input, dim, dtype)


@fx_function(F.log_softmax, torch.log_softmax, method="log_softmax")
def _log_softmax(low, input, dim=None, _stacklevel=3, dtype=None):
    return low.softmax("log_softmax", input, dim, dtype)


@fx_function(F.max_pool2d, torch.max_pool2d)
def _max_pool(low, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    out = low.pool("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    return (out, Missing("max_pool2d indices")) if return_indices else out


@fx_function(F.avg_pool2d)
def _avg_pool(low, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    return low.pool("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode, count_include_pad,
                    divisor_override)


@fx_function(F.adaptive_avg_pool2d)
def _adaptive_avg_pool(low, input, output_size):
    return low.adaptive_avg_pool(input, output_size)


@fx_function(F.dropout)
def _dropout(low, input, p=0.5, training=True, inplace=False):
    return low.dropout(input, p, training)


@fx_function(F.embedding)
def _embedding(low, input, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    if max_norm is not None:
        raise low.unsupported("embedding with max_norm is not supported")
    return low.embedding(weight, input)


@fx_function(F.scaled_dot_product_attention)
def _sdpa(low, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return low.sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@fx_function(F.cross_entropy)
def _cross_entropy(low, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0):
    if weight is not None or label_smoothing:
        raise low.unsupported("cross_entropy with class weights or label smoothing is not supported")
    return low.cross_entropy(input, target, reduction)


@fx_function(F.mse_loss)
def _mse_loss(low, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    return low.mse_loss(input, target, reduction)


# reductions -------------------------------------------------------------------------------------

@fx_function(torch.mean, method="mean")
def _mean(low, input, dim=None, keepdim=False, dtype=None):
    if dtype is not None:
        input = low.cast(input, ir_dtype(dtype, "mean"))
    return low.reduce("mean", input, dim, keepdim)


@fx_function(torch.sum, method="sum")
def _sum(low, input, dim=None, keepdim=False, dtype=None):
    if dtype is not None:
        input = low.cast(input, ir_dtype(dtype, "sum"))
    return low.reduce("sum", input, dim, keepdim)


@fx_function(torch.amax, method="amax")
def _amax(low, input, dim=(), keepdim=False):
    return low.reduce("max", input, dim, keepdim)


@fx_function(torch.max, method="max")
def _max(low, input, dim=None, keepdim=False):
    if isinstance(dim, Value):
        return low.emit("maximum", list(low.promote(input, dim)))
    if dim is None:
        return low.reduce("max", input, None, False)
    return low.reduce("max", input, dim, keepdim), Missing("max indices")


@fx_function(torch.var, method="var")
def _var(low, input, dim=None, unbiased=True, keepdim=False, correction=None):
    if correction is None:
        correction = 1 if unbiased else 0
    return low.var(input, dim, correction, keepdim)


@fx_function(torch.std, method="std")
def _std(low, input, dim=None, unbiased=True, keepdim=False, correction=None):
    if correction is None:
        correction = 1 if unbiased else 0
    return low.emit("sqrt", [low.var(input, dim, correction, keepdim)])


@fx_function(torch.amin, method="amin")
def _amin(low, input, dim=(), keepdim=False):
    return low.reduce_min(input, dim, keepdim)


@fx_function(torch.min, method="min")
def _min(low, input, dim=None, keepdim=False):
    if isinstance(dim, Value):
        return low.emit("minimum", list(low.promote(input, dim)))
    if dim is None:
        return low.reduce_min(input, None, False)
    return low.reduce_min(input, dim, keepdim), Missing("min indices")


@fx_function(torch.logsumexp, method="logsumexp")
def _logsumexp(low, input, dim, keepdim=False):
    return low.logsumexp(input, dim, keepdim)


@fx_function(torch.norm, method="norm")
def _norm(low, input, p="fro", dim=None, keepdim=False, dtype=None):
    if dtype is not None:
        input = low.cast(input, ir_dtype(dtype, "norm"))
    return low.vector_norm(input, 2 if p == "fro" else p, dim, keepdim)


@fx_function(torch.linalg.vector_norm)
def _vector_norm(low, x, ord=2, dim=None, keepdim=False, dtype=None):
    return _norm(low, x, ord, dim, keepdim, dtype)


@fx_function(F.normalize)
def _normalize(low, input, p=2.0, dim=1, eps=1e-12, out=None):
    norm = low.clamp(low.vector_norm(input, p, dim, True), eps, None)
    return low.emit("div", [input, norm])


@fx_function(F.pad)
def _pad(low, input, pad, mode="constant", value=None):
    if mode != "constant":
        raise low.unsupported(f"padding mode '{mode}' is not supported (constant only)")
    return low.pad_constant(input, pad, 0.0 if value is None else float(value))


@fx_function(F.hardsigmoid)
def _hardsigmoid(low, input, inplace=False):
    scaled = low.emit("add_scalar", [low.emit("scale", [input], {"factor": 1.0 / 6.0})], {"value": 0.5})
    return low.clamp(scaled, 0.0, 1.0)


@fx_function(F.hardswish)
def _hardswish(low, input, inplace=False):
    return low.emit("mul", [input, _hardsigmoid(low, input)])


@fx_function(method=("new_zeros", "new_ones", "new_full", "new_empty"))
def _new(low, input, *size, fill_value=None, dtype=None, **_):
    if low.op_text == "new_full":
        size, fill_value = size[:-1], size[-1] if fill_value is None else fill_value
    value = {"new_zeros": 0, "new_ones": 1, "new_empty": 0}.get(low.op_text, fill_value)
    shape = flat_ints(size)
    return low.constant(torch.full(shape, value, dtype=dtype or IR_TO_TORCH[low.type(input).dtype]), base=low.op_text)


# shapes -----------------------------------------------------------------------------------------

@fx_function(method=("view", "reshape"))
def _view(low, input, *shape):
    if len(shape) == 1 and isinstance(shape[0], torch.dtype):
        raise low.unsupported("view as another dtype is not supported")
    return low.reshape(input, _resolve_shape(low, input, flat_ints(shape)))


@fx_function(torch.reshape)
def _reshape(low, input, shape):
    return low.reshape(input, _resolve_shape(low, input, flat_ints(shape)))


def _resolve_shape(low, x, shape):
    if shape.count(-1) == 1:
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        shape = [low.type(x).numel // known if d == -1 else d for d in shape]
    return shape


@fx_function(method=("view_as", "reshape_as"))
def _view_as(low, input, other):
    return low.reshape(input, low.shape(other))


@fx_function(torch.flatten, method="flatten")
def _flatten(low, input, start_dim=0, end_dim=-1):
    return low.flatten(input, start_dim, end_dim)


@fx_function(torch.unflatten, method="unflatten")
def _unflatten(low, input, dim, sizes):
    return low.unflatten(input, dim, sizes)


@fx_function(torch.permute, method="permute")
def _permute(low, input, *dims):
    return low.permute(input, flat_ints(dims))


@fx_function(torch.transpose, method="transpose")
def _transpose(low, input, dim0, dim1):
    return low.transpose(input, dim0, dim1)


@fx_function(method="expand")
def _expand(low, input, *sizes):
    return low.expand(input, flat_ints(sizes))


@fx_function(method="expand_as")
def _expand_as(low, input, other):
    return low.expand(input, low.shape(other))


@fx_function(torch.unsqueeze, method="unsqueeze")
def _unsqueeze(low, input, dim):
    return low.unsqueeze(input, dim)


@fx_function(torch.squeeze, method="squeeze")
def _squeeze(low, input, dim=None):
    return low.squeeze(input, dim)


@fx_function(torch.cat, torch.concat)
def _cat(low, tensors, dim=0):
    return low.cat(tensors, dim)


@fx_function(torch.stack)
def _stack(low, tensors, dim=0):
    return low.stack(tensors, dim)


@fx_function(torch.split, method="split")
def _split(low, input, split_size_or_sections, dim=0):
    return low.split(input, split_size_or_sections, dim)


@fx_function(torch.chunk, method="chunk")
def _chunk(low, input, chunks, dim=0):
    return low.chunk(input, chunks, dim)


@fx_function(torch.narrow, method="narrow")
def _narrow(low, input, dim, start, length):
    return low.slice(input, dim, start, start + length)


@fx_function(torch.select, method="select")
def _select(low, input, dim, index):
    return low.select(input, dim, index)


@fx_function(method="size")
def _size(low, input, dim=None):
    shape = low.shape(input)
    return torch.Size(shape) if dim is None else shape[low.axis(dim, len(shape))]


@fx_function(method=("dim", "ndimension"))
def _dim(low, input):
    return low.rank(input)


@fx_function(method="numel")
def _numel(low, input):
    return low.type(input).numel


@fx_function(builtins.getattr)
def _getattr(low, obj, name):
    if not isinstance(obj, Value):
        return getattr(obj, name)
    if name == "shape":
        return torch.Size(low.shape(obj))
    if name == "ndim":
        return low.rank(obj)
    if name == "dtype":
        return IR_TO_TORCH[low.type(obj).dtype]
    if name == "device":  # graphs are device-independent; factories in forward run on the CPU at import
        return torch.device("cpu")
    if name == "T":
        return low.permute(obj, list(reversed(range(low.rank(obj)))))
    if name == "mT":
        return low.transpose(obj, -2, -1)
    raise low.unsupported(f"tensor attribute '{name}' is not supported")


@fx_function(operator.getitem)
def _getitem(low, obj, index):
    if not isinstance(obj, Value):
        return obj[index]
    return index_tensor(low, obj, index)


def index_tensor(low: Lowering, x: Value, index) -> Value:
    """Basic indexing ``x[...]``: ints, slices (step >= 1), None and Ellipsis."""
    items = list(index) if isinstance(index, tuple) else [index]
    for item in items:
        if not (item is None or item is Ellipsis or isinstance(item, (int, slice))) or isinstance(item, bool):
            raise low.unsupported(f"advanced indexing with {type(item).__name__} is not supported")
    consumed = sum(1 for item in items if isinstance(item, (int, slice)))
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (low.rank(x) - consumed)
    axis = 0
    for item in items:
        if item is None:
            x = low.unsqueeze(x, axis)
            axis += 1
        elif isinstance(item, int):
            x = low.select(x, axis, item)
        else:
            x = low.slice(x, axis, item.start, item.stop, item.step)
            axis += 1
    return x
