"""The runner's TinyGPT is examples/gpt.nn's torch twin (examples/torch_models.Gpt): same function,
same training, once the weights are mapped. The distributed tests train TinyGPT, so this ties them to
the gpt.nn network."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nncompile.parallel.runner_model import TinyGPT, make_batches, train_single_process

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from torch_models import Gpt  # noqa: E402

VOCAB, SEQ, D, HEADS, LAYERS = 64, 8, 32, 4, 4


def twin_names(n_layer: int) -> dict[str, str]:
    """TinyGPT parameter name -> torch_models.Gpt parameter name."""
    names = {"embed.tok.weight": "wte.weight", "embed.pos": "wpe.weight", "head.ln.weight": "ln_f.weight",
             "head.ln.bias": "ln_f.bias", "head.out.weight": "head.weight"}
    pairs = [("ln1", "ln1"), ("ln2", "ln2"), ("attn.q", "attn.q"), ("attn.k", "attn.k"), ("attn.v", "attn.v"),
             ("attn.o", "attn.proj"), ("mlp.fc1", "mlp.fc"), ("mlp.fc2", "mlp.proj")]
    for i in range(n_layer):
        for ours, theirs in pairs:
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"blocks.{i}.{theirs}.{kind}"
    return names


def twin_pair():
    torch.manual_seed(3)
    gpt = Gpt(VOCAB, SEQ, D, HEADS, LAYERS).double()
    with torch.no_grad():                     # non-trivial layer norms, so a swapped pair would show
        for name, p in gpt.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    tiny = TinyGPT(VOCAB, D, HEADS, LAYERS, SEQ, head_bias=False)
    theirs = dict(gpt.named_parameters())
    mapping = twin_names(LAYERS)
    assert set(mapping) == {name for name, _ in tiny.named_parameters()}
    assert set(mapping.values()) == set(theirs)
    tiny.load_state_dict({ours: theirs[name].detach().clone() for ours, name in mapping.items()})
    return gpt, tiny, mapping


def test_tinygpt_computes_the_gpt_twin():
    gpt, tiny, _ = twin_pair()
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    expected = gpt(tokens, torch.arange(SEQ))
    assert torch.allclose(tiny(tokens), expected, rtol=0, atol=1e-12)
    assert expected.std() > 0.1


def test_tinygpt_trains_like_the_gpt_twin():
    """5 SGD steps: same losses and weights as the twin trained with gpt.nn's loss (token-mean cross-entropy)."""
    gpt, tiny, mapping = twin_pair()
    batches = make_batches(5, 8, SEQ, VOCAB)
    ours = train_single_process(tiny, batches, lr=0.1)
    optimizer = torch.optim.SGD(gpt.parameters(), lr=0.1)
    theirs = []
    for tokens, targets in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(gpt(tokens, torch.arange(SEQ)).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        theirs.append(loss.item())
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] != pytest.approx(ours[-1], abs=1e-3)
    params = dict(gpt.named_parameters())
    for name, value in tiny.named_parameters():
        assert torch.allclose(value, params[mapping[name]], rtol=0, atol=1e-12), name
