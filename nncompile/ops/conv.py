"""2-D convolution (NCHW, torch semantics: stride, padding, dilation, groups)."""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import TensorType
from nncompile.ops.base import Cost, defop, require_float
from nncompile.ops.validate import as_int


def pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """Canonical (h, w) pair from an int or a 2-sequence; checked against ``minimum``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not isinstance(value, tuple) or len(value) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        raise ShapeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ShapeError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return (int(value[0]), int(value[1]))


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool = False) -> int:
    span = dilation * (kernel - 1) + 1
    numer = size + 2 * pad - span
    # floor division as torch's div_rtn: with ceil_mode a window a little wider than the padded input
    # still gives one output (numer in (-stride, 0)); a result below 1 is the caller's error
    out = max(0, (numer + (stride - 1 if ceil_mode else 0)) // stride + 1)
    if ceil_mode and out > 0 and (out - 1) * stride >= size + pad:
        out -= 1          # the last window must start inside the input or its left padding (torch rule)
    return out


def _normalize(attrs):
    attrs["stride"] = pair("conv2d", "stride", attrs["stride"], 1)
    attrs["padding"] = pair("conv2d", "padding", attrs["padding"], 0)
    attrs["dilation"] = pair("conv2d", "dilation", attrs["dilation"], 1)
    attrs["groups"] = as_int("conv2d", "groups", attrs["groups"], minimum=1)
    return attrs


def _infer(x, weight, bias, stride, padding, dilation, groups):
    require_float("conv2d", x, weight, bias)
    if x.rank != 4:
        raise ShapeError(f"conv2d: input must be [N, C, H, W], got {x}")
    if weight.rank != 4:
        raise ShapeError(f"conv2d: weight must be [O, C/groups, kh, kw], got {weight}")
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c % groups or o % groups:
        raise ShapeError(f"conv2d: channels in ({c}) and out ({o}) must be divisible by groups={groups}")
    if cg * groups != c:
        raise ShapeError(f"conv2d: weight {weight} expects {cg * groups} input channels, input has {c}")
    if bias is not None and bias.shape != (o,):
        raise ShapeError(f"conv2d: bias must be [{o}], got {bias}")
    oh = conv_out(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out(w, kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ShapeError(f"conv2d: kernel {kh}x{kw} (dilation {dilation}) does not fit input {h}x{w} "
                         f"with padding {padding}")
    return TensorType((n, o, oh, ow), x.dtype)


def _ref(x, weight, bias, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = conv_out(h, kh, sh, ph, dh)
    ow = conv_out(w, kw, sw, pw, dw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    og = o // groups
    out = np.zeros((n, o, oh, ow), dtype=np.result_type(x, weight))
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = weight[g * og:(g + 1) * og]
        # gather every kernel tap as a strided view, then contract channels and taps at once
        cols = np.empty((n, cg, kh, kw, oh, ow), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
        out[:, g * og:(g + 1) * og] = np.einsum("ncijyx,ocij->noyx", cols, ws, optimize=True)
    if bias is not None:
        out += bias.reshape(1, o, 1, 1)
    return out.astype(x.dtype)


def _cost(out, x, weight, bias, **attrs):
    o, cg, kh, kw = weight.shape
    flops = 2 * out.numel * cg * kh * kw + (out.numel if bias is not None else 0)
    read = x.nbytes + weight.nbytes + (bias.nbytes if bias is not None else 0)
    return Cost(flops, read, out.nbytes)


defop("conv2d", inputs=("x", "weight", "bias?"),
      attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1},
      infer=_infer, ref=_ref, cost=_cost, normalize=_normalize, family="conv",
      doc="2-D convolution, NCHW input, weight [O, C/groups, kh, kw] (torch.nn.functional.conv2d)")
