"""Pooling: max / average over 2-D windows, global average pooling (NCHW, torch semantics)."""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import REQUIRED, Cost, defop, require_float
from nncompile.ops.conv import conv_out, pair
from nncompile.ops.validate import as_bool


def _normalize(op):
    def normalize(attrs):
        attrs["kernel"] = pair(op, "kernel", attrs["kernel"], 1)
        attrs["stride"] = attrs["kernel"] if attrs["stride"] is None else pair(op, "stride", attrs["stride"], 1)
        attrs["padding"] = pair(op, "padding", attrs["padding"], 0)
        if "dilation" in attrs:
            attrs["dilation"] = pair(op, "dilation", attrs["dilation"], 1)
        attrs["ceil_mode"] = as_bool(op, "ceil_mode", attrs["ceil_mode"])
        if "count_include_pad" in attrs:
            attrs["count_include_pad"] = as_bool(op, "count_include_pad", attrs["count_include_pad"])
        for k, p in zip(attrs["kernel"], attrs["padding"]):
            if p * 2 > k:
                raise ShapeError(f"{op}: padding {attrs['padding']} must be at most half the kernel {attrs['kernel']}")
        return attrs
    return normalize


def _out_hw(x, kernel, stride, padding, dilation, ceil_mode):
    return tuple(conv_out(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(2))


def _infer(op):
    def infer(x, kernel, stride, padding, ceil_mode, dilation=(1, 1), **rest):
        require_float(op, x)
        if x.rank != 4:
            raise ShapeError(f"{op}: input must be [N, C, H, W], got {x}")
        oh, ow = _out_hw(x, kernel, stride, padding, dilation, ceil_mode)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{op}: window {kernel} does not fit input {x.shape[2]}x{x.shape[3]}")
        return TensorType(x.shape[:2] + (oh, ow), x.dtype)
    return infer


def _windows(x, kernel, stride, padding, dilation, ceil_mode, fill):
    """[N, C, oh, ow, kh, kw] window values (out-of-range positions = fill) and the window origins."""
    n, c, h, w = x.shape
    oh, ow = _out_hw(x, kernel, stride, padding, dilation, ceil_mode)
    kh, kw = kernel
    big = np.full((n, c, h + 2 * padding[0] + kh * dilation[0] + stride[0] * oh,
                   w + 2 * padding[1] + kw * dilation[1] + stride[1] * ow), fill, dtype=x.dtype)
    big[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    win = np.empty((n, c, oh, ow, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            win[..., i, j] = big[:, :, i * dilation[0]:i * dilation[0] + stride[0] * oh:stride[0],
                                 j * dilation[1]:j * dilation[1] + stride[1] * ow:stride[1]]
    return win, oh, ow


def _max_ref(x, kernel, stride, padding, dilation, ceil_mode):
    win, _, _ = _windows(x, kernel, stride, padding, dilation, ceil_mode, -np.inf)
    return win.max(axis=(4, 5)).astype(x.dtype)


def _avg_ref(x, kernel, stride, padding, ceil_mode, count_include_pad):
    n, c, h, w = x.shape
    win, oh, ow = _windows(x, kernel, stride, padding, (1, 1), ceil_mode, 0.0)
    total = win.sum(axis=(4, 5), dtype=np.float64)
    ys = np.arange(oh) * stride[0] - padding[0]
    xs = np.arange(ow) * stride[1] - padding[1]
    if count_include_pad:
        # torch: the window is clipped to the padded input, not to the real one
        hcount = np.minimum(ys + kernel[0], h + padding[0]) - ys
        wcount = np.minimum(xs + kernel[1], w + padding[1]) - xs
    else:
        hcount = np.minimum(ys + kernel[0], h) - np.maximum(ys, 0)
        wcount = np.minimum(xs + kernel[1], w) - np.maximum(xs, 0)
    count = np.maximum(np.outer(hcount, wcount), 1)
    return (total / count).astype(x.dtype)


def _pool_cost(out, x, kernel, **attrs):
    return Cost(out.numel * kernel[0] * kernel[1], x.nbytes, out.nbytes)


defop("max_pool2d", inputs=("x",),
      attrs={"kernel": REQUIRED, "stride": None, "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False},
      infer=_infer("max_pool2d"), ref=_max_ref, cost=_pool_cost, normalize=_normalize("max_pool2d"), family="pool",
      doc="max over kernel windows (stride defaults to the kernel; padding counts as -inf)")
defop("avg_pool2d", inputs=("x",),
      attrs={"kernel": REQUIRED, "stride": None, "padding": (0, 0), "ceil_mode": False, "count_include_pad": True},
      infer=_infer("avg_pool2d"), ref=_avg_ref, cost=_pool_cost, normalize=_normalize("avg_pool2d"), family="pool",
      doc="mean over kernel windows (torch's count_include_pad rule)")


def _gap_infer(x):
    require_float("global_avg_pool2d", x)
    if x.rank != 4:
        raise ShapeError(f"global_avg_pool2d: input must be [N, C, H, W], got {x}")
    return TensorType(x.shape[:2] + (1, 1), x.dtype)


defop("global_avg_pool2d", inputs=("x",), infer=_gap_infer,
      ref=lambda x: x.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(x.dtype),
      cost=lambda out, x: Cost(x.numel, x.nbytes, out.nbytes), family="pool",
      doc="mean over H and W: [N, C, H, W] -> [N, C, 1, 1]")
