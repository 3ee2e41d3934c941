"""Locally connected layers through the CUDA emitter, run on the CPU (host emulation, see
test_cuda_emulated.py): the training graph of a small LocallyConnected2d/1d model == the interpreter."""
from __future__ import annotations

import shutil

import pytest

import nncompile as nnc
from nncompile.autodiff import training_graph

pytestmark = [pytest.mark.backend, pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")]


def test_local_layers_training_graph(tmp_path):
    from tests.cuda.test_cuda_emulated import _training

    graph = nnc.parse_text("""
    model local_small {
        input x: f32[3, 2, 6, 5]
        input s: f32[3, 2, 7]
        h = relu(LocallyConnected2d(x, 3, [3, 2], stride=[1, 2], padding=1))
        t = LocallyConnected1d(s, 2, 3, stride=2)
        logits = Linear(flatten(h), 4) + Linear(flatten(t), 4)
        output logits
        train {
            input labels: i64[3]
            loss = cross_entropy(logits, labels)
            optimizer sgd(lr=0.1)
        }
    }
    """)
    ops = [n.op for n in training_graph(graph).graph.nodes]
    assert ops.count("sparse_weight_grad") == 2, ops
    _training(graph, tmp_path, high=4)
