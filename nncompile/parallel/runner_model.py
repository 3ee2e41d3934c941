"""A small GPT made of identical blocks: the torch model the plan runner is tested and shown with.

The runner needs a model split into ``embed`` (tokens -> hidden, first stage), ``blocks`` (the chain
the plan assigns strategies to) and ``head`` (hidden -> logits, last stage), plus, per block, which
linear layers are split column-wise and row-wise under tensor parallelism (``TP_PLAN``). Attention
infers its local head count from the width of its (possibly column-sharded) projections, so the
same block code runs unsharded and under TP.

    model = TinyGPT(vocab=64, d_model=32, n_head=4, n_layer=4, seq=8)
    logits = model(tokens)                           # (batch, seq, vocab)
    loss = sample_loss_sum(logits, targets) / batch  # mean over samples of the per-token mean
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# submodule name -> "colwise" | "rowwise" (Megatron pairing: column-split then row-split)
TP_PLAN = {
    "attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.o": "rowwise",
    "mlp.fc1": "colwise", "mlp.fc2": "rowwise",
}


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.head_dim = d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        split = lambda t: t.view(batch, seq, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, vocab: int, d_model: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos[: tokens.shape[1]]


class Head(nn.Module):
    def __init__(self, vocab: int, d_model: int, bias: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class TinyGPT(nn.Module):
    """``embed`` -> ``blocks`` -> ``head``; deterministic for a given ``seed``. With ``head_bias=False``
    it is examples/gpt.nn's network (examples/torch_models.Gpt) under other parameter names."""

    def __init__(self, vocab: int = 64, d_model: int = 32, n_head: int = 4, n_layer: int = 4, seq: int = 8,
                 seed: int = 0, dtype: torch.dtype = torch.float64, head_bias: bool = True):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = Embed(vocab, d_model, seq)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.head = Head(vocab, d_model, head_bias)
        torch.random.set_rng_state(generator_state)
        self.to(dtype)
        self.config = {"vocab": vocab, "d_model": d_model, "n_head": n_head, "n_layer": n_layer, "seq": seq}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def sample_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over samples of each sample's mean token cross-entropy (divide by the global batch)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(dim=1).sum()


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (tokens, next-token targets) batches."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        data = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out


def train_single_process(model: TinyGPT, batches, lr: float) -> list[float]:
    """Reference: plain SGD on one process, loss = mean over the batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for tokens, targets in batches:
        optimizer.zero_grad()
        loss = sample_loss_sum(model(tokens), targets) / tokens.shape[0]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
