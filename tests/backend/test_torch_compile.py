"""torch.compile(model, backend="nncompile"): Dynamo's graphs compiled to native modules."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from nncompile.torch_backend import EagerFallbackWarning, make_backend

pytestmark = pytest.mark.backend


class SmallCnn(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn = tnn.BatchNorm2d(8)
        self.fc = tnn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=-1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_string_backend_compiles_without_falling_back():
    torch.manual_seed(0)
    net = SmallCnn().eval()
    compiled = torch.compile(net, backend="nncompile", dynamic=False)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerFallbackWarning)
        with torch.inference_mode():
            got, want = compiled(x), net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_weights_changed_in_torch_are_seen_and_new_shapes_recompile():
    torch.manual_seed(1)
    net = tnn.Sequential(tnn.Linear(12, 32), tnn.GELU(), tnn.Linear(32, 3)).eval()
    compiled = torch.compile(net, backend=make_backend(strict=True), dynamic=False)
    with torch.no_grad():
        x = torch.randn(4, 12)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
        net[0].weight.mul_(-0.5)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
        y = torch.randn(7, 12)
        torch.testing.assert_close(compiled(y), net(y), rtol=1e-4, atol=1e-5)


def test_calls_that_need_gradients_run_eagerly_with_a_warning():
    torch.manual_seed(2)
    net = tnn.Sequential(tnn.Linear(6, 6), tnn.Tanh())
    compiled = torch.compile(net, backend="nncompile", dynamic=False)
    x = torch.randn(3, 6)
    with pytest.warns(EagerFallbackWarning, match="needs gradients"):
        out = compiled(x)
    out.sum().backward()
    assert net[0].weight.grad is not None and out.requires_grad


def test_unsupported_ops_run_eagerly_and_the_parts_around_them_compile():
    torch.manual_seed(3)
    lin1, lin2 = tnn.Linear(5, 16), tnn.Linear(16, 4)

    def f(x):
        h = torch.relu(lin1(x))
        h = torch.cumsum(h, 1)           # no IR op: stays in torch
        return torch.tanh(lin2(h)) * 2

    x = torch.randn(3, 5)
    compiled = torch.compile(f, backend="nncompile", dynamic=False)
    with torch.no_grad():
        with pytest.warns(EagerFallbackWarning, match=r"cumsum.*\(2 compiled parts around them\)"):
            got = compiled(x)
        torch.testing.assert_close(got, f(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unsupported torch ops: torch.cumsum"):
        torch.compile(f, backend=make_backend(strict=True), dynamic=False)(x)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer_compiled_matches_torch(norm_first, activation):
    import nncompile as nnc

    torch.manual_seed(4)
    layer = tnn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True,
                                        norm_first=norm_first, activation=activation).eval()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        want = layer(x)
        got = nnc.compile(layer, (x,))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_processes_compiling_one_model_into_one_cache_both_succeed(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(
        "import numpy as np, nncompile as nnc\n"
        "g = nnc.parse_text('model race {\\n input x: f32[3, 40]\\n y = Linear(x, 24) |> tanh\\n output y\\n}\\n')\n"
        "m = nnc.compile(g)\n"
        "print(float(np.abs(m(np.ones((3, 40), np.float32))).sum()))\n")
    env = dict(os.environ, NNCOMPILE_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert code == 0, err
    assert results[0][0] == results[1][0]
    modules = list((tmp_path / "cache").rglob("*.so"))
    assert len(modules) == 1, modules          # one build, atomically renamed into place; no leftovers
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
