"""Training under a memory budget (passes/recompute.py): recomputed forward values are real duplicate
nodes, the planned arena fits the budget, and the step computes exactly what the unbudgeted one does.

References: the NumPy interpreter on the unrewritten training graph, and the compiled unbudgeted step
(same weights, same inputs). Small GPT config so the file stays well under a minute.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nncompile as nnc
from nncompile.autodiff import training_graph
from nncompile.cli import main
from nncompile.ir.interp import run
from nncompile.passes.plan_memory import param_layout
from nncompile.passes.recompute import MemoryBudgetError, RecomputeOptions, fit_memory_budget

pytestmark = pytest.mark.backend

GPT = Path(__file__).resolve().parents[2] / "examples" / "gpt.nn"
CONFIG = {"B": 2, "T": 16, "d": 64, "heads": 4, "layers": 2, "vocab": 128}
# the compiled tests build one layer (g++ time), the CLI test reuses the budgeted module from the cache
COMPILED = dict(CONFIG, layers=1)
CLI_SETS = [arg for k, v in COMPILED.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def gpt():
    graph = nnc.parse(GPT, set=CONFIG)
    return graph, training_graph(graph), param_layout(graph.params, 64)


@pytest.fixture(scope="module")
def search(gpt):
    """The fast solver's path for the gpt training graph, shared by the budget sweeps below."""
    _, tg, layout = gpt
    return fit_memory_budget(tg.graph, "90%", None, layout)[1].search


def batch(graph, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG["vocab"], (CONFIG["B"], CONFIG["T"]))
    positions = np.arange(CONFIG["T"])
    targets = rng.integers(0, CONFIG["vocab"], (CONFIG["B"], CONFIG["T"]))
    return tokens, positions, targets


@pytest.mark.parametrize("method,budget", [("fast", "50%"), ("fast", "35%"), ("every_layer", None), ("sqrt_n", None)])
def test_rewrite_computes_the_same_step(gpt, search, method, budget):
    graph, tg, layout = gpt
    rewritten, report = fit_memory_budget(tg.graph, budget, None, layout, RecomputeOptions(method=method),
                                          search=search if method == "fast" else None)
    figures = report.figures
    assert figures["recomputed_nodes"] > 0 and figures["added_flops"] > 0
    assert figures["arena_bytes"] < figures["no_recompute_arena_bytes"]
    if budget is not None:
        assert figures["arena_bytes"] <= figures["budget_bytes"]
    # recomputed values are real duplicate nodes, placed after the backward pass has started
    order = [n.name for n in rewritten.nodes]
    copies = [i for i, name in enumerate(order) if name.endswith("_rc") or "_rc_" in name]
    assert len(copies) >= figures["recompute_steps"]
    assert min(copies) > order.index("loss")
    tokens, positions, targets = batch(graph)
    inputs = {"tokens": tokens, "positions": positions, "targets": targets}
    expected = run(tg.graph, inputs)
    got = run(rewritten, inputs)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_planned_arena_never_rises_as_budget_falls(gpt, search):
    _, tg, layout = gpt
    arenas, plain = [], None
    for percent in range(100, 25, -5):
        try:
            _, report = fit_memory_budget(tg.graph, f"{percent}%", None, layout, search=search)
        except MemoryBudgetError:
            break
        plain = report.figures["no_recompute_arena_bytes"]
        assert report.figures["arena_bytes"] <= report.figures["budget_bytes"]
        arenas.append(report.figures["arena_bytes"])
    assert len(arenas) >= 10, arenas                      # 100% .. 55% at least fit
    assert arenas == sorted(arenas, reverse=True), arenas
    assert arenas[0] == plain and arenas[-1] < 0.5 * plain


def test_infeasible_budget_names_the_smallest_feasible_one(gpt, search):
    _, tg, layout = gpt
    with pytest.raises(MemoryBudgetError) as caught:
        fit_memory_budget(tg.graph, "10%", None, layout, search=search)
    err = caught.value
    assert isinstance(err, nnc.NNError)
    assert "cannot be met; the smallest feasible budget found is" in err.message
    least = int(err.message.split("smallest feasible budget found is ")[1].split(" ")[0])
    # the budget it names really is feasible, and one alignment step less is not
    _, report = fit_memory_budget(tg.graph, least, None, layout, search=search)
    assert report.figures["arena_bytes"] <= least
    with pytest.raises(MemoryBudgetError):
        fit_memory_budget(tg.graph, least - 64, None, layout, search=search)


