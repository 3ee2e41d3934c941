"""Backward ops of convolution and pooling (NCHW, torch semantics), used by the vjp rules of
conv2d, max_pool2d and avg_pool2d.

- ``conv2d_grad_input(grad, weight; input_shape, stride, padding, dilation, groups)`` -> dL/dx: the
  transposed convolution (``W_g^T @ grad`` per group, scattered back with col2im).
- ``conv2d_grad_weight(x, grad; weight_shape, stride, padding, dilation, groups)`` -> dL/dweight:
  ``grad @ im2col(x)^T`` per group, summed over the batch.
- ``max_pool2d_grad(x, grad; kernel, stride, padding, dilation, ceil_mode)`` -> dL/dx: each output's
  gradient goes to the argmax of its window, chosen as torch's CPU kernel does (the first maximal
  element in row-major window order; a NaN wins, the last one if several). A window that holds no
  input element at all (only padding) passes no gradient.
- ``avg_pool2d_grad(grad; input_shape, kernel, stride, padding, ceil_mode, count_include_pad)`` ->
  dL/dx: each output's gradient spread evenly over its window with the forward's divisor.

Attributes are canonical as in the forward ops (pairs for stride/padding/..., a 4-tuple for the
shape of the tensor the gradient is taken for), so a vjp rule passes the forward node's attributes
through unchanged.

    gx = conv2d_grad_input(gy, w, input_shape=x.shape, stride=(2, 2), padding=(1, 1))
"""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import REQUIRED, Cost, defop, require_float
from nncompile.ops.conv import conv_out, pair
from nncompile.ops.pool import _normalize as pool_normalize
from nncompile.ops.pool import _out_hw as pool_out_hw
from nncompile.ops.validate import as_int

CONV_ATTRS = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}


def _shape4(op: str, name: str, value) -> tuple[int, int, int, int]:
    if isinstance(value, list):
        value = tuple(value)
    if (not isinstance(value, tuple) or len(value) != 4
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in value)):
        raise ShapeError(f"{op}: {name} must be 4 positive ints, got {value!r}")
    return tuple(int(d) for d in value)


def _conv_normalize(op: str, shape_attr: str):
    def normalize(attrs):
        attrs[shape_attr] = _shape4(op, shape_attr, attrs[shape_attr])
        attrs["stride"] = pair(op, "stride", attrs["stride"], 1)
        attrs["padding"] = pair(op, "padding", attrs["padding"], 0)
        attrs["dilation"] = pair(op, "dilation", attrs["dilation"], 1)
        attrs["groups"] = as_int(op, "groups", attrs["groups"], minimum=1)
        return attrs
    return normalize


