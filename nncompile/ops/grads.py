"""vjp rules: the gradient of every op, written with other ops (``nncompile.autodiff.GradContext``).

A rule is ``vjp(ctx, node, g, *inputs) -> tuple`` with one entry per input of ``node``: the name of
the gradient value, or None where no gradient flows (integer inputs, labels, step counters). ``g`` is
the gradient of the node's output. Broadcasting inputs get ``ctx.unbroadcast``.
"""
from __future__ import annotations

import math

from nncompile.ops.base import broadcast_shapes, normalize_axis, set_rule


def _zero(ctx, like: str) -> str:
    t = ctx.type(like)
    return ctx.op("full", [], shape=t.shape, value=0.0, dtype=t.dtype)


def _mask(ctx, cond: str, g: str) -> str:
    """g where cond else 0."""
    return ctx.op("where", [cond, g, ctx.const(0.0, ctx.type(g).dtype)])


def _sigmoid_of(ctx, x):
    return ctx.op("sigmoid", [x])


# elementwise -----------------------------------------------------------------------------------------

def vjp_relu(ctx, node, g, x):
    # relu(x) > 0 exactly where x > 0: reading the output lets the input die after the forward
    return (_mask(ctx, ctx.op("gt", [node.name, ctx.const(0.0)]), g),)


def vjp_leaky_relu(ctx, node, g, x):
    slope = node.attrs["negative_slope"]
    return (ctx.op("where", [ctx.op("gt", [x, ctx.const(0.0)]), g, ctx.op("scale", [g], factor=slope)]),)


def vjp_tanh(ctx, node, g, x):
    y = node.name
    one_minus = ctx.op("add_scalar", [ctx.op("neg", [ctx.op("mul", [y, y])])], value=1.0)
    return (ctx.op("mul", [g, one_minus]),)


def vjp_sigmoid(ctx, node, g, x):
    y = node.name
    return (ctx.op("mul", [g, ctx.op("mul", [y, ctx.op("add_scalar", [ctx.op("neg", [y])], value=1.0)])]),)


def vjp_silu(ctx, node, g, x):
    s = _sigmoid_of(ctx, x)
    # d/dx x*s = s * (1 + x * (1 - s))
    inner = ctx.op("add_scalar", [ctx.op("mul", [x, ctx.op("add_scalar", [ctx.op("neg", [s])], value=1.0)])], value=1.0)
    return (ctx.op("mul", [g, ctx.op("mul", [s, inner])]),)


def vjp_gelu(ctx, node, g, x):
    if node.attrs["approximate"] == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = ctx.op("mul", [x, x])
        inner = ctx.op("scale", [ctx.op("add", [x, ctx.op("scale", [ctx.op("mul", [x2, x])], factor=0.044715)])], factor=c)
        t = ctx.op("tanh", [inner])
        dinner = ctx.op("scale", [ctx.op("add_scalar", [ctx.op("scale", [x2], factor=3 * 0.044715)], value=1.0)], factor=c)
        sech2 = ctx.op("add_scalar", [ctx.op("neg", [ctx.op("mul", [t, t])])], value=1.0)
        left = ctx.op("scale", [ctx.op("add_scalar", [t], value=1.0)], factor=0.5)
        right = ctx.op("scale", [ctx.op("mul", [x, ctx.op("mul", [sech2, dinner])])], factor=0.5)
        return (ctx.op("mul", [g, ctx.op("add", [left, right])]),)
    # d/dx x*Phi(x) = Phi(x) + x*phi(x)
    cdf = ctx.op("scale", [ctx.op("add_scalar", [ctx.op("erf", [ctx.op("scale", [x], factor=1 / math.sqrt(2.0))])],
                                  value=1.0)], factor=0.5)
    pdf = ctx.op("scale", [ctx.op("exp", [ctx.op("scale", [ctx.op("mul", [x, x])], factor=-0.5)])],
                 factor=1 / math.sqrt(2 * math.pi))
    return (ctx.op("mul", [g, ctx.op("add", [cdf, ctx.op("mul", [x, pdf])])]),)


def vjp_exp(ctx, node, g, x):
    return (ctx.op("mul", [g, node.name]),)


def vjp_log(ctx, node, g, x):
    return (ctx.op("div", [g, x]),)


def vjp_sqrt(ctx, node, g, x):
    return (ctx.op("div", [ctx.op("scale", [g], factor=0.5), node.name]),)