@pytest.mark.slow
def test_budgeted_step_matches_unbudgeted_gradients():
    graph = nnc.parse(GPT, set=COMPILED)
    plain = nnc.compile(graph, train=True)
    budgeted = nnc.compile(graph, train=True, memory_budget="50%")
    figures = budgeted.manifest["train"]["figures"]["recompute"]
    plain_arena = plain.manifest["train"]["arena_bytes"]
    assert budgeted.manifest["train"]["arena_bytes"] <= figures["budget_bytes"] == plain_arena // 2
    assert budgeted._trainer.arena.nbytes <= figures["budget_bytes"]          # what the module allocates
    assert figures["built_arena_bytes"] == budgeted.manifest["train"]["arena_bytes"]
    assert figures["no_recompute_arena_bytes"] == plain_arena
    assert figures["recomputed_nodes"] > 0
    for p, q in zip(plain.parameters().values(), budgeted.parameters().values()):
        np.testing.assert_array_equal(p, q)
    for step in range(2):
        inputs = batch(graph, seed=step)
        loss_plain = plain.train_step(*inputs)
        loss_budgeted = budgeted.train_step(*inputs)
        assert abs(loss_plain - loss_budgeted) <= 1e-6
        grads_plain, grads_budgeted = plain._trainer.grads(), budgeted._trainer.grads()
        assert grads_plain.keys() == grads_budgeted.keys()
        for name in grads_plain:
            np.testing.assert_allclose(grads_budgeted[name], grads_plain[name], rtol=0, atol=1e-6, err_msg=name)
    assert any(np.abs(g).max() > 1e-3 for g in grads_plain.values())


def test_cli_reports_the_recompute_choice(tmp_path, capsys):
    out = tmp_path / "build"
    assert main([str(GPT), *CLI_SETS, "--train", "--memory-budget", "50%", "-o", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    recompute = summary["train"]["recompute"]
    assert "recompute: budget" in text and "nodes recomputed" in text
    assert summary["train"]["arena_bytes"] == recompute["arena_bytes"] <= recompute["budget_bytes"]
    assert recompute["budget_bytes"] == recompute["no_recompute_arena_bytes"] // 2
    assert recompute["recomputed_nodes"] > 0 and recompute["added_flops"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["train"]["passes"][0]["name"] == "recompute"
    assert plan["train"]["memory"]["arena_bytes"] == recompute["arena_bytes"]
    assert "_rc" in (out / "graph_train.ir").read_text()


def test_cli_budget_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "build")
    assert main([str(GPT), *CLI_SETS, "--train", "--memory-budget", "5%", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "cannot be met; the smallest feasible budget found is" in err and "Traceback" not in err
    assert main([str(GPT), *CLI_SETS, "--memory-budget", "50%", "-o", out]) == 2
    assert "needs --train" in capsys.readouterr().err
    assert main([str(GPT), *CLI_SETS, "--train", "--memory-budget", "lots", "-o", out]) == 2
    assert "budget 'lots'" in capsys.readouterr().err


DROPOUT_MLP = """
dim B = 16
block Layer(x: tensor) {
    y = Linear(x, 128) |> BatchNorm1d() |> relu() |> Dropout(p=0.3)
    return Linear(y, 64)
}
model net {
    input x: f32[B, 64]
    h = repeat 4 Layer(x) as layers
    output h
    train {
        input labels: i64[B]
        loss = cross_entropy(h, labels)
        optimizer sgd(lr=0.1)
    }
}
"""


def test_recomputed_dropout_and_batch_norm_give_the_same_step():
    """Duplicated dropout nodes draw the same mask (seed + step), batch norm the same statistics."""
    graph = nnc.parse_text(DROPOUT_MLP)
    tg = training_graph(graph)
    layout = param_layout(graph.params, 64)
    rewritten, report = fit_memory_budget(tg.graph, "50%", None, layout)
    assert report.figures["arena_bytes"] <= report.figures["budget_bytes"]
    copies = [n for n in rewritten.nodes if "_rc" in n.name]
    assert any(n.op == "dropout" or "dropout" in str(n.attrs.get("body", "")) for n in copies)
    assert any(n.op == "batch_norm" for n in copies)
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((16, 64)).astype(np.float32), "labels": rng.integers(0, 64, 16)}
    if tg.step_input:
        inputs[tg.step_input] = np.array(3, dtype=np.int64)
    expected, got = run(tg.graph, inputs), run(rewritten, inputs)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
