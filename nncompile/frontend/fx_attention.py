"""Attention helpers of the torch frontends (a mixin of ``Lowering``).

Unmasked attention is one ``sdpa`` op. A mask (``attn_mask`` of scaled_dot_product_attention, the
``attn_mask``/``key_padding_mask`` of nn.MultiheadAttention) becomes an additive float mask and the
attention is spelled out: ``softmax(q k^T * scale + mask) v``.

    low.sdpa(q, k, v, is_causal=True)
    low.sdpa(q, k, v, attn_mask=low.additive_mask(padding, masked_when_true=True, like=q))
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nncompile.frontend.fx_lower import Value


class AttentionOps:
    """Needs ``emit``, ``shape``, ``rank``, ``type``, ``tensor``, ``cast``, ``constant``, ``transpose``,
    ``matmul``, ``binary`` and ``unsupported`` from the host."""

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> Value:
        """torch's scaled_dot_product_attention; ``attn_mask`` is boolean (True = attend) or additive."""
        if dropout_p:
            raise self.unsupported("scaled_dot_product_attention with dropout_p > 0 is not supported")
        if enable_gqa:
            raise self.unsupported("scaled_dot_product_attention with enable_gqa is not supported")
        if attn_mask is None:
            return self.emit("sdpa", [q, k, v], {"causal": bool(is_causal),
                                                 "scale": None if scale is None else float(scale)})
        mask = self.additive_mask(attn_mask, masked_when_true=False, like=q)
        if is_causal:
            length, keys = self.shape(q)[-2], self.shape(k)[-2]
            causal = torch.zeros(length, keys).masked_fill(~torch.ones(length, keys, dtype=torch.bool).tril(),
                                                            float("-inf"))
            mask = self.emit("add", [mask, self.constant(causal.to(_torch_dtype(self, q)), base="causal_mask")])
        factor = float(scale) if scale is not None else 1.0 / math.sqrt(self.shape(q)[-1])
        scores = self.emit("scale", [self.matmul(q, self.transpose(k, -2, -1))], {"factor": factor})
        weights = self.emit("softmax", [self.emit("add", [scores, mask])], {"axis": -1})
        return self.matmul(weights, v)

    def additive_mask(self, mask, masked_when_true: bool, like) -> Value:
        """A float mask to add to attention scores: 0 where attended, -inf where masked.

        Boolean masks mean "attend" when True for scaled_dot_product_attention and "masked" when True
        for nn.MultiheadAttention (``masked_when_true``); float masks are already additive."""
        mask = self.tensor(mask)
        dtype = self.type(like).dtype
        if self.type(mask).dtype != "bool":
            return self.cast(mask, dtype)
        zero = self.constant(0.0, dtype, base="mask_zero")
        blocked = self.constant(float("-inf"), dtype, base="mask_blocked")
        return self.emit("where", [mask, blocked, zero] if masked_when_true else [mask, zero, blocked])


def _torch_dtype(low, v) -> torch.dtype:
    from nncompile.frontend.fx_lower import IR_TO_TORCH

    return IR_TO_TORCH[low.type(v).dtype]
