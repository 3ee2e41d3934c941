"""Per-layer costs of a .nn model (examples/gpt.nn) vs hand-counted figures; the CLI on a .nn model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import nncompile as nnc
from nncompile.cli import main
from nncompile.errors import InputError
from nncompile.parallel.cluster import load_cluster
from nncompile.parallel.cost import CostModel
from nncompile.parallel.from_ir import model_cost_from_graph
from nncompile.parallel.plan import plan_from_json
from nncompile.parallel.search import SearchOptions, search

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
B, T, D, VOCAB, LAYERS = 4, 16, 64, 100, 3
MB = 2.0**20


def gpt_cost(tflops=50.0):
    graph = nnc.parse(EXAMPLES / "gpt.nn", set={"B": B, "T": T, "d": D, "vocab": VOCAB, "layers": LAYERS})
    return model_cost_from_graph(graph, tflops)


def test_gpt_blocks_match_hand_counts():
    model = gpt_cost()
    assert model.num_layers == LAYERS and not model.mixed_precision
    layer = model.layers[0]
    assert layer.param_mb * MB == 4 * (12 * D * D + 13 * D)            # q, k, v, proj, fc, proj, 2 layer norms
    assert layer.boundary_mb_per_sample * MB == 4 * T * D
    assert layer.ckpt_act_mb_per_sample == layer.boundary_mb_per_sample
    # forward FLOPs per sample: the six GEMMs (2 * T * 12 d^2) plus attention (~4 T^2 d) and elementwise
    gemm, attention = 2 * T * 12 * D * D, 4 * T * T * D
    assert gemm + attention <= layer.flops_per_sample <= 1.15 * (gemm + attention)
    assert layer.fwd_ms(1) == pytest.approx(layer.flops_per_sample / 50e12 * 1e3)
    # activations: every output kept; TP splits all but the [B, T, d]-shaped ones (at least 7 of them)
    acts = [layer.act_mb(t) for t in (1, 2, 4, 8)]
    assert acts == sorted(acts, reverse=True)
    assert acts[-1] >= 7 * layer.boundary_mb_per_sample
    assert acts[0] - acts[1] == pytest.approx(2 * (acts[1] - acts[2]))    # the split part halves each time
    # the embedding (token + position tables) on the first stage, the head on the last: 16 bytes/param
    vocab = model.vocab
    assert vocab.states_mb("first", 1) * MB == 16 * (VOCAB * D + T * D)
    assert vocab.states_mb("last", 1) * MB == 16 * (D * VOCAB + 2 * D)
    assert vocab.fwd_ms("last", 1) > 0


def test_search_and_evaluate_agree_on_a_nn_model(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    argv = [str(EXAMPLES / "gpt.nn"), "--set", f"B={B}", "--set", f"T={T}", "--set", f"d={D}", "--set",
            f"vocab={VOCAB}", "--set", f"layers={LAYERS}", "--tflops", "50", "--cluster", "cpu4-gloo"]
    assert main(["parallel", *argv, "--global-bsz", "16", "-o", str(plan_path), "--json"]) == 0
    searched = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert searched["fits"] and searched["global_bsz"] == 16
    assert main(["parallel", *argv, "--evaluate", str(plan_path), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["step_time_ms"] == pytest.approx(searched["step_time_ms"])
    # the searched plan is no slower than pure DP over the 4 devices
    model, cluster = gpt_cost(), load_cluster("cpu4-gloo")
    dp = plan_from_json({"pp_deg": 1, "tp_sizes_enc": "1,1,1", "dp_types_enc": "0,0,0", "global_bsz": 16, "chunks": 1},
                        4, LAYERS)
    assert searched["step_time_ms"] <= CostModel(model, cluster).evaluate(dp).step_ms + 1e-4
    assert search(model, cluster, SearchOptions(global_bsz=16)).cost.step_ms == pytest.approx(searched["step_time_ms"], abs=1e-4)


def test_models_without_a_repeated_block_are_refused():
    with pytest.raises(InputError, match="no repeated block"):
        model_cost_from_graph(nnc.parse(EXAMPLES / "mlp.nn"), 10.0)
    with pytest.raises(InputError, match="positive"):
        gpt_cost(tflops=0.0)
