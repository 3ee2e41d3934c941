"""Op coverage of the torch frontends: small modules, each exercising a family of torch calls, imported
through torch.export (and its core-ATen decomposition for a subset) and torch.fx, compared with torch.

The interpreter runs in float64 on the float32 weights, against ``module.double()``: relative error
(max-abs error / max-abs value) <= 1e-10; float32 runs must match torch's float32 within 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nncompile.frontend.fx import from_fx, from_torch
from test_fx import check_against_torch, check_weights


class Elementwise(nn.Module):
    def forward(self, x, y):
        a = F.gelu(x, approximate="tanh") + F.gelu(y) - torch.sigmoid(x) * F.silu(y)
        b = torch.tanh(a) / (torch.exp(-y.abs()) + 1.0) + F.leaky_relu(x, 0.1) - 2.0 * x
        c = torch.clamp(b, -1.5, 2.0) + F.relu6(y * 3) + torch.maximum(x, y) - torch.minimum(x, 0.5 * y)
        d = torch.sqrt(x * x + 1.0) + torch.rsqrt(y.pow(2) + 2.0) - torch.log(torch.erf(x).abs() + 1.5)
        return c + d - 1.0 / (y * y + 1.0) + (1 - x) * (y - 0.75)


class Softmaxes(nn.Module):
    def forward(self, x):
        return F.softmax(x, dim=-1) + F.log_softmax(x, dim=1).mean(dim=1, keepdim=True) + x.amax(dim=-1, keepdim=True)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(12)
        self.ln2 = nn.LayerNorm((3, 12), elementwise_affine=False, eps=1e-3)
        self.bn = nn.BatchNorm1d(3, eps=1e-2)

    def forward(self, x):
        return self.ln(x) + self.ln2(x) + self.bn(x) + F.layer_norm(x, (12,), None, None, 1e-4)


class Shapes(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)                       # [2,3,4] each
        c = torch.cat([a, b * 2], dim=1)                # [2,6,4]
        d = c.permute(0, 2, 1).reshape(2, -1)           # [2,24]
        e = c[:, 1:5:2, :].transpose(1, 2).flatten(1)  # [2,8]
        f = x[1].unsqueeze(0).expand(2, 3, 8)[..., :4].squeeze()
        g = torch.stack([x.select(2, 0), x[:, :, -1]], dim=0).sum(0)
        s1, s2 = torch.split(x, [3, 5], dim=2)
        joined = torch.cat([d, e, f.flatten(1), g, s1.flatten(1), s2[:, None].mean(dim=(2, 3))], dim=1)
        return joined, x[:1, :1, :].squeeze(1), x[None, :, 1:, ::3]   # shapes [1, 8] and [1, 2, 2, 3]


class MatmulAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 32, bias=False)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, 4, 4).transpose(1, 2)
        k, v = self.kv(x).split(16, dim=-1)
        k = k.view(batch, length, 4, 4).transpose(1, 2)
        v = v.reshape(batch, length, 4, 4).permute(0, 2, 1, 3)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        manual = torch.matmul(scores, v)
        out = (causal + manual).transpose(1, 2).contiguous().view(batch, length, 16)
        return torch.bmm(out, out.transpose(1, 2)) + torch.mm(out[0], out[1].t()).sum()


class CausalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(6, 6, dtype=torch.bool)))

    def forward(self, scores):
        return torch.softmax(scores.masked_fill(~self.mask, float("-inf")), dim=-1)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4)
        self.c3 = nn.Conv1d(3, 5, 3, padding=1)

    def forward(self, x, seq):
        h = F.relu(self.c2(self.c1(x)))
        a = F.avg_pool2d(h, 3, stride=2, padding=1, count_include_pad=False)
        m = F.max_pool2d(h, 2, ceil_mode=True)
        ad = F.adaptive_avg_pool2d(h, (2, 2))
        return torch.cat([a.flatten(1), m.flatten(1), ad.flatten(1), self.c3(seq).mean(-1)], dim=1)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(dim=1)


class Losses(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x, labels, target):
        logits = self.fc(x)
        ce = F.cross_entropy(logits, labels) + F.cross_entropy(logits, labels, reduction="sum")
        return ce + F.mse_loss(logits, target) + logits.var(dim=0).sum()


class NormsPadsMins(nn.Module):
    def __init__(self):
        super().__init__()
        self.hard = nn.Sequential(nn.Hardswish(), nn.Hardsigmoid())

    def forward(self, x):
        a = F.normalize(x, dim=-1) + F.pad(x, (1, 2), value=0.5)[..., 1:-2] + F.hardswish(x) + self.hard(x)
        b = torch.logsumexp(x, dim=-1, keepdim=True) + x.std(dim=0) + x.amin(dim=-1, keepdim=True) + x.min()
        c = x.new_zeros(x.shape) + x.norm(dim=-1, keepdim=True) + torch.linalg.vector_norm(x, 1, dim=0)
        padded = F.pad(x, (0, 0, 2, 1))                  # rows: 2 before, 1 after
        return a + b + c + x.abs().sum() + padded[2:-1] * torch.logsumexp(padded, dim=0)


def _randn(*shape):
    return torch.randn(*shape)


CASES = {
    "elementwise": (Elementwise, lambda: (_randn(3, 5), _randn(3, 5))),
    "softmax": (Softmaxes, lambda: (_randn(4, 7),)),
    "norms": (Norms, lambda: (_randn(4, 3, 12),)),
    "shapes": (Shapes, lambda: (_randn(2, 3, 8),)),
    "attention": (MatmulAttention, lambda: (_randn(2, 5, 16),)),
    "causal_mask": (CausalMask, lambda: (_randn(2, 6, 6),)),
    "convs": (Convs, lambda: (_randn(2, 4, 9, 9), _randn(2, 3, 10))),
    "embedding": (Embed, lambda: (torch.randint(0, 20, (3, 4)),)),
    "norms_pads_mins": (NormsPadsMins, lambda: (_randn(3, 5) * 3,)),
    "losses": (Losses, lambda: (_randn(6, 5), torch.randint(0, 4, (6,)), _randn(6, 4))),
}
DECOMPOSED = ("elementwise", "shapes", "attention", "convs", "losses", "norms_pads_mins")


def _setup(case: str):
    make, inputs = CASES[case]
    torch.manual_seed(7)
    module = make().eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return module, inputs()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ("export", "fx"))
def test_case_matches_torch(case, path):
    module, inputs = _setup(case)
    graph = from_torch(module, inputs) if path == "export" else from_fx(module, inputs)
    check_against_torch(graph, module, inputs)
    check_weights(graph, module)


@pytest.mark.parametrize("case", DECOMPOSED)
def test_decomposed_case_matches_torch(case):
    module, inputs = _setup(case)
    graph = from_torch(module, inputs, decompose=True)
    check_against_torch(graph, module, inputs)


def test_expected_ops_appear():
    module, inputs = _setup("attention")
    ops = [n.op for n in from_torch(module, inputs).nodes]
    sdpa = [n for n in from_torch(module, inputs).nodes if n.op == "sdpa"]
    assert len(sdpa) == 1 and sdpa[0].attrs["causal"] is True and ops.count("softmax") == 1
    module, inputs = _setup("losses")
    assert "cross_entropy" in [n.op for n in from_torch(module, inputs, decompose=True).nodes]
    module, inputs = _setup("causal_mask")
    graph = from_torch(module, inputs)
    wheres = [n for n in graph.nodes if n.op == "where"]
    assert len(wheres) == 1  # ~mask folded at import time into a constant condition
    assert np.array_equal(graph.weights[wheres[0].inputs[0]], ~np.tril(np.ones((6, 6), dtype=bool)))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, ceil_mode=True), nn.AvgPool2d(3, ceil_mode=True),
                                  nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)])
def test_ceil_mode_window_wider_than_the_input(pool):
    """torch gives one output where a ceil-mode window is wider than the (padded) input (2 x 2 under 3 x 3)."""
    inputs = (torch.randn(2, 3, 2, 2),)
    graph = from_fx(pool, inputs)
    check_against_torch(graph, pool, inputs)


def test_pool_output_sizes_match_torch():
    """conv_out (every pool's output size) == torch's max_pool2d over sizes, kernels, strides, padding,
    dilation and ceil mode, including the sizes torch rejects (0 here)."""
    import itertools

    from nncompile.ops.conv import conv_out

    for size, k, s, p, d, ceil in itertools.product(range(1, 8), range(1, 5), range(1, 4), range(3), range(1, 3),
                                                    (False, True)):
        if p > k // 2:
            continue
        try:
            want = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), k, s, p, d, ceil_mode=ceil).shape[-1]
        except RuntimeError:
            want = 0
        assert conv_out(size, k, s, p, d, ceil) == want, (size, k, s, p, d, ceil)


@settings(max_examples=25)
@given(data=st.data())
def test_random_conv_pool_stacks(data):
    """Random conv2d (stride, padding, dilation, groups, bias) -> batch norm -> pool configurations."""
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    cin = groups * data.draw(st.integers(1, 3), "cin per group")
    cout = groups * data.draw(st.integers(1, 3), "cout per group")
    kernel = data.draw(st.integers(1, 3), "kernel")
    conv = nn.Conv2d(cin, cout, kernel, stride=data.draw(st.integers(1, 2), "stride"),
                     padding=data.draw(st.integers(0, 2), "padding"), dilation=data.draw(st.integers(1, 2), "dilation"),
                     groups=groups, bias=data.draw(st.booleans(), "bias"))
    size = data.draw(st.integers(6, 11), "size")
    pool_kind = data.draw(st.sampled_from(["max", "avg", "adaptive", "none"]), "pool")
    pool_kernel = data.draw(st.integers(1, 3), "pool kernel")
    pool_padding = data.draw(st.integers(0, pool_kernel // 2), "pool padding")
    ceil_mode = data.draw(st.booleans(), "ceil mode")
    pool = {"max": nn.MaxPool2d(pool_kernel, padding=pool_padding, ceil_mode=ceil_mode),
            "avg": nn.AvgPool2d(pool_kernel, padding=pool_padding, ceil_mode=ceil_mode,
                                count_include_pad=data.draw(st.booleans(), "count pad")),
            "adaptive": nn.AdaptiveAvgPool2d(data.draw(st.integers(1, 3), "adaptive size")),
            "none": nn.Identity()}[pool_kind]
    torch.manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    module = nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(), pool).eval()
    module[1].running_mean.uniform_(-0.5, 0.5)
    module[1].running_var.uniform_(0.5, 2.0)
    inputs = (torch.randn(2, cin, size, size),)
    try:
        module(*inputs)
    except RuntimeError:  # a configuration torch itself rejects (window larger than the image)
        assume(False)
    graph = from_fx(module, inputs)
    check_against_torch(graph, module, inputs)
    check_weights(graph, module)
