"""``nncompile check``: the per-node table, the totals, --set, --json, and exit status 2 on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nncompile.cli import main
from nncompile.frontend import parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def check(capsys, *argv):
    status = main(["check", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_mlp_table_and_json_totals(capsys):
    status, out, err = check(capsys, str(EXAMPLES / "mlp.nn"), "--set", "B=128", "--json")
    assert status == 0 and err == ""
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1])
    params = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert figures["model"] == "mlp" and figures["params"] == params
    assert figures["param_bytes"] == 4 * params
    assert figures["inputs"] == {"x": "f32[128,784]", "labels": "i64[128]"}
    assert figures["outputs"] == {"logits": "f32[128,10]"}
    graph = parse(EXAMPLES / "mlp.nn", set={"B": 128})
    assert figures["nodes"] == len(graph.nodes)
    assert figures["activation_bytes"] == sum(n.type.nbytes for n in graph.nodes)
    gemm_flops = 2 * 128 * (784 * 1024 + 1024 * 1024 + 1024 * 10)
    assert gemm_flops <= figures["flops"] <= 1.05 * gemm_flops
    # one table row per node, with the output shape and the parameters it reads
    fc1_row = next(line for line in lines if line.startswith("fc1 "))
    assert "linear" in fc1_row and "f32[128,1024]" in fc1_row and f"{784 * 1024 + 1024:,}" in fc1_row
    assert any(line.startswith("loss ") and "cross_entropy" in line for line in lines)


def test_set_changes_the_figures_and_inference_drops_loss(capsys):
    _, out_small, _ = check(capsys, str(EXAMPLES / "gpt.nn"), "--set", "layers=1", "--set", "T=16", "--json")
    _, out_big, _ = check(capsys, str(EXAMPLES / "gpt.nn"), "--set", "layers=2", "--set", "T=16", "--json",
                          "--inference")
    small, big = json.loads(out_small.splitlines()[-1]), json.loads(out_big.splitlines()[-1])
    assert small["inputs"]["tokens"] == "i64[8,16]"
    assert big["params"] > small["params"] and big["flops"] > small["flops"]
    assert "targets" not in big["inputs"] and big["train"] is None


def test_sparse_model_counts_nonzero_parameters(capsys):
    status, out, _ = check(capsys, str(EXAMPLES / "sparse_mlp.nn"), "--json")
    figures = json.loads(out.splitlines()[-1])
    dense_total = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 10 + 10
    kept = dense_total - 1024 * 1024 - 1024 * 256 + round(0.1 * 1024 * 1024) + 1024 * 256 // 2
    assert status == 0 and figures["params"] == dense_total and figures["nonzero_params"] == kept
    assert "nonzero      " in out


def test_print_ir_parses_back(capsys):
    from nncompile.ir import graphs_equal, parse_graph

    status, out, _ = check(capsys, str(EXAMPLES / "lenet.nn"), "--print-ir", "--set", "B=3")
    text = out[out.index("graph lenet {"): out.index("\n}\n") + 3]
    assert status == 0 and graphs_equal(parse_graph(text), parse(EXAMPLES / "lenet.nn", set={"B": 3}))


def test_text_output_without_json(capsys):
    status, out, _ = check(capsys, str(EXAMPLES / "lenet.nn"))
    assert status == 0
    assert out.splitlines()[0] == f"model lenet: {EXAMPLES / 'lenet.nn'}"
    assert "parameters   61,706" in out and "optimizer sgd(" in out
    assert not out.strip().splitlines()[-1].startswith("{")


@pytest.mark.parametrize("argv, message", [
    (["--set", "B"], "error: --set expects NAME=VALUE, got 'B'"),
    (["--set", "B=x"], "error: --set B: expected an integer, got 'x'"),
    (["--set", "Q=3"], "error: --set Q: no dimension named 'Q'"),
])
def test_bad_settings_exit_2(capsys, argv, message):
    status, out, err = check(capsys, str(EXAMPLES / "mlp.nn"), *argv)
    assert status == 2 and message in err


def test_bad_model_exits_2_with_located_message(tmp_path, capsys):
    bad = tmp_path / "bad.nn"
    bad.write_text("model m {\n  input x: f32[4, 3]\n  h = relu(x, x)\n  output h\n}\n")
    status, out, err = check(capsys, str(bad))
    assert status == 2
    assert err.splitlines() == [f"{bad}:3:7: error: relu takes 1 input (x), got 2", "      h = relu(x, x)",
                                "          ^"]
    status, _, err = check(capsys, str(tmp_path / "missing.nn"))
    assert status == 2 and "not found" in err


def test_command_line_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.nn"
    bad.write_text("model m {\n  input x: f32[4, 3\n}\n")
    launcher = "import sys; from nncompile.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", launcher, "check", str(bad), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{bad}:3:1: error: unexpected '}}'")