def vjp_rsqrt(ctx, node, g, x):
    y = node.name
    return (ctx.op("mul", [ctx.op("scale", [g], factor=-0.5), ctx.op("mul", [y, ctx.op("mul", [y, y])])]),)


def vjp_neg(ctx, node, g, x):
    return (ctx.op("neg", [g]),)


def vjp_abs(ctx, node, g, x):
    zero = ctx.const(0.0)
    pos = _mask(ctx, ctx.op("gt", [x, zero]), g)
    neg = _mask(ctx, ctx.op("gt", [zero, x]), g)
    return (ctx.op("sub", [pos, neg]),)


def vjp_erf(ctx, node, g, x):
    d = ctx.op("scale", [ctx.op("exp", [ctx.op("neg", [ctx.op("mul", [x, x])])])], factor=2 / math.sqrt(math.pi))
    return (ctx.op("mul", [g, d]),)


def vjp_clamp(ctx, node, g, x):
    lo, hi = node.attrs["min"], node.attrs["max"]
    if lo is not None:
        g = _mask(ctx, ctx.op("ge", [x, ctx.const(lo)]), g)
    if hi is not None:
        g = _mask(ctx, ctx.op("ge", [ctx.const(hi), x]), g)
    return (g,)


def vjp_scale(ctx, node, g, x):
    return (ctx.op("scale", [g], factor=node.attrs["factor"]),)


def vjp_add_scalar(ctx, node, g, x):
    return (g,)


def vjp_pow_scalar(ctx, node, g, x):
    e = node.attrs["exponent"]
    if e == 0:
        return (_zero(ctx, x),)
    if e == 1:
        return (g,)
    power = x if e == 2 else ctx.op("pow_scalar", [x], exponent=e - 1)
    return (ctx.op("mul", [g, ctx.op("scale", [power], factor=e)]),)


def vjp_add(ctx, node, g, a, b):
    return ctx.unbroadcast(g, ctx.type(a).shape), ctx.unbroadcast(g, ctx.type(b).shape)


def vjp_sub(ctx, node, g, a, b):
    return ctx.unbroadcast(g, ctx.type(a).shape), ctx.unbroadcast(ctx.op("neg", [g]), ctx.type(b).shape)


def vjp_mul(ctx, node, g, a, b):
    return (ctx.unbroadcast(ctx.op("mul", [g, b]), ctx.type(a).shape),
            ctx.unbroadcast(ctx.op("mul", [g, a]), ctx.type(b).shape))


def vjp_div(ctx, node, g, a, b):
    ga = ctx.op("div", [g, b])
    gb = ctx.op("neg", [ctx.op("div", [ctx.op("mul", [g, node.name]), b])])
    return ctx.unbroadcast(ga, ctx.type(a).shape), ctx.unbroadcast(gb, ctx.type(b).shape)


def _minmax(first: bool):
    def vjp(ctx, node, g, a, b):
        # ties send the gradient to a (as torch does for maximum/minimum: split evenly is also common)
        cond = ctx.op("ge", [a, b] if first else [b, a])
        ga = _mask(ctx, cond, g)
        gb = ctx.op("sub", [g, ga])
        return ctx.unbroadcast(ga, ctx.type(a).shape), ctx.unbroadcast(gb, ctx.type(b).shape)
    return vjp


def vjp_where(ctx, node, g, cond, a, b):
    ga = _mask(ctx, cond, g)
    gb = ctx.op("sub", [g, ga])
    return None, ctx.unbroadcast(ga, ctx.type(a).shape), ctx.unbroadcast(gb, ctx.type(b).shape)


def vjp_cast(ctx, node, g, x):
    if not ctx.type(x).is_float:
        return (None,)
    return (ctx.op("cast", [g], dtype=ctx.type(x).dtype),)


def vjp_identity(ctx, node, g, x):
    return (g,)


def vjp_dropout(ctx, node, g, x, offset=None):
    # the same mask: dropout is linear in x with a fixed (seeded) mask
    inputs = [g] if offset is None else [g, offset]
    return (ctx.op("dropout", inputs, **dict(node.attrs)), None)[: len(node.inputs)]


def no_grad(ctx, node, g, *inputs):
    return (None,) * len(inputs)


# matmul ----------------------------------------------------------------------------------------------

def _swap_last(ctx, x):
    rank = ctx.type(x).rank
    return ctx.op("transpose", [x], dim0=rank - 2, dim1=rank - 1)


