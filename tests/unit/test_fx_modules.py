"""Torch frontends on attention and transformer modules, direct parameter use, float64 modules, and
copying weights back into torch. Same tolerances as test_fx.py (float64 interpreter vs module.double():
<= 1e-10 relative; float32 vs torch float32: <= 1e-5 relative).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nncompile.errors import UnsupportedError
from nncompile.frontend.fx import from_fx, from_torch, state_dict_names, to_state_dict, trace
from nncompile.ir import run
from test_fx import check_against_torch, check_weights


class CrossAttention(nn.Module):
    """Sequence-first attention with different key/value widths (separate q/k/v projections)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)

    def forward(self, query, memory, values):
        out, _ = self.attn(query, memory, values, need_weights=False)
        return out


class SelfAttentionBlock(nn.Module):
    """batch_first self-attention (packed in-projection) with a residual, as a user would write it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.attn = nn.MultiheadAttention(24, 3, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class TwoLayerEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(16), enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


class DirectParameters(nn.Module):
    """Parameters used directly in forward (get_attr in fx, lifted parameters in export)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.register_buffer("gain", torch.full((5,), 1.5))

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b) * self.gain


CASES = {
    "cross_attention": (CrossAttention, lambda: (torch.randn(5, 2, 16), torch.randn(7, 2, 8), torch.randn(7, 2, 12))),
    "self_attention": (SelfAttentionBlock, lambda: (torch.randn(2, 6, 24),)),
    "encoder_stack": (TwoLayerEncoder, lambda: (torch.randn(2, 5, 16),)),
    "direct_parameters": (DirectParameters, lambda: (torch.randn(4, 6),)),
}


def _setup(case: str):
    make, inputs = CASES[case]
    torch.manual_seed(11)
    return make().eval(), inputs()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ("export", "fx"))
def test_module_matches_torch(case, path):
    module, inputs = _setup(case)
    graph = from_torch(module, inputs) if path == "export" else from_fx(module, inputs)
    check_against_torch(graph, module, inputs)
    names = check_weights(graph, module)
    assert set(names.values()) == set(module.state_dict())
    if "attention" in case or case == "encoder_stack":
        assert any(node.op == "sdpa" for node in graph.nodes)


def test_whole_transformer_layer_as_root():
    """A TransformerEncoderLayer given to from_fx directly (it cannot be traced) is lowered by its rule."""
    torch.manual_seed(12)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, batch_first=True, norm_first=True).eval()
    inputs = (torch.randn(3, 4, 16),)
    graph = from_fx(layer, inputs)
    assert graph.input_names == ("src",)
    check_against_torch(graph, layer, inputs)


class MaskedLayers(nn.Module):
    """Two encoder layers with boolean causal and key-padding masks as inputs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, batch_first=True)
                                    for _ in range(2))

    def forward(self, x, causal, padding):
        for layer in self.layers:
            x = layer(x, src_mask=causal, src_key_padding_mask=padding)
        return x


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder with masks (its causal-mask detection compares values: fx only)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x, causal, padding):
        return self.encoder(x, mask=causal, src_key_padding_mask=padding)


@pytest.mark.parametrize("path, module_type, kind", [("export", MaskedLayers, "bool"), ("fx", MaskedLayers, "bool"),
                                                     ("export", MaskedLayers, "float"), ("fx", MaskedEncoder, "float")])
def test_attention_masks(path, module_type, kind):
    torch.manual_seed(13)
    module = module_type().eval()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True  # the second sequence has two padded positions
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = may not attend (MultiheadAttention's rule)
    if kind == "float":  # additive masks: -inf where not attended
        causal = torch.zeros(5, 5).masked_fill(causal, float("-inf"))
        padding = torch.zeros(2, 5).masked_fill(padding, float("-inf"))
    inputs = (torch.randn(2, 5, 16), causal, padding)
    graph = from_torch(module, inputs) if path == "export" else from_fx(module, inputs)
    assert graph.input_names == ("x", "causal", "padding")
    assert graph.inputs[2].type.dtype == ("bool" if kind == "bool" else "f32")
    check_against_torch(graph, module, inputs)
    ops = [n.op for n in graph.nodes]
    assert "sdpa" not in ops and ops.count("softmax") == 2 and ("where" in ops) == (kind == "bool")


def test_sdpa_with_boolean_and_causal_mask():
    class Attend(nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=False) + \
                F.scaled_dot_product_attention(q, k, v, attn_mask=keep.float() * -2.0, scale=0.3)

    torch.manual_seed(14)
    keep = torch.rand(2, 1, 4, 4) > 0.3
    keep[..., 0] = True  # every query attends to at least one key
    inputs = (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), keep)
    for graph in (from_torch(Attend(), inputs), from_fx(Attend(), inputs)):
        check_against_torch(graph, Attend(), inputs)


def test_double_module_keeps_float64():
    module, inputs = _setup("direct_parameters")
    module = module.double()
    graph = from_torch(module, tuple(x.double() for x in inputs))
    assert {p.type.dtype for p in graph.params} == {"f64"} and graph.inputs[0].type.dtype == "f64"
    out = run(graph, {"x": inputs[0].double().numpy()})[graph.outputs[0]]
    with torch.no_grad():
        np.testing.assert_allclose(out, module(inputs[0].double()).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ("export", "fx"))
def test_weights_copy_back_into_torch(path):
    """Changed IR weights loaded back through the state_dict mapping give the same outputs in torch."""
    module, inputs = _setup("self_attention")
    graph = from_torch(module, inputs) if path == "export" else from_fx(trace(module, 1), inputs)
    rng = np.random.default_rng(0)
    changed = {name: (value + rng.normal(0, 0.1, value.shape)).astype(value.dtype)
               for name, value in graph.weights.items()}
    state = to_state_dict(graph, changed)
    assert set(state) == set(module.state_dict())
    module.load_state_dict(state, strict=True)
    got = run(graph, {"x": inputs[0].numpy()}, changed, dtype=np.float64)[graph.outputs[0]]
    with torch.no_grad():
        want = module.double()(inputs[0].double()).numpy()
    assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want))
    assert all(isinstance(source, str) for source in state_dict_names(graph).values())


def test_attention_weights_output_is_refused():
    class WantsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)  # need_weights=True: returns averaged attention weights too

    with pytest.raises(UnsupportedError, match="attention weights"):
        from_fx(WantsWeights().eval(), (torch.randn(1, 3, 8),))
