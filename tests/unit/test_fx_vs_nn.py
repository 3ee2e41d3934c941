"""The same network through both frontends: examples/mlp.nn and examples/lenet.nn parsed from .nn, and the
equivalent torch modules imported with from_torch / from_fx. Given the same weights (mapped through the
torch state_dict names), the two IR graphs give the same interpreter output (float64: <= 1e-12 relative)
and have the same parameter shapes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nncompile.frontend.dsl import parse
from nncompile.frontend.fx import from_fx, from_torch, state_dict_names
from nncompile.ir import prune, run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, images):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(images)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))))


@pytest.mark.parametrize("path", ("export", "fx"))
@pytest.mark.parametrize("name, module_type, shape", [("mlp", MLP, (3, 784)), ("lenet", LeNet, (2, 1, 28, 28))])
def test_nn_and_torch_frontends_agree(name, module_type, shape, path):
    if not (EXAMPLES / f"{name}.nn").exists():
        pytest.skip(f"examples/{name}.nn is absent")
    torch.manual_seed(0)
    module = module_type().eval()
    x = torch.randn(*shape)
    imported = from_torch(module, (x,)) if path == "export" else from_fx(module, (x,))
    written = prune(parse(EXAMPLES / f"{name}.nn", set={"B": shape[0]}))
    assert imported.input_names == written.input_names
    # the .nn parameters are named like the torch state_dict; feed both graphs the module's weights
    sources = state_dict_names(imported)
    assert sorted(sources.values()) == sorted(written.param_names)
    assert all(imported.type_of(ir).shape == written.type_of(sd).shape for ir, sd in sources.items())
    weights = {sd: imported.weights[ir] for ir, sd in sources.items()}
    feeds = {imported.input_names[0]: x.numpy()}
    got = run(written, feeds, weights, dtype=np.float64)[written.outputs[0]]
    want = run(imported, feeds, dtype=np.float64)[imported.outputs[0]]
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
    assert [n.op for n in imported.nodes if n.op in ("linear", "conv2d", "max_pool2d")] == \
        [n.op for n in written.nodes if n.op in ("linear", "conv2d", "max_pool2d")]
