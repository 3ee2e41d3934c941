"""PyTorch modules equal to examples/mlp.nn, lenet.nn and gpt.nn (same parameter names and shapes), the
reference the tests and benchmarks compare the compiled models against.

    net = Mlp(); net.load_state_dict(nnc_model.state_dict())
"""
from __future__ import annotations

import torch.nn as tnn
import torch.nn.functional as F


class Mlp(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = tnn.Linear(784, 1024), tnn.Linear(1024, 1024), tnn.Linear(1024, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = tnn.Conv2d(1, 6, 5, padding=2), tnn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = tnn.Linear(400, 120), tnn.Linear(120, 84), tnn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class Attention(tnn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (tnn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class Block(tnn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn, self.ln2 = tnn.LayerNorm(d), Attention(d, heads), tnn.LayerNorm(d)
        self.mlp = tnn.Module()
        self.mlp.fc, self.mlp.proj = tnn.Linear(d, 4 * d), tnn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln2(x))))


class Gpt(tnn.Module):
    def __init__(self, vocab, t, d, heads, layers):
        super().__init__()
        self.wte, self.wpe = tnn.Embedding(vocab, d), tnn.Embedding(t, d)
        self.blocks = tnn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = tnn.LayerNorm(d), tnn.Linear(d, vocab, bias=False)

    def forward(self, tokens, positions):
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))