def vjp_matmul(ctx, node, g, a, b):
    at, bt = ctx.type(a), ctx.type(b)
    # rank-1 operands become matrices so both products are plain batched matmuls
    a2 = a if at.rank > 1 else ctx.op("reshape", [a], shape=(1, at.shape[0]))
    b2 = b if bt.rank > 1 else ctx.op("reshape", [b], shape=(bt.shape[0], 1))
    a2t, b2t = ctx.type(a2), ctx.type(b2)
    batch = broadcast_shapes("matmul", a2t.shape[:-2], b2t.shape[:-2])
    g2 = ctx.op("reshape", [g], shape=batch + (a2t.shape[-2], b2t.shape[-1]))
    ga = ctx.unbroadcast(ctx.op("matmul", [g2, _swap_last(ctx, b2)]), a2t.shape)
    gb = ctx.unbroadcast(ctx.op("matmul", [_swap_last(ctx, a2), g2]), b2t.shape)
    if at.rank == 1:
        ga = ctx.op("reshape", [ga], shape=at.shape)
    if bt.rank == 1:
        gb = ctx.op("reshape", [gb], shape=bt.shape)
    return ga, gb


def vjp_linear(ctx, node, g, x, weight, bias=None):
    xt, wt = ctx.type(x), ctx.type(weight)
    gx = ctx.op("matmul", [g, weight])
    rows = xt.numel // xt.shape[-1] if xt.shape[-1] else 0
    g2 = g if ctx.type(g).rank == 2 else ctx.op("reshape", [g], shape=(rows, wt.shape[0]))
    x2 = x if xt.rank == 2 else ctx.op("reshape", [x], shape=(rows, wt.shape[1]))
    gw = ctx.op("matmul", [ctx.op("transpose", [g2], dim0=0, dim1=1), x2])
    grads = [gx, gw]
    if bias is not None:
        grads.append(ctx.op("sum", [g2], axes=(0,), keepdim=False))
    return tuple(grads)


# shape ops -------------------------------------------------------------------------------------------

def vjp_reshape_like(ctx, node, g, x):
    return (ctx.op("reshape", [g], shape=ctx.type(x).shape),)


def vjp_transpose(ctx, node, g, x):
    return (ctx.op("transpose", [g], dim0=node.attrs["dim0"], dim1=node.attrs["dim1"]),)


def vjp_permute(ctx, node, g, x):
    rank = ctx.type(x).rank
    dims = [normalize_axis("permute", d, rank) for d in node.attrs["dims"]]
    inverse = [0] * rank
    for i, d in enumerate(dims):
        inverse[d] = i
    return (ctx.op("permute", [g], dims=tuple(inverse)),)


def vjp_concat(ctx, node, g, *xs):
    axis = normalize_axis("concat", node.attrs["axis"], ctx.type(node.name).rank)
    grads, start = [], 0
    for x in xs:
        size = ctx.type(x).shape[axis]
        grads.append(ctx.op("slice", [g], axis=axis, start=start, end=start + size, step=1))
        start += size
    return tuple(grads)


def vjp_slice(ctx, node, g, x):
    a = dict(node.attrs)
    return (ctx.op("slice_scatter", [g], shape=ctx.type(x).shape, axis=a["axis"], start=a["start"], end=a["end"],
                   step=a["step"]),)


def vjp_expand(ctx, node, g, x):
    return (ctx.unbroadcast(g, ctx.type(x).shape),)


# reductions ------------------------------------------------------------------------------------------

def _keep_shape(ctx, x, axes):
    shape = ctx.type(x).shape
    red = range(len(shape)) if axes is None else [normalize_axis("reduce", a, len(shape)) for a in axes]
    return tuple(1 if i in red else d for i, d in enumerate(shape))


def _spread(ctx, node, g, x):
    """g reshaped with the reduced axes kept, expanded back to x's shape."""
    kept = ctx.op("reshape", [g], shape=_keep_shape(ctx, x, node.attrs["axes"]))
    return ctx.op("expand", [kept], shape=ctx.type(x).shape)


def vjp_sum(ctx, node, g, x):
    return (_spread(ctx, node, g, x),)


def vjp_mean(ctx, node, g, x):
    count = ctx.type(x).numel // max(ctx.type(node.name).numel, 1)
    return (ctx.op("scale", [_spread(ctx, node, g, x)], factor=1.0 / max(count, 1)),)


