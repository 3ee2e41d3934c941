"""ATen op table of the torch.export frontend: ``aten.NAME.OVERLOAD`` -> lowering rule.

A rule receives the ``Lowering`` context and the op's arguments bound by the ATen schema's names
(defaults filled), and returns the result: a ``Value``, a tuple (multi-output ops; the outputs the
IR does not compute are ``Missing``), or ``None`` for ops with no result (runtime asserts).

    @aten("relu.default")
    def _relu(low, self, **_):
        return low.emit("relu", [self])

The table covers both the pre-dispatch ATen that ``torch.export.export`` gives (linear, conv2d,
batch_norm, layer_norm, scaled_dot_product_attention, ...) and the core ATen that
``run_decompositions()`` gives (addmm, convolution, _native_batch_norm_legit_no_training,
native_layer_norm, bmm, _softmax, ...).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from nncompile.frontend.fx_lower import IR_TO_TORCH, Lowering, Missing, Value, ir_dtype

ATEN: dict[str, Callable] = {}

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def aten(*names: str):
    """Register a rule under ``aten.<name>`` for each name."""
    def register(fn):
        for name in names:
            ATEN[f"aten.{name}"] = fn
        return fn
    return register


# elementwise ------------------------------------------------------------------------------------

_UNARY = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "exp": "exp", "log": "log",
          "sqrt": "sqrt", "rsqrt": "rsqrt", "neg": "neg", "abs": "abs", "erf": "erf"}


def _unary_rule(ir_op: str):
    def rule(low: Lowering, self, **_):
        return low.emit(ir_op, [self])
    return rule


for _name, _ir in _UNARY.items():
    aten(f"{_name}.default")(_unary_rule(_ir))


@aten("gelu.default")
def _gelu(low, self, approximate="none", **_):
    return low.emit("gelu", [self], {"approximate": approximate})


@aten("leaky_relu.default")
def _leaky_relu(low, self, negative_slope=0.01, **_):
    return low.emit("leaky_relu", [self], {"negative_slope": float(negative_slope)})


@aten("clamp.default")
def _clamp(low, self, min=None, max=None, **_):
    return low.clamp(self, min, max)


@aten("clamp_min.default")
def _clamp_min(low, self, min, **_):
    return low.clamp(self, min, None)


@aten("clamp_max.default")
def _clamp_max(low, self, max, **_):
    return low.clamp(self, None, max)


@aten("hardtanh.default")
def _hardtanh(low, self, min_val=-1.0, max_val=1.0, **_):
    return low.clamp(self, min_val, max_val)


@aten("relu6.default")
def _relu6(low, self, **_):
    return low.clamp(self, 0.0, 6.0)


@aten("add.Tensor", "add.Scalar")
def _add(low, self, other, alpha=1, **_):
    return low.scaled_add("add", self, other, alpha)


@aten("sub.Tensor", "sub.Scalar")
def _sub(low, self, other, alpha=1, **_):
    return low.scaled_add("sub", self, other, alpha)


@aten("rsub.Scalar", "rsub.Tensor")
def _rsub(low, self, other, alpha=1, **_):
    return low.scaled_add("sub", other, self, alpha)


@aten("mul.Tensor", "mul.Scalar")
def _mul(low, self, other, **_):
    return low.binary("mul", self, other)


@aten("div.Tensor", "div.Scalar")
def _div(low, self, other, **_):
    return low.binary("div", self, other)


@aten("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(low, self, other, rounding_mode=None, **_):
    if rounding_mode is not None:
        raise low.unsupported(f"division with rounding_mode={rounding_mode!r} is not supported")
    return low.binary("div", self, other)


@aten("maximum.default")
def _maximum(low, self, other, **_):
    return low.emit("maximum", list(low.promote(self, other)))


@aten("minimum.default")
def _minimum(low, self, other, **_):
    return low.emit("minimum", list(low.promote(self, other)))


@aten("pow.Tensor_Scalar")
def _pow(low, self, exponent, **_):
    if exponent == 2:
        return low.emit("mul", [self, self])
    if exponent == 0.5:
        return low.emit("sqrt", [self])
    return low.emit("pow_scalar", [self], {"exponent": float(exponent)})


@aten("square.default")
def _square(low, self, **_):
    return low.emit("mul", [self, self])


@aten("reciprocal.default")
def _reciprocal(low, self, **_):
    return low.binary("div", 1.0, self)


@aten("hardsigmoid.default")
def _hardsigmoid(low, self, **_):
    return low.clamp(low.emit("add_scalar", [low.emit("scale", [self], {"factor": 1.0 / 6.0})], {"value": 0.5}), 0.0, 1.0)


@aten("hardswish.default")
def _hardswish(low, self, **_):
    return low.emit("mul", [self, _hardsigmoid(low, self)])


@aten("where.self")
def _where(low, condition, self, other, **_):
    like = self if isinstance(self, Value) else other
    a, b = low.promote(low.tensor(self, like), low.tensor(other, like))
    return low.emit("where", [low.cast(low.tensor(condition), "bool"), a, b])


@aten("masked_fill.Scalar", "masked_fill.Tensor")
def _masked_fill(low, self, mask, value, **_):
    fill = low.tensor(value if not isinstance(value, Value) else value, self)
    return low.emit("where", [low.cast(mask, "bool"), low.cast(fill, low.type(self).dtype), self])


@aten("_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "to.other")
def _to_copy(low, self, dtype=None, other=None, **_):
    if isinstance(other, Value):
        return low.cast(self, low.type(other).dtype)
    return self if dtype is None else low.cast(self, ir_dtype(dtype, "to"))


@aten("type_as.default")
def _type_as(low, self, other, **_):
    return low.cast(self, low.type(other).dtype)


@aten("clone.default", "contiguous.default", "alias.default", "detach.default",
      "lift_fresh_copy.default", "lift_fresh.default")
def _identity(low, self=None, input=None, **_):
    return self if self is not None else input


@aten("_assert_scalar.default", "_assert_async.msg", "sym_constrain_range_for_size.default",
      "_assert_tensor_metadata.default")
def _assert(low, **_):
    return None


# matmul and nn ---------------------------------------------------------------------------------

@aten("linear.default")
def _linear(low, input, weight, bias=None, **_):
    return low.linear(input, weight, bias)


@aten("matmul.default", "mm.default", "bmm.default")
def _matmul(low, self, other=None, mat2=None, **_):
    return low.matmul(self, other if other is not None else mat2)


@aten("addmm.default")
def _addmm(low, self, mat1, mat2, beta=1, alpha=1, **_):
    return low.addmm(self, mat1, mat2, beta, alpha)


@aten("baddbmm.default")
def _baddbmm(low, self, batch1, batch2, beta=1, alpha=1, **_):
    return low.addmm(self, batch1, batch2, beta, alpha)


@aten("t.default", "numpy_T.default")
def _t(low, self, **_):
    return low.t(self)


@aten("conv2d.default", "conv2d.padding", "conv1d.default", "conv1d.padding")
def _conv(low, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **_):
    return low.conv(input, weight, bias, stride, padding, dilation, groups)


@aten("convolution.default", "_convolution.default")
def _convolution(low, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, **_):
    if transposed:
        raise low.unsupported("transposed convolution is not supported")
    return low.conv(input, weight, bias, stride, padding, dilation, groups)


@aten("batch_norm.default")
def _batch_norm(low, input, weight, bias, running_mean, running_var, training, momentum, eps, **_):
    return low.batch_norm(input, weight, bias, running_mean, running_var, bool(training), eps)


@aten("_native_batch_norm_legit_no_training.default")
def _bn_no_training(low, input, weight, bias, running_mean, running_var, momentum, eps, **_):
    out = low.batch_norm(input, weight, bias, running_mean, running_var, False, eps)
    return out, Missing("batch norm saved mean"), Missing("batch norm saved inverse std")


@aten("native_batch_norm.default", "_native_batch_norm_legit.default", "_native_batch_norm_legit_functional.default")
def _bn_native(low, input, weight, bias, running_mean, running_var, training, momentum, eps, **_):
    out = low.batch_norm(input, weight, bias, running_mean, running_var, bool(training), eps)
    return (out, Missing("batch norm saved mean"), Missing("batch norm saved inverse std"),
            Missing("batch norm updated running mean"), Missing("batch norm updated running var"))


@aten("_native_batch_norm_legit.no_stats")
def _bn_no_stats(low, input, weight, bias, training, momentum, eps, **_):
    out = low.batch_norm(input, weight, bias, None, None, True, eps)
    return out, Missing("batch norm saved mean"), Missing("batch norm saved inverse std")


@aten("layer_norm.default")
def _layer_norm(low, input, normalized_shape, weight=None, bias=None, eps=1e-5, **_):
    return low.layer_norm(input, normalized_shape, weight, bias, eps)


@aten("native_layer_norm.default")
def _native_layer_norm(low, input, normalized_shape, weight, bias, eps, **_):
    out = low.layer_norm(input, normalized_shape, weight, bias, eps)
    return out, Missing("layer norm saved mean"), Missing("layer norm saved inverse std")


@aten("_softmax.default", "softmax.int", "_safe_softmax.default")
def _softmax(low, self, dim, half_to_float=False, dtype=None, **_):
    if half_to_float:
        self = low.cast(self, "f32")
    return low.softmax("softmax", self, dim, dtype)


@aten("_log_softmax.default", "log_softmax.int")
def _log_softmax(low, self, dim, half_to_float=False, dtype=None, **_):
    if half_to_float:
        self = low.cast(self, "f32")
    return low.softmax("log_softmax", self, dim, dtype)


@aten("max_pool2d.default")
def _max_pool(low, self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False, **_):
    return low.pool("max_pool2d", self, kernel_size, stride, padding, dilation, ceil_mode)


@aten("max_pool2d_with_indices.default")
def _max_pool_indices(low, self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False, **_):
    out = low.pool("max_pool2d", self, kernel_size, stride, padding, dilation, ceil_mode)
    return out, Missing("max_pool2d indices")


@aten("avg_pool2d.default")
def _avg_pool(low, self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None, **_):
    return low.pool("avg_pool2d", self, kernel_size, stride, padding, 1, ceil_mode, count_include_pad,
                    divisor_override)


@aten("adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default")
def _adaptive_avg_pool(low, self, output_size, **_):
    return low.adaptive_avg_pool(self, output_size)


@aten("dropout.default", "feature_dropout.default", "alpha_dropout.default")
def _dropout(low, input, p, train, **_):
    return low.dropout(input, p, train)


@aten("native_dropout.default")
def _native_dropout(low, input, p, train, **_):
    return low.dropout(input, p, bool(train)), Missing("dropout mask")


@aten("embedding.default")
def _embedding(low, weight, indices, padding_idx=-1, **_):
    return low.embedding(weight, indices)


@aten("scaled_dot_product_attention.default")
def _sdpa(low, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_):
    return low.sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@aten("cross_entropy_loss.default")
def _cross_entropy(low, self, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0, **_):
    if weight is not None or label_smoothing:
        raise low.unsupported("cross_entropy with class weights or label smoothing is not supported")
    return low.cross_entropy(self, target, _REDUCTIONS[reduction])


@aten("nll_loss_forward.default", "nll_loss.default", "nll_loss_nd.default")
def _nll_loss(low, self, target, weight=None, reduction=1, ignore_index=-100, **_):
    """nll_loss(log_softmax(logits, 1)) is cross entropy; other inputs are not supported."""
    node = low.producer(self)
    if weight is not None or node is None or node.op != "log_softmax" or node.attrs["axis"] != 1 or low.rank(self) != 2:
        raise low.unsupported("nll_loss is supported only on log_softmax(logits, dim=1) of [N, C] logits")
    loss = low.cross_entropy(Value(node.inputs[0]), target, _REDUCTIONS[reduction])
    return (loss, Missing("nll_loss total weight")) if low.op_text == "nll_loss_forward" else loss


@aten("mse_loss.default")
def _mse_loss(low, self, target, reduction=1, **_):
    return low.mse_loss(self, target, _REDUCTIONS[reduction])


# reductions -------------------------------------------------------------------------------------

@aten("mean.dim", "mean.default")
def _mean(low, self, dim=None, keepdim=False, dtype=None, **_):
    if dtype is not None:
        self = low.cast(self, ir_dtype(dtype, "mean"))
    return low.reduce("mean", self, dim, keepdim)


@aten("sum.dim_IntList", "sum.default")
def _sum(low, self, dim=None, keepdim=False, dtype=None, **_):
    if dtype is not None:
        self = low.cast(self, ir_dtype(dtype, "sum"))
    return low.reduce("sum", self, dim, keepdim)


@aten("amax.default", "max.default")
def _amax(low, self, dim=None, keepdim=False, **_):
    return low.reduce("max", self, dim, keepdim)


@aten("amin.default", "min.default")
def _amin(low, self, dim=None, keepdim=False, **_):
    return low.reduce_min(self, dim, keepdim)


@aten("min.dim")
def _min_dim(low, self, dim, keepdim=False, **_):
    return low.reduce_min(self, dim, keepdim), Missing("min indices")


@aten("logsumexp.default")
def _logsumexp(low, self, dim, keepdim=False, **_):
    return low.logsumexp(self, dim, keepdim)


@aten("linalg_vector_norm.default", "norm.ScalarOpt_dim")
def _vector_norm(low, self, ord=2, dim=None, keepdim=False, p=None, dtype=None, **_):
    if dtype is not None:
        self = low.cast(self, ir_dtype(dtype, "norm"))
    return low.vector_norm(self, p if p is not None else ord, dim, keepdim)


@aten("std.dim", "std.correction")
def _std(low, self, dim=None, correction=None, keepdim=False, unbiased=True, **_):
    if correction is None:
        correction = 1 if unbiased else 0
    return low.emit("sqrt", [low.var(self, dim, correction, keepdim)])


@aten("max.dim")
def _max_dim(low, self, dim, keepdim=False, **_):
    return low.reduce("max", self, dim, keepdim), Missing("max indices")


@aten("var.correction", "var.dim")
def _var(low, self, dim=None, correction=None, keepdim=False, unbiased=True, **_):
    if correction is None:
        correction = 1 if unbiased else 0
    return low.var(self, dim, correction, keepdim)


# shapes -----------------------------------------------------------------------------------------

@aten("view.default", "_unsafe_view.default", "reshape.default")
def _view(low, self, size=None, shape=None, **_):
    return low.reshape(self, size if size is not None else shape)


@aten("flatten.using_ints")
def _flatten(low, self, start_dim=0, end_dim=-1, **_):
    return low.flatten(self, start_dim, end_dim)


@aten("unflatten.int")
def _unflatten(low, self, dim, sizes, **_):
    return low.unflatten(self, dim, sizes)


@aten("permute.default")
def _permute(low, self, dims, **_):
    return low.permute(self, dims)


@aten("transpose.int")
def _transpose(low, self, dim0, dim1, **_):
    return low.transpose(self, dim0, dim1)


@aten("expand.default")
def _expand(low, self, size, **_):
    return low.expand(self, size)


@aten("expand_as.default")
def _expand_as(low, self, other, **_):
    return low.expand(self, low.shape(other))


@aten("pad.default", "constant_pad_nd.default")
def _pad(low, self, pad, mode="constant", value=None, **_):
    if mode != "constant":
        raise low.unsupported(f"padding mode '{mode}' is not supported (constant only)")
    return low.pad_constant(self, pad, 0.0 if value is None else float(value))


@aten("unsqueeze.default")
def _unsqueeze(low, self, dim, **_):
    return low.unsqueeze(self, dim)


@aten("squeeze.dim", "squeeze.dims", "squeeze.default")
def _squeeze(low, self, dim=None, **_):
    return low.squeeze(self, dim)


@aten("cat.default", "concat.default")
def _cat(low, tensors, dim=0, **_):
    return low.cat(tensors, dim)


@aten("stack.default")
def _stack(low, tensors, dim=0, **_):
    return low.stack(tensors, dim)


@aten("slice.Tensor")
def _slice(low, self, dim=0, start=None, end=None, step=1, **_):
    return low.slice(self, dim, start, end, step)


@aten("narrow.default")
def _narrow(low, self, dim, start, length, **_):
    return low.slice(self, dim, start, start + length)


@aten("select.int")
def _select(low, self, dim, index, **_):
    return low.select(self, dim, index)


@aten("split.Tensor", "split_with_sizes.default", "split.sizes")
def _split(low, self, split_size=None, split_sizes=None, dim=0, **_):
    return low.split(self, split_size if split_size is not None else split_sizes, dim)


@aten("chunk.default")
def _chunk(low, self, chunks, dim=0, **_):
    return low.chunk(self, chunks, dim)


@aten("unbind.int")
def _unbind(low, self, dim=0, **_):
    return tuple(low.select(self, dim, i) for i in range(low.shape(self)[low.axis(dim, low.rank(self))]))


@aten("new_zeros.default", "new_ones.default", "new_full.default", "new_empty.default")
def _new(low, self, size, fill_value=None, dtype=None, **_):
    """A constant of the given size (dtype of ``self`` unless given)."""
    name = low.op_text
    value = {"new_zeros": 0, "new_ones": 1, "new_empty": 0}.get(name, fill_value)
    shape = [int(d) for d in size]
    return low.constant(torch.full(shape, value, dtype=dtype or IR_TO_TORCH[low.type(self).dtype]), base=name)


@aten("zeros_like.default", "ones_like.default", "full_like.default", "empty_like.default")
def _like(low, self, fill_value=None, dtype=None, **_):
    """A constant of ``self``'s shape (the value never depends on ``self``'s contents)."""
    name = low.op_text
    torch_dtype = dtype or IR_TO_TORCH[low.type(self).dtype]
    value = {"zeros_like": 0, "ones_like": 1, "empty_like": 0}.get(name, fill_value)
    return low.constant(torch.full(low.shape(self), value, dtype=torch_dtype), base=name)


@aten("broadcast_tensors.default")
def _broadcast_tensors(low, tensors, **_):
    from nncompile.ops.base import broadcast_shapes

    shape = broadcast_shapes("broadcast_tensors", *(low.shape(t) for t in tensors))
    return tuple(low.expand(t, shape) for t in tensors)
