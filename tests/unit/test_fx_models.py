"""Torch frontends on two realistic hand-written models, on all three paths (export, decomposed export, fx):
a GPT-2 style decoder (tied embedding/head weights, causal-mask buffer sliced by the sequence length,
tanh-GELU written out, positions from ``torch.arange``) and a ResNet-style CNN (residual blocks with
in-place adds, strided downsampling, batch norm). Float64 interpreter vs ``module.double()``: <= 1e-10
relative; float32 vs torch float32: <= 1e-5 relative.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nncompile.frontend.fx import from_fx, from_torch, state_dict_names
from test_fx import check_against_torch, check_weights


class NewGELU(nn.Module):
    """GPT-2's tanh GELU, written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.n_head = heads
        self.n_embd = width
        self.register_buffer("bias", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width),
                                      act=NewGELU()))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        mlp = self.mlp
        return x + mlp.c_proj(mlp.act(mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 32, heads: int = 4, context: int = 16, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList([Block(width, heads, context) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)
        return F.relu(out)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

def gpt() -> tuple[nn.Module, tuple]:
    torch.manual_seed(21)
    return GPT().eval(), (torch.randint(0, 50, (2, 10)),)


def resnet() -> tuple[nn.Module, tuple]:
    torch.manual_seed(22)
    model = ResNetish()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), (torch.randn(2, 3, 32, 32),)


MODELS = {"gpt": gpt, "resnet": resnet}


@pytest.mark.parametrize("path", ("export", "export_decomposed", "fx"))
@pytest.mark.parametrize("model", MODELS)
def test_model_matches_torch(model, path):
    module, inputs = MODELS[model]()
    if path == "fx":
        graph = from_fx(module, inputs)
    else:
        graph = from_torch(module, inputs, decompose=path == "export_decomposed")
    check_against_torch(graph, module, inputs)
    names = check_weights(graph, module)
    if model == "gpt":
        # the tied head/embedding weight is one parameter; the mask buffer folds into a bool constant
        assert len({"wte.weight", "lm_head.weight"} & set(names.values())) == 1
        assert not {"h.0.attn.bias", "h.1.attn.bias"} & set(names.values())
        assert any(p.type.dtype == "bool" and not p.trainable for p in graph.params)
        assert graph.inputs[0].name == "idx" and graph.inputs[0].type.dtype == "i64"
    else:
        assert [n.op for n in graph.nodes].count("conv2d") == 6
        expected = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
        assert set(state_dict_names(graph).values()) == expected