def vjp_max(ctx, node, g, x):
    # ties share the gradient evenly (torch's amax rule)
    keep = _keep_shape(ctx, x, node.attrs["axes"])
    y = ctx.op("reshape", [node.name], shape=keep)
    hit = ctx.op("cast", [ctx.op("eq", [x, y])], dtype=ctx.type(x).dtype)
    count = ctx.op("sum", [hit], axes=node.attrs["axes"], keepdim=True)
    share = ctx.op("div", [ctx.op("reshape", [g], shape=keep), count])
    return (ctx.op("mul", [hit, share]),)


# norms and softmax -----------------------------------------------------------------------------------

def vjp_softmax(ctx, node, g, x):
    y, axis = node.name, node.attrs["axis"]
    dot = ctx.op("sum", [ctx.op("mul", [g, y])], axes=(axis,), keepdim=True)
    return (ctx.op("mul", [y, ctx.op("sub", [g, dot])]),)


def vjp_log_softmax(ctx, node, g, x):
    y, axis = node.name, node.attrs["axis"]
    total = ctx.op("sum", [g], axes=(axis,), keepdim=True)
    return (ctx.op("sub", [g, ctx.op("mul", [ctx.op("exp", [y]), total])]),)


def _normalized(ctx, x, axes, eps):
    """(x - mean) * rstd and rstd, with the reduced axes kept."""
    mean = ctx.op("mean", [x], axes=axes, keepdim=True)
    centered = ctx.op("sub", [x, mean])
    var = ctx.op("mean", [ctx.op("mul", [centered, centered])], axes=axes, keepdim=True)
    rstd = ctx.op("rsqrt", [ctx.op("add_scalar", [var], value=eps)])
    return ctx.op("mul", [centered, rstd]), rstd


def _norm_input_grad(ctx, xhat, rstd, dxhat, axes):
    """rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over axes."""
    m1 = ctx.op("mean", [dxhat], axes=axes, keepdim=True)
    m2 = ctx.op("mean", [ctx.op("mul", [dxhat, xhat])], axes=axes, keepdim=True)
    inner = ctx.op("sub", [ctx.op("sub", [dxhat, m1]), ctx.op("mul", [xhat, m2])])
    return ctx.op("mul", [rstd, inner])


def vjp_layer_norm(ctx, node, g, x, weight=None, bias=None):
    rank = ctx.type(x).rank
    k = node.attrs["normalized_ndim"]
    axes = tuple(range(rank - k, rank))
    lead = tuple(range(rank - k))
    xhat, rstd = _normalized(ctx, x, axes, node.attrs["eps"])
    dxhat = ctx.op("mul", [g, weight]) if weight is not None else g
    grads = [_norm_input_grad(ctx, xhat, rstd, dxhat, axes)]
    if weight is not None:
        grads.append(ctx.op("sum", [ctx.op("mul", [g, xhat])], axes=lead, keepdim=False) if lead else ctx.op("mul", [g, xhat]))
    if bias is not None:
        grads.append(ctx.op("sum", [g], axes=lead, keepdim=False) if lead else g)
    return tuple(grads)


def vjp_batch_norm(ctx, node, g, x, mean, var, weight=None, bias=None):
    rank = ctx.type(x).rank
    c = ctx.type(x).shape[1]
    axes = (0,) + tuple(range(2, rank))
    chan = (1, c) + (1,) * (rank - 2)
    w = ctx.op("reshape", [weight], shape=chan) if weight is not None else None
    dxhat = ctx.op("mul", [g, w]) if w is not None else g
    if node.attrs["training"]:
        xhat, rstd = _normalized(ctx, x, axes, node.attrs["eps"])
        gx = _norm_input_grad(ctx, xhat, rstd, dxhat, axes)
    else:
        rstd = ctx.op("reshape", [ctx.op("rsqrt", [ctx.op("add_scalar", [var], value=node.attrs["eps"])])], shape=chan)
        xhat = ctx.op("mul", [ctx.op("sub", [x, ctx.op("reshape", [mean], shape=chan)]), rstd])
        gx = ctx.op("mul", [dxhat, rstd])
    grads = [gx, None, None]
    if weight is not None:
        grads.append(ctx.op("sum", [ctx.op("mul", [g, xhat])], axes=axes, keepdim=False))
    if bias is not None:
        grads.append(ctx.op("sum", [g], axes=axes, keepdim=False))
    return tuple(grads)


# losses, embedding, attention, pooling -----------------------------------------------------------

def vjp_cross_entropy(ctx, node, g, logits, labels):
    return ctx.op("cross_entropy_grad", [logits, labels, g], reduction=node.attrs["reduction"]), None


