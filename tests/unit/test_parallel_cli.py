"""``nncompile parallel``: search, --evaluate, plan file, --json line, and every error exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nncompile.cli import main

GALVATRON = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "galvatron"
needs_data = pytest.mark.skipif(not GALVATRON.is_dir(), reason="../shared/datasets/galvatron not present")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LLAMA_PLAN = GALVATRON / "llama2-7b" / "galvatron_config_llama2-7b_1nodes_8gpus_per_node_36GB_bf16.json"


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@needs_data
def test_search_writes_a_plan_that_evaluate_prices_the_same(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    rc = main(["parallel", "--profile", str(GALVATRON / "llama2-7b"), "--cluster", "1x8-36gb",
               "--global-bsz", "16", "-o", str(plan_path), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    figures = last_json(out)
    assert figures["mode"] == "search" and figures["fits"] and figures["global_bsz"] == 16
    assert "layer stage" in out and "samples/s" in out
    written = json.loads(plan_path.read_text())
    for key in ("pp_deg", "tp_sizes_enc", "dp_types_enc", "checkpoint", "pp_division", "global_bsz", "chunks",
                "pipeline_type", "tp_consecutive_flags"):
        assert key in written
    assert written["predicted"]["step_time_ms"] == pytest.approx(figures["step_time_ms"])
    assert main(["parallel", "--profile", str(GALVATRON / "llama2-7b"), "--cluster", "1x8-36gb",
                 "--evaluate", str(plan_path), "--json"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["step_time_ms"] == pytest.approx(figures["step_time_ms"])


@needs_data
def test_evaluate_galvatron_plan_and_compare(capsys):
    assert main(["parallel", "--profile", str(GALVATRON / "llama2-7b"), "--cluster", "1x8-36gb",
                 "--evaluate", str(LLAMA_PLAN), "--json"]) == 0
    theirs = last_json(capsys.readouterr().out)
    assert theirs["mode"] == "evaluate" and theirs["vtp"] == 2 and theirs["fits"]
    assert main(["parallel", "--profile", str(GALVATRON / "llama2-7b"), "--cluster", "1x8-36gb",
                 "--global-bsz", "16", "--json"]) == 0
    ours = last_json(capsys.readouterr().out)
    assert ours["throughput_samples_per_s"] >= theirs["throughput_samples_per_s"]


@needs_data
@pytest.mark.parametrize("argv,message", [
    (["--cluster", "1x8-36gb"], "nothing to plan"),
    (["--profile", "{gpt}", "--cluster", "1x8-36gb"], "--model-config is needed"),
    (["--profile", "{gpt}", "--model-config", "gpt-9b", "--cluster", "1x8-36gb"], "not a built-in name"),
    (["--profile", "/nonexistent", "--model-config", "gpt-1.5b", "--cluster", "1x8-36gb"], "does not exist"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "nope.json"], "cannot read cluster"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "{badjson}"], "not valid JSON"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "2x8-40gb", "--global-bsz", "0"], "positive"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "2x8-40gb", "--pp", "2,x"], "--pp"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "2x8-40gb", "--pp", "3"], "must divide"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "2x8-40gb", "--global-bsz", "16",
      "--chunks", "3"], "does not divide"),
    (["--profile", "{gpt}", "--model-config", "gpt-6.7b", "--cluster", "2x8-40gb", "--memory", "4000",
      "--global-bsz", "64"], "no plan fits"),
    (["--profile", "{gpt}", "--model-config", "gpt-1.5b", "--cluster", "2x8-40gb", "--evaluate", "{modelcfg}"],
     "missing 'pp_deg'"),
    (["{nn}", "--cluster", "2x8-40gb"], "no model in this file"),
    (["{badjson}", "--cluster", "2x8-40gb"], "give a .nn model"),
    (["{mlp}", "--cluster", "cpu4-gloo"], "no repeated block"),
    (["{gptnn}", "--cluster", "cpu4-gloo", "--tflops", "0"], "--tflops must be positive"),
    (["{gptnn}", "--cluster", "cpu4-gloo", "--set", "B=x"], "expected an integer"),
])
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    nn = tmp_path / "model.nn"
    nn.write_text("")
    subst = {"{gpt}": str(GALVATRON / "gpt"), "{badjson}": str(bad), "{nn}": str(nn),
             "{modelcfg}": str(GALVATRON / "gpt" / "gpt-1.5b.json"), "{mlp}": str(EXAMPLES / "mlp.nn"),
             "{gptnn}": str(EXAMPLES / "gpt.nn")}
    rc = main(["parallel"] + [subst.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_cluster_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["parallel", "--profile", "x"])
    assert exit_info.value.code == 2
    assert "--cluster" in capsys.readouterr().err


def test_runner_command_line_rejects_bad_input_with_status_2(tmp_path, monkeypatch, capsys):
    from nncompile.parallel import runner

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runner.main([str(tmp_path / "plan.json")]) == 2
    assert "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert runner.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read plan" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"pp_deg": 3}')
    assert runner.main([str(tmp_path / "bad.json")]) == 2
    assert "missing 'tp_sizes_enc'" in capsys.readouterr().err