def _check_conv(op: str, x_shape, w_shape, grad: TensorType, stride, padding, dilation, groups) -> None:
    """The forward conv2d(x_shape, w_shape) must be valid and produce ``grad``'s shape."""
    if grad.rank != 4:
        raise ShapeError(f"{op}: grad must be [N, O, oh, ow], got {grad}")
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    if c % groups or o % groups:
        raise ShapeError(f"{op}: channels in ({c}) and out ({o}) must be divisible by groups={groups}")
    if cg * groups != c:
        raise ShapeError(f"{op}: weight [{o},{cg},{kh},{kw}] expects {cg * groups} input channels, input has {c}")
    oh = conv_out(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out(w, kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ShapeError(f"{op}: kernel {kh}x{kw} (dilation {dilation}) does not fit input {h}x{w} with padding {padding}")
    if grad.shape != (n, o, oh, ow):
        raise ShapeError(f"{op}: grad {grad} does not match the conv2d output [{n},{o},{oh},{ow}] "
                         f"of input [{n},{c},{h},{w}] and weight [{o},{cg},{kh},{kw}]")


def _same_dtype(op: str, a: TensorType, b: TensorType) -> None:
    if a.dtype != b.dtype:
        raise ShapeError(f"{op}: operands have different dtypes ({a} and {b})")


# conv2d_grad_input ------------------------------------------------------------------------------------


def _grad_input_infer(grad, weight, input_shape, stride, padding, dilation, groups):
    op = "conv2d_grad_input"
    require_float(op, grad, weight)
    _same_dtype(op, grad, weight)
    if weight.rank != 4:
        raise ShapeError(f"{op}: weight must be [O, C/groups, kh, kw], got {weight}")
    _check_conv(op, input_shape, weight.shape, grad, stride, padding, dilation, groups)
    return TensorType(input_shape, grad.dtype)


def _grad_input_ref(grad, weight, input_shape, stride, padding, dilation, groups):
    n, c, h, w = input_shape
    o, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = grad.shape[2:]
    og = o // groups
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=grad.dtype)
    for g in range(groups):
        # cols[n, c, i, j, y, x]: what every kernel tap contributes, then the adjoint of im2col
        cols = np.einsum("noyx,ocij->ncijyx", grad[:, g * og:(g + 1) * og], weight[g * og:(g + 1) * og], optimize=True)
        target = padded[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                target[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += cols[:, :, i, j]
    return padded[:, :, ph:ph + h, pw:pw + w].astype(grad.dtype)


def _grad_input_cost(out, grad, weight, **attrs):
    o, cg, kh, kw = weight.shape
    return Cost(2 * grad.numel * cg * kh * kw, grad.nbytes + weight.nbytes, out.nbytes)


def _grad_input_vjp(ctx, node, g, grad, weight):
    a = {k: node.attrs[k] for k in CONV_ATTRS}
    d_grad = ctx.op("conv2d", [g, weight], **a)
    d_weight = ctx.op("conv2d_grad_weight", [g, grad], weight_shape=ctx.type(weight).shape, **a)
    return (d_grad, d_weight)


defop("conv2d_grad_input", inputs=("grad", "weight"), attrs={"input_shape": REQUIRED, **CONV_ATTRS},
      normalize=_conv_normalize("conv2d_grad_input", "input_shape"), infer=_grad_input_infer, ref=_grad_input_ref,
      cost=_grad_input_cost, vjp=_grad_input_vjp, family="conv",
      doc="d conv2d / d x: the transposed convolution of grad [N, O, oh, ow] with weight, shaped input_shape")


# conv2d_grad_weight -----------------------------------------------------------------------------------


def _grad_weight_infer(x, grad, weight_shape, stride, padding, dilation, groups):
    op = "conv2d_grad_weight"
    require_float(op, x, grad)
    _same_dtype(op, x, grad)
    if x.rank != 4:
        raise ShapeError(f"{op}: input must be [N, C, H, W], got {x}")
    _check_conv(op, x.shape, weight_shape, grad, stride, padding, dilation, groups)
    return TensorType(weight_shape, x.dtype)


def _grad_weight_ref(x, grad, weight_shape, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    o, cg, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = grad.shape[2:]
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.empty(weight_shape, dtype=x.dtype)
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        cols = np.empty((n, cg, kh, kw, oh, ow), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
        out[g * og:(g + 1) * og] = np.einsum("ncijyx,noyx->ocij", cols, grad[:, g * og:(g + 1) * og], optimize=True)
    return out


def _grad_weight_cost(out, x, grad, **attrs):
    o, cg, kh, kw = out.shape
    return Cost(2 * grad.numel * cg * kh * kw, x.nbytes + grad.nbytes, out.nbytes)


def _grad_weight_vjp(ctx, node, g, x, grad):
    a = {k: node.attrs[k] for k in CONV_ATTRS}
    d_x = ctx.op("conv2d_grad_input", [grad, g], input_shape=ctx.type(x).shape, **a)
    d_grad = ctx.op("conv2d", [x, g], **a)
    return (d_x, d_grad)


defop("conv2d_grad_weight", inputs=("x", "grad"), attrs={"weight_shape": REQUIRED, **CONV_ATTRS},
      normalize=_conv_normalize("conv2d_grad_weight", "weight_shape"), infer=_grad_weight_infer, ref=_grad_weight_ref,
      cost=_grad_weight_cost, vjp=_grad_weight_vjp, family="conv",
      doc="d conv2d / d weight: grad [N, O, oh, ow] times im2col(x)^T per group, summed over the batch")


# pooling ----------------------------------------------------------------------------------------------


def _check_pool_grad(op: str, x_shape, grad: TensorType, kernel, stride, padding, dilation, ceil_mode) -> None:
    if grad.rank != 4:
        raise ShapeError(f"{op}: grad must be [N, C, oh, ow], got {grad}")
    oh, ow = pool_out_hw(TensorType(x_shape), kernel, stride, padding, dilation, ceil_mode)
    if oh < 1 or ow < 1:
        raise ShapeError(f"{op}: window {kernel} does not fit input {x_shape[2]}x{x_shape[3]}")
    expected = tuple(x_shape[:2]) + (oh, ow)
    if grad.shape != expected:
        raise ShapeError(f"{op}: grad {grad} does not match the pooled output [{','.join(map(str, expected))}] "
                         f"of input [{','.join(map(str, x_shape))}]")


def _tap_slices(i: int, j: int, oh: int, ow: int, stride, dilation):
    """Positions (in the padded input) that kernel tap (i, j) reads, for every output: a strided view."""
    return (slice(i * dilation[0], i * dilation[0] + stride[0] * (oh - 1) + 1, stride[0]),
            slice(j * dilation[1], j * dilation[1] + stride[1] * (ow - 1) + 1, stride[1]))


def _padded_size(size: int, kernel: int, stride: int, pad: int, dilation: int, out: int) -> int:
    """Room for every window position, including the ones ceil_mode puts past the right padding."""
    return max(size + 2 * pad, (out - 1) * stride + (kernel - 1) * dilation + 1)


def _max_grad_infer(x, grad, kernel, stride, padding, dilation, ceil_mode):
    op = "max_pool2d_grad"
    require_float(op, x, grad)
    _same_dtype(op, x, grad)
    if x.rank != 4:
        raise ShapeError(f"{op}: input must be [N, C, H, W], got {x}")
    _check_pool_grad(op, x.shape, grad, kernel, stride, padding, dilation, ceil_mode)
    return x.dense()


def max_pool_argmax(x, kernel, stride, padding, dilation, ceil_mode):
    """Index (i * kw + j) of the tap each output takes its value from (torch's CPU rule), -1 for a
    window with no input element; shape [N, C, oh, ow]."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = pool_out_hw(x, kernel, stride, padding, dilation, ceil_mode)
    big_h = _padded_size(h, kh, stride[0], padding[0], dilation[0], oh)
    big_w = _padded_size(w, kw, stride[1], padding[1], dilation[1], ow)
    big = np.full((n, c, big_h, big_w), -np.inf, dtype=x.dtype)
    big[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    inside = np.zeros((big_h, big_w), dtype=bool)
    inside[padding[0]:padding[0] + h, padding[1]:padding[1] + w] = True
    win = np.empty((n, c, oh, ow, kh * kw), dtype=x.dtype)
    valid = np.empty((oh, ow, kh * kw), dtype=bool)
    for i in range(kh):
        for j in range(kw):
            rows, cols = _tap_slices(i, j, oh, ow, stride, dilation)
            win[..., i * kw + j] = big[:, :, rows, cols]
            valid[..., i * kw + j] = inside[rows, cols]
    taps = kh * kw
    is_nan = np.isnan(win)
    last_nan = taps - 1 - np.argmax(is_nan[..., ::-1], axis=-1)
    first_max = np.argmax(np.where(is_nan, -np.inf, win), axis=-1)
    best = np.take_along_axis(win, first_max[..., None], axis=-1)[..., 0]
    first_valid = np.broadcast_to(np.argmax(valid, axis=-1), first_max.shape)
    # all valid elements -inf: torch keeps the first valid one (argmax over -inf padding would not)
    index = np.where(best == -np.inf, first_valid, first_max)
    index = np.where(is_nan.any(axis=-1), last_nan, index)
    return np.where(valid.any(axis=-1), index, -1)


def _max_grad_ref(x, grad, kernel, stride, padding, dilation, ceil_mode):
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = grad.shape[2:]
    index = max_pool_argmax(x, kernel, stride, padding, dilation, ceil_mode)
    big = np.zeros((n, c, _padded_size(h, kh, stride[0], padding[0], dilation[0], oh),
                    _padded_size(w, kw, stride[1], padding[1], dilation[1], ow)), dtype=grad.dtype)
    zero = np.zeros((), dtype=grad.dtype)
    for i in range(kh):
        for j in range(kw):
            rows, cols = _tap_slices(i, j, oh, ow, stride, dilation)
            big[:, :, rows, cols] += np.where(index == i * kw + j, grad, zero)
    return big[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w].copy()


def _max_grad_cost(out, x, grad, kernel, **attrs):
    return Cost(grad.numel * (kernel[0] * kernel[1] + 1), x.nbytes + grad.nbytes, out.nbytes)


defop("max_pool2d_grad", inputs=("x", "grad"),
      attrs={"kernel": REQUIRED, "stride": None, "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False},
      normalize=pool_normalize("max_pool2d_grad"), infer=_max_grad_infer, ref=_max_grad_ref, cost=_max_grad_cost,
      family="pool", doc="d max_pool2d / d x: each output's grad added at its window's argmax (torch's tie rule)")


def _avg_grad_normalize(attrs):
    attrs["input_shape"] = _shape4("avg_pool2d_grad", "input_shape", attrs["input_shape"])
    return pool_normalize("avg_pool2d_grad")(attrs)


def _avg_grad_infer(grad, input_shape, kernel, stride, padding, ceil_mode, count_include_pad):
    require_float("avg_pool2d_grad", grad)
    _check_pool_grad("avg_pool2d_grad", input_shape, grad, kernel, stride, padding, (1, 1), ceil_mode)
    return TensorType(input_shape, grad.dtype)


def avg_pool_divisor(h, w, oh, ow, kernel, stride, padding, count_include_pad) -> np.ndarray:
    """[oh, ow] divisors of avg_pool2d (torch's rule, the same as the forward ``ref``)."""
    ys = np.arange(oh) * stride[0] - padding[0]
    xs = np.arange(ow) * stride[1] - padding[1]
    if count_include_pad:
        hcount = np.minimum(ys + kernel[0], h + padding[0]) - ys
        wcount = np.minimum(xs + kernel[1], w + padding[1]) - xs
    else:
        hcount = np.minimum(ys + kernel[0], h) - np.maximum(ys, 0)
        wcount = np.minimum(xs + kernel[1], w) - np.maximum(xs, 0)
    return np.maximum(np.outer(hcount, wcount), 1)


def _avg_grad_ref(grad, input_shape, kernel, stride, padding, ceil_mode, count_include_pad):
    n, c, h, w = input_shape
    kh, kw = kernel
    oh, ow = grad.shape[2:]
    share = (grad / avg_pool_divisor(h, w, oh, ow, kernel, stride, padding, count_include_pad)).astype(grad.dtype)
    big = np.zeros((n, c, _padded_size(h, kh, stride[0], padding[0], 1, oh),
                    _padded_size(w, kw, stride[1], padding[1], 1, ow)), dtype=grad.dtype)
    for i in range(kh):
        for j in range(kw):
            rows, cols = _tap_slices(i, j, oh, ow, stride, (1, 1))
            big[:, :, rows, cols] += share
    return big[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w].copy()


def _avg_grad_cost(out, grad, kernel, **attrs):
    return Cost(grad.numel * (kernel[0] * kernel[1] + 1), grad.nbytes, out.nbytes)


def _avg_grad_vjp(ctx, node, g, grad):
    a = {k: v for k, v in node.attrs.items() if k != "input_shape"}
    return (ctx.op("avg_pool2d", [g], **a),)


defop("avg_pool2d_grad", inputs=("grad",),
      attrs={"input_shape": REQUIRED, "kernel": REQUIRED, "stride": None, "padding": (0, 0), "ceil_mode": False,
             "count_include_pad": True},
      normalize=_avg_grad_normalize, infer=_avg_grad_infer, ref=_avg_grad_ref, cost=_avg_grad_cost,
      vjp=_avg_grad_vjp, family="pool",
      doc="d avg_pool2d / d x: each output's grad spread over its window with the forward's divisor")