def vjp_mse(ctx, node, g, pred, target):
    n = ctx.type(pred).numel if node.attrs["reduction"] == "mean" else 1
    diff = ctx.op("scale", [ctx.op("sub", [pred, target])], factor=2.0 / max(n, 1))
    gp = ctx.op("mul", [diff, g])
    return gp, ctx.op("neg", [gp])


def vjp_embedding(ctx, node, g, ids, weight):
    return None, ctx.op("embedding_grad", [ids, g], vocab=ctx.type(weight).shape[0])


def vjp_sdpa(ctx, node, g, q, k, v):
    """One fused ``sdpa_grad`` (it recomputes the attention weights) packs dq, dk, dv flat over the broadcast
    batch; each is a slice of it, reshaped and summed back to its input's shape."""
    packed = ctx.op("sdpa_grad", [q, k, v, g], causal=node.attrs["causal"], scale=node.attrs["scale"])
    batch = ctx.type(g).shape[:-2]
    grads, start = [], 0
    for x in (q, k, v):
        shape = batch + ctx.type(x).shape[-2:]
        end = start + math.prod(shape)
        part = ctx.op("reshape", [ctx.op("slice", [packed], axis=0, start=start, end=end)], shape=shape)
        grads.append(ctx.unbroadcast(part, ctx.type(x).shape))
        start = end
    return tuple(grads)


def vjp_global_avg_pool(ctx, node, g, x):
    h, w = ctx.type(x).shape[2:]
    return (ctx.op("scale", [ctx.op("expand", [g], shape=ctx.type(x).shape)], factor=1.0 / (h * w)),)


def vjp_conv2d(ctx, node, g, x, weight, bias=None):
    a = dict(node.attrs)
    gx = ctx.op("conv2d_grad_input", [g, weight], input_shape=ctx.type(x).shape, **a)
    gw = ctx.op("conv2d_grad_weight", [x, g], weight_shape=ctx.type(weight).shape, **a)
    grads = [gx, gw]
    if bias is not None:
        grads.append(ctx.op("sum", [g], axes=(0, 2, 3), keepdim=False))
    return tuple(grads)


def vjp_max_pool(ctx, node, g, x):
    return (ctx.op("max_pool2d_grad", [x, g], **dict(node.attrs)),)


def vjp_avg_pool(ctx, node, g, x):
    return (ctx.op("avg_pool2d_grad", [g], input_shape=ctx.type(x).shape, **dict(node.attrs)),)


RULES = {
    "relu": vjp_relu, "leaky_relu": vjp_leaky_relu, "tanh": vjp_tanh, "sigmoid": vjp_sigmoid, "silu": vjp_silu,
    "gelu": vjp_gelu, "exp": vjp_exp, "log": vjp_log, "sqrt": vjp_sqrt, "rsqrt": vjp_rsqrt, "neg": vjp_neg,
    "abs": vjp_abs, "erf": vjp_erf, "clamp": vjp_clamp, "scale": vjp_scale, "add_scalar": vjp_add_scalar,
    "pow_scalar": vjp_pow_scalar, "add": vjp_add, "sub": vjp_sub, "mul": vjp_mul, "div": vjp_div,
    "maximum": _minmax(True), "minimum": _minmax(False), "where": vjp_where, "cast": vjp_cast,
    "identity": vjp_identity, "dropout": vjp_dropout, "matmul": vjp_matmul, "linear": vjp_linear,
    "reshape": vjp_reshape_like, "flatten": vjp_reshape_like, "squeeze": vjp_reshape_like,
    "unsqueeze": vjp_reshape_like, "transpose": vjp_transpose, "permute": vjp_permute, "concat": vjp_concat,
    "slice": vjp_slice, "expand": vjp_expand, "sum": vjp_sum, "mean": vjp_mean, "max": vjp_max,
    "softmax": vjp_softmax, "log_softmax": vjp_log_softmax, "layer_norm": vjp_layer_norm,
    "batch_norm": vjp_batch_norm, "cross_entropy": vjp_cross_entropy, "mse_loss": vjp_mse,
    "embedding": vjp_embedding, "sdpa": vjp_sdpa, "global_avg_pool2d": vjp_global_avg_pool,
    "conv2d": vjp_conv2d, "max_pool2d": vjp_max_pool, "avg_pool2d": vjp_avg_pool,
    # no gradient flows through these (comparisons, constants, backward-only ops)
    "gt": no_grad, "ge": no_grad, "eq": no_grad, "full": no_grad,
}


def register() -> None:
    for op, rule in RULES.items():
        set_rule(op, "vjp", rule)
