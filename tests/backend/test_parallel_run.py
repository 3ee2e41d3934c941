"""Plans executed on 4 gloo ranks train exactly like one process (losses and final weights).

One launch of 4 processes trains a fresh TinyGPT for 5 SGD steps under each plan; the reference is
plain single-process training on the same batches. float64 throughout, so the only differences are
summation orders. The model is examples/gpt.nn's network (tests/unit/test_parallel_model.py checks
TinyGPT(head_bias=False) against its torch twin, examples/torch_models.Gpt)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nncompile.parallel.runner import launch, plans_worker
from nncompile.parallel.runner_model import TinyGPT, make_batches, train_single_process

LAYERS, STEPS, BATCH, LR = 4, 5, 8, 0.1
MODEL = dict(vocab=64, d_model=32, n_head=4, n_layer=LAYERS, seq=8, head_bias=False)   # gpt.nn's network


def plan(pp, tp, sdp=0, ckpt=0, consec=1, chunks=1, division=None):
    per_layer = lambda v: ",".join(str(x) for x in (v if isinstance(v, list) else [v] * LAYERS))  # noqa: E731
    return {"pp_deg": pp, "tp_sizes_enc": per_layer(tp), "dp_types_enc": per_layer(sdp),
            "checkpoint": per_layer(ckpt), "tp_consecutive_flags": per_layer(consec), "global_bsz": BATCH,
            "chunks": chunks, "pp_division": division or ",".join([str(LAYERS // pp)] * pp),
            "pipeline_type": "pipedream_flush"}


PLANS = {
    "dp4": plan(1, 1),
    "tp2xdp2": plan(1, 2),
    "sdp4": plan(1, 1, sdp=1),
    "pp2xdp2": plan(2, 1, chunks=2),
    "mixed tp/sdp/ckpt, strided tp, 2 micro-batches": plan(1, [2, 2, 1, 4], sdp=[1, 0, 1, 0], ckpt=[1, 0, 1, 0],
                                                          consec=[0, 1, 1, 1], chunks=2),
    "pp2 mixed, uneven division, 4 micro-batches": plan(2, [2, 1, 2, 1], sdp=[1, 0, 0, 1], ckpt=[0, 1, 1, 0],
                                                       chunks=4, division="1,3"),
}


def _check_plan(out: Path, index: int, raw: dict, ref_losses, ref_params) -> None:
    result = json.loads((out / f"plan{index}.json").read_text())
    assert len(result["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(result["losses"], ref_losses)) < 1e-9, result["losses"]
    division = [int(x) for x in raw["pp_division"].split(",")]
    seen = set()
    for stage in range(raw["pp_deg"]):
        params = torch.load(out / f"plan{index}_stage{stage}.pt")
        first = sum(division[:stage])
        for key, value in params.items():
            parts = key.split(".")
            if parts[0] == "blocks":
                parts[1] = str(int(parts[1]) + first)
            full = ".".join(parts)
            seen.add(full)
            assert value.shape == ref_params[full].shape, full
            assert torch.allclose(value, ref_params[full].detach(), rtol=0, atol=1e-10), full
    assert seen == set(ref_params), "every parameter of the model is owned by some stage"


@pytest.mark.slow
def test_plans_train_like_a_single_process(tmp_path):
    """One launch for all plans (one test, so pytest-xdist never launches the ranks twice)."""
    launch(plans_worker, 4, (list(PLANS.values()), MODEL, STEPS, BATCH, LR, str(tmp_path)))
    reference = TinyGPT(**MODEL)
    ref_losses = train_single_process(reference, make_batches(STEPS, BATCH, MODEL["seq"], MODEL["vocab"]), LR)
    ref_params = dict(reference.named_parameters())
    failures = []
    for index, (name, raw) in enumerate(PLANS.items()):
        try:
            _check_plan(tmp_path, index, raw, ref_losses, ref_params)
        except AssertionError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)


def test_reference_training_moves_the_weights():
    """The comparison above is meaningful: 5 steps change the loss and the weights."""
    model = TinyGPT(**MODEL)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = train_single_process(model, make_batches(STEPS, BATCH, MODEL["seq"], MODEL["vocab"]), LR)
    assert len(set(round(x, 6) for x in losses)) == STEPS
    assert max((before[k] - v).abs().max().item() for k, v in model.named_parameters()) > 1e-3
