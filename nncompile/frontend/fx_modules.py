"""nn.Module rules of the symbolic-trace frontend (``call_module`` nodes and whole modules).

A rule gets the module, its qualified name (the state_dict prefix of its parameters) and the call's
arguments; parameters and buffers come across under ``prefix.name``:

    @fx_module(nn.Linear)
    def _m_linear(low, m, prefix, input):
        return low.linear(input, _param(low, m, prefix, "weight"), _param(low, m, prefix, "bias"))

Attention and transformer layers do not trace symbolically (shape checks, fused fast paths), so
``trace()`` keeps them whole and their rules here lower the reference (non-fused) computation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
import torch.nn.functional as F

from nncompile.frontend.fx_lower import Lowering, Missing, Value
from nncompile.frontend.fx_torch import FX_FUNCTIONS

FX_MODULES: dict[type, Callable] = {}


def fx_module(*types: type):
    """Register a rule for modules of exactly these types."""
    def register(fn):
        for t in types:
            FX_MODULES[t] = fn
        return fn
    return register


def _param(low: Lowering, module: nn.Module, prefix: str, name: str):
    """A module's parameter or buffer under its state_dict name (None when absent)."""
    tensor = getattr(module, name, None)
    if tensor is None:
        return None
    full = f"{prefix}.{name}" if prefix else name
    trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
    return low.state_param(full, tensor, trainable=trainable)


@fx_module(nn.Linear)
def _m_linear(low, m, prefix, input):
    return low.linear(input, _param(low, m, prefix, "weight"), _param(low, m, prefix, "bias"))


@fx_module(nn.Conv1d, nn.Conv2d)
def _m_conv(low, m, prefix, input):
    if m.padding_mode != "zeros":
        raise low.unsupported(f"{type(m).__name__} with padding_mode='{m.padding_mode}' is not supported")
    return low.conv(input, _param(low, m, prefix, "weight"), _param(low, m, prefix, "bias"), m.stride, m.padding,
                    m.dilation, m.groups)


@fx_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _m_batch_norm(low, m, prefix, input):
    training = m.training or m.running_mean is None
    return low.batch_norm(input, _param(low, m, prefix, "weight"), _param(low, m, prefix, "bias"),
                          _param(low, m, prefix, "running_mean"), _param(low, m, prefix, "running_var"),
                          training, m.eps)


@fx_module(nn.LayerNorm)
def _m_layer_norm(low, m, prefix, input):
    return low.layer_norm(input, m.normalized_shape, _param(low, m, prefix, "weight"),
                          _param(low, m, prefix, "bias"), m.eps)


@fx_module(nn.Embedding)
def _m_embedding(low, m, prefix, input):
    if m.max_norm is not None:
        raise low.unsupported("nn.Embedding with max_norm is not supported")
    return low.embedding(_param(low, m, prefix, "weight"), input)


_SIMPLE_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}


@fx_module(*_SIMPLE_MODULES)
def _m_simple(low, m, prefix, input):
    return low.emit(_SIMPLE_MODULES[type(m)], [input])


@fx_module(nn.GELU)
def _m_gelu(low, m, prefix, input):
    return low.emit("gelu", [input], {"approximate": m.approximate})


@fx_module(nn.LeakyReLU)
def _m_leaky_relu(low, m, prefix, input):
    return low.emit("leaky_relu", [input], {"negative_slope": float(m.negative_slope)})


@fx_module(nn.Hardtanh, nn.ReLU6)
def _m_hardtanh(low, m, prefix, input):
    return low.clamp(input, m.min_val, m.max_val)


@fx_module(nn.Hardsigmoid, nn.Hardswish)
def _m_hard(low, m, prefix, input):
    return FX_FUNCTIONS[F.hardsigmoid if isinstance(m, nn.Hardsigmoid) else F.hardswish](low, input)


@fx_module(nn.Softmax, nn.LogSoftmax)
def _m_softmax(low, m, prefix, input):
    return low.softmax("softmax" if isinstance(m, nn.Softmax) else "log_softmax", input, m.dim)


@fx_module(nn.Dropout)
def _m_dropout(low, m, prefix, input):
    return low.dropout(input, m.p, m.training)


@fx_module(nn.Identity)
def _m_identity(low, m, prefix, input, *args, **kwargs):
    return input


