"""Every example compiles, and the native module computes what the interpreter computes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nncompile as nnc
from nncompile.ir import prune, run

pytestmark = pytest.mark.backend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = {"mlp.nn": {"B": 16}, "lenet.nn": {"B": 4}, "gpt.nn": {"B": 2, "T": 32, "layers": 2},
         "sparse_mlp.nn": {"B": 8}, "local_mnist.nn": {"B": 8}}


def example_inputs(graph, seed=0):
    rng = np.random.default_rng(seed)
    found = {}
    for item in graph.inputs:
        t = item.type
        if t.dtype == "i64":
            high = min(t.shape[-1] if item.name == "positions" else 512, 512)
            found[item.name] = rng.integers(0, high, t.shape) if item.name != "positions" else np.arange(t.shape[0])
        else:
            found[item.name] = rng.standard_normal(t.shape).astype(np.float32)
    return found


@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_compiled_from_the_command_line_matches_interpreter(name, tmp_path):
    sets = [arg for k, v in SMALL[name].items() for arg in ("--set", f"{k}={v}")]
    result = subprocess.run([sys.executable, "-m", "nncompile", str(EXAMPLES / name), "-o", str(tmp_path), *sets],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    graph = nnc.parse(EXAMPLES / name, set=SMALL[name])
    model = nnc.load(tmp_path)
    sparse = [p.name for p in graph.params if p.type.sparsity is not None]
    for weight in sparse:   # every sparse weight's kernel choice is reported, with the reason
        assert f"  sparse:  {weight}: " in result.stdout, result.stdout
    inference_inputs = {i: v for i, v in example_inputs(graph).items() if i in model.input_names}
    got = model(**inference_inputs)
    got = got if isinstance(got, tuple) else (got,)
    inference = prune(graph)
    expected = run(inference, inference_inputs, model.parameters())
    for out_name, value in zip(model.output_names, got):
        ref = expected[out_name]
        np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=f"{name}: output {out_name}")


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.nn")} <= set(SMALL)


def test_training_demo_learns_the_synthetic_task(capsys):
    """The README's training demo: held-out accuracy goes from chance to well above it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mlp", EXAMPLES / "train_mlp.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main(["--epochs", "1", "--samples", "2048", "--batch", "64"])
    lines = capsys.readouterr().out.splitlines()
    before = float(lines[0].rsplit(" ", 1)[1])
    after = float(lines[-1].split("held-out accuracy ")[1].split()[0])
    assert before < 0.3 and after > 0.6, lines