@fx_module(nn.MaxPool2d)
def _m_max_pool(low, m, prefix, input):
    out = low.pool("max_pool2d", input, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    return (out, Missing("max_pool2d indices")) if m.return_indices else out


@fx_module(nn.AvgPool2d)
def _m_avg_pool(low, m, prefix, input):
    return low.pool("avg_pool2d", input, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad,
                    m.divisor_override)


@fx_module(nn.AdaptiveAvgPool2d)
def _m_adaptive_avg_pool(low, m, prefix, input):
    return low.adaptive_avg_pool(input, m.output_size)


@fx_module(nn.Flatten)
def _m_flatten(low, m, prefix, input):
    return low.flatten(input, m.start_dim, m.end_dim)


@fx_module(nn.Unflatten)
def _m_unflatten(low, m, prefix, input):
    return low.unflatten(input, m.dim, m.unflattened_size)


@fx_module(nn.CrossEntropyLoss)
def _m_cross_entropy(low, m, prefix, input, target):
    if m.weight is not None or m.label_smoothing:
        raise low.unsupported("CrossEntropyLoss with class weights or label smoothing is not supported")
    return low.cross_entropy(input, target, m.reduction)


@fx_module(nn.MSELoss)
def _m_mse(low, m, prefix, input, target):
    return low.mse_loss(input, target, m.reduction)


@fx_module(nn.MultiheadAttention)
def _m_mha(low, m, prefix, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
           average_attn_weights=True, is_causal=False):
    """Multi-head attention as in-projection, per-head ``sdpa`` and out-projection.

    Masks follow MultiheadAttention's conventions: boolean True (or -inf) = not attended;
    ``attn_mask`` is [L, S] or [B*heads, L, S], ``key_padding_mask`` is [B, S]."""
    if is_causal and attn_mask is None:
        raise low.unsupported("nn.MultiheadAttention: is_causal needs attn_mask (torch's convention)")
    if m.bias_k is not None or m.add_zero_attn:
        raise low.unsupported("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    if m.training and m.dropout > 0:
        raise low.unsupported("nn.MultiheadAttention with attention dropout in training mode is not supported")
    unbatched = low.rank(query) == 2
    same = query == key == value
    if unbatched:
        query, key, value = (low.unsqueeze(v, 0) for v in (query, key, value))
    elif not m.batch_first:
        query, key, value = (low.transpose(v, 0, 1) for v in (query, key, value))
    embed, heads = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        packed_weight = _param(low, m, prefix, "in_proj_weight")
    bias = _param(low, m, prefix, "in_proj_bias")
    if m._qkv_same_embed_dim and same:
        # one projection of the shared input, split into q, k, v along the features
        q, k, v = low.split(low.linear(query, packed_weight, bias), embed, -1)
    else:
        if m._qkv_same_embed_dim:
            weights = low.split(packed_weight, embed, 0)
        else:
            weights = [_param(low, m, prefix, f"{p}_proj_weight") for p in "qkv"]
        bias_parts = low.split(bias, embed, 0) if bias is not None else (None, None, None)
        q, k, v = (low.linear(x, w, b) for x, w, b in zip((query, key, value), weights, bias_parts))

    def heads_first(x: Value) -> Value:
        batch, length, _ = low.shape(x)
        return low.permute(low.reshape(x, (batch, length, heads, low.shape(x)[-1] // heads)), (0, 2, 1, 3))

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    mask = _mha_mask(low, attn_mask, key_padding_mask, q, low.shape(k)[-2], unbatched)
    attended = low.sdpa(q, k, v, attn_mask=mask)
    batch, _, length, _ = low.shape(attended)
    merged = low.reshape(low.permute(attended, (0, 2, 1, 3)), (batch, length, embed))
    out = low.linear(merged, _param(low, m.out_proj, f"{prefix}.out_proj" if prefix else "out_proj", "weight"),
                     _param(low, m.out_proj, f"{prefix}.out_proj" if prefix else "out_proj", "bias"))
    if unbatched:
        out = low.squeeze(out, [0])
    elif not m.batch_first:
        out = low.transpose(out, 0, 1)
    return out, (Missing("attention weights") if need_weights else None)


def _mha_mask(low: Lowering, attn_mask, key_padding_mask, q: Value, keys: int, unbatched: bool):
    """One additive [B, H, L, S]-broadcastable mask from MultiheadAttention's two masks (None if none)."""
    batch, heads, length, _ = low.shape(q)
    total = None
    if attn_mask is not None:
        total = low.additive_mask(attn_mask, masked_when_true=True, like=q)
        if low.rank(total) == 3:
            total = low.reshape(total, (batch, heads, length, keys))
    if key_padding_mask is not None:
        padding = low.additive_mask(key_padding_mask, masked_when_true=True, like=q)
        padding = low.reshape(padding, (1 if unbatched else batch, 1, 1, keys))
        total = padding if total is None else low.emit("add", [total, padding])
    return total


def call_module_rule(low: Lowering, module: nn.Module, prefix: str, *args, **kwargs):
    """Lower a call of a (sub)module by its rule; an unknown module type is an error naming it."""
    rule = FX_MODULES.get(type(module))
    if rule is None:
        raise low.unsupported(f"unsupported torch module {type(module).__module__}.{type(module).__name__} "
                              f"(submodule '{prefix}')")
    return rule(low, module, prefix, *args, **kwargs)


def _sub(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@fx_module(nn.TransformerEncoderLayer)
def _m_encoder_layer(low, m, prefix, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """The layer's reference (non-fused) forward: self-attention and feed-forward blocks, pre- or post-norm."""
    def run(name: str, *args, **kwargs):
        return call_module_rule(low, getattr(m, name), _sub(prefix, name), *args, **kwargs)

    def attention(x):
        out, _ = run("self_attn", x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                     need_weights=False, is_causal=bool(is_causal) and src_mask is not None)
        return run("dropout1", out)

    def feed_forward(x):
        hidden = run("linear1", x)
        if isinstance(m.activation, nn.Module):
            hidden = run("activation", hidden)
        elif m.activation in FX_FUNCTIONS:
            hidden = FX_FUNCTIONS[m.activation](low, hidden)
        else:
            raise low.unsupported(f"transformer activation {m.activation!r} is not supported")
        return run("dropout2", run("linear2", run("dropout", hidden)))

    x = src
    if m.norm_first:
        x = low.binary("add", x, attention(run("norm1", x)))
        return low.binary("add", x, feed_forward(run("norm2", x)))
    x = run("norm1", low.binary("add", x, attention(x)))
    return run("norm2", low.binary("add", x, feed_forward(x)))


@fx_module(nn.TransformerEncoder)
def _m_encoder(low, m, prefix, src, mask=None, src_key_padding_mask=None, is_causal=None):
    x = src
    for i, layer in enumerate(m.layers):
        x = call_module_rule(low, layer, _sub(prefix, f"layers.{i}"), x, mask, src_key_padding_mask)
    return call_module_rule(low, m.norm, _sub(prefix, "norm"), x) if m.norm is not None else x
