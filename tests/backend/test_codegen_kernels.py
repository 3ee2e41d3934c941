"""Generated C++ == the NumPy interpreter for the hand-vectorized kernel paths of the training step.

Covers what the op zoo (test_codegen_ops.py) does not reach at sizes that exercise the vector bodies
and their tails: sums / means over the leading axes (several rows per pass plus leftover rows, column
strips with a short last strip), head-split transposes (short contiguous runs), products folded into the sums / means that read them, layer norm,
cross-entropy and its gradient (row max / exp-sum in 8- and 16-lane
steps plus masked tails) and the GELU chains (forward and the autodiff derivative chain), which run
on zmm registers when the CPU has AVX-512F. NNC_NO_AVX512 is read once per process, so the AVX2-only
path is checked in a subprocess with it set.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompile.codegen import register_rules
from nncompile.driver import compile_graph
from nncompile.ir import GraphBuilder, TensorType, run

pytestmark = pytest.mark.backend

T = TensorType


def gelu_derivative_chain(b, x, g):
    """The chain the autodiff emits for d gelu(x) (erf form): g * (Phi(x) + x * phi(x))."""
    cdf = b.op("scale", [b.op("add_scalar", [b.op("erf", [b.op("scale", [x], {"factor": 1 / math.sqrt(2.0)})])],
                              {"value": 1.0})], {"factor": 0.5})
    pdf = b.op("scale", [b.op("exp", [b.op("scale", [b.op("mul", [x, x])], {"factor": -0.5})])],
               {"factor": 1 / math.sqrt(2 * math.pi)})
    return b.op("mul", [g, b.op("add", [cdf, b.op("mul", [x, pdf])])])


def mixed_chain(b, x, row, col):
    """Every op with a zmm form, with operands broadcast along rows and along columns."""
    z = b.op("add", [b.op("mul", [b.op("gelu", [x], {"approximate": "tanh"}), col]),
                     b.op("sigmoid", [b.op("sub", [x, row])])])
    z = b.op("clamp", [b.op("silu", [z])], {"min": -2.0, "max": 3.0})
    z = b.op("add", [z, b.op("abs", [b.op("neg", [b.op("pow_scalar", [x], {"exponent": 2.0})])])])
    z = b.op("maximum", [b.op("minimum", [z, row]), b.op("relu", [b.op("exp", [b.op("scale", [x], {"factor": 0.5})])])])
    root = b.op("div", [b.op("sqrt", [b.op("add_scalar", [b.op("abs", [x])], {"value": 0.5})]), b.op("add_scalar", [col], {"value": 9.0})])
    return b.op("mul", [b.op("rsqrt", [b.op("add_scalar", [b.op("abs", [x])], {"value": 0.5})]),
                        b.op("add", [b.op("tanh", [z]), b.op("erf", [root])])])


def product_reductions(b, x, g):
    """Reductions of products as the layer-norm backward has them: a mean over the last axis and a sum
    over the leading axes each reading a mul of their own (folded: the reduction multiplies), a mul
    read by a sum and by an add (kept), a mul read by a max (kept)."""
    found = [b.op("mean", [b.op("mul", [x, g])], {"axes": (-1,), "keepdim": True}),
             b.op("sum", [b.op("mul", [g, g])], {"axes": (0,), "keepdim": False})]
    shared = b.op("mul", [x, x])
    found += [b.op("sum", [shared], {"axes": (0,), "keepdim": False}), b.op("add", [shared, g])]
    found.append(b.op("max", [b.op("mul", [g, x])], {"axes": (-1,), "keepdim": False}))
    return found


def producer_sums(b, x, g, w):
    """Bias-gradient-like sums over the leading axes of fused nodes' outputs (folded into the producer
    when its output is free to write early): an elementwise chain's and a GEMM-headed chain's, and a
    mean of a reshaped chain output."""
    lead = {"axes": (0,), "keepdim": False}
    chain = b.op("mul", [b.op("gelu", [x]), g])
    gemm_chain = b.op("mul", [b.op("gelu", [b.op("linear", [x, w])]), g])
    cols = b.type_of(x).shape[-1]
    flat = b.op("reshape", [b.op("tanh", [b.op("add", [x, g])])], {"shape": (-1, cols)})
    return [b.op("sum", [chain], lead), b.op("sum", [gemm_chain], lead), gemm_chain, b.op("mean", [flat], lead)]


def kernel_graph(reduce_shapes, classes, elementwise_sizes, norm_shapes=(), head_shapes=()):
    """One graph: a leading-axes sum and mean per shape in ``reduce_shapes``, cross-entropy (mean) and
    its gradient (sum) for [7, C] logits per C in ``classes``, GELU forward and derivative per size,
    layer norm over the last axis per shape in ``norm_shapes`` (with and without weight and bias),
    attention's head split [B, T, H, hd] -> [B, H, T, hd] (contiguous runs of hd) per shape in
    ``head_shapes``."""
    register_rules()
    b = GraphBuilder("kernels")
    outputs = []
    for i, shape in enumerate(head_shapes):
        outputs.append(b.op("transpose", [b.input(f"heads{i}_x", T(shape))], {"dim0": 1, "dim1": 2}))
    for i, shape in enumerate(norm_shapes):
        x = b.input(f"ln{i}_x", T(shape))
        w = b.input(f"ln{i}_w", T(shape[-1:]))
        bias = b.input(f"ln{i}_b", T(shape[-1:]))
        outputs.append(b.op("layer_norm", [x, w, bias], {"normalized_ndim": 1}))
        outputs.append(b.op("layer_norm", [x], {"normalized_ndim": 1}))
        g = b.input(f"ln{i}_g", T(shape))
        outputs += product_reductions(b, x, g)
        outputs += producer_sums(b, x, g, b.input(f"ln{i}_wsq", T((shape[-1], shape[-1]))))
    for i, shape in enumerate(reduce_shapes):
        x = b.input(f"red{i}_x", T(shape))
        lead = tuple(range(len(shape) - 1)) if len(shape) > 2 else (0,)
        outputs.append(b.op("sum", [x], {"axes": lead, "keepdim": False}))
        outputs.append(b.op("mean", [x], {"axes": lead, "keepdim": True}))
    for c in classes:
        logits = b.input(f"ce{c}_logits", T((7, c)))
        labels = b.input(f"ce{c}_labels", T((7,), "i64"))
        outputs.append(b.op("cross_entropy", [logits, labels]))
        seed = b.op("full", [], {"shape": (), "value": 1.5})
        outputs.append(b.op("cross_entropy_grad", [logits, labels, seed], {"reduction": "sum"}))
    for n in elementwise_sizes:
        x = b.input(f"gelu{n}_x", T((n,)))
        outputs.append(b.op("gelu", [x]))
        outputs.append(gelu_derivative_chain(b, x, b.input(f"gelu{n}_g", T((n,)))))
        outputs.append(mixed_chain(b, b.input(f"gelu{n}_x2", T((3, n))), b.input(f"gelu{n}_row", T((1, n))),
                                   b.input(f"gelu{n}_col", T((3, 1)))))
    b.output(*outputs)
    return b.build()


def kernel_inputs(graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {}
    for item in graph.inputs:
        t = item.type
        if t.dtype == "i64":
            classes = graph.type_of(item.name.replace("_labels", "_logits")).shape[1]
            found[item.name] = rng.integers(0, classes, t.shape)
        elif item.name.endswith("_logits"):
            found[item.name] = (4.0 * rng.standard_normal(t.shape)).astype(np.float32)
        elif item.name.startswith("gelu") and item.name.endswith(("_x", "_x2")):
            # the whole useful range, both saturated ends, and exact zeros
            value = rng.uniform(-9.0, 9.0, t.shape).astype(np.float32)
            value[::5] = 0.0
            found[item.name] = value
        else:
            found[item.name] = np.asarray(rng.standard_normal(t.shape), dtype=np.float32).reshape(t.shape)
    return found


def check(graph, model, seed: int) -> None:
    inputs = kernel_inputs(graph, seed)
    expected = run(graph, inputs)
    for name, value in zip(graph.outputs, model(**inputs)):
        ref = expected[name]
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(value, ref, rtol=2e-5, atol=2e-6 * scale, err_msg=f"output {name}")


# rows: multiples of four, leftovers 1-3, fewer than four; columns: under one vector, a short last
# strip (2050 = 1025 + 1025, 4099 = 2048 + 2048 + 3)
REDUCE_SHAPES = [(1, 9), (3, 17), (4, 8), (7, 300), (130, 33), (9, 2050), (5, 4099), (2, 3, 40), (6, 2, 11)]
CLASSES = [1, 5, 8, 13, 16, 23, 515]
SIZES = [1, 15, 16, 17, 47, 1000]
NORM_SHAPES = [(3, 1), (2, 7), (5, 8), (4, 33), (2, 3, 256), (3, 301)]
HEAD_SHAPES = [(2, 5, 3, 8), (2, 3, 4, 64), (1, 3, 2, 256), (2, 3, 2, 12), (1, 2, 3, 264)]


@pytest.fixture(scope="module")
def kernels():
    graph = kernel_graph(REDUCE_SHAPES, CLASSES, SIZES, NORM_SHAPES, HEAD_SHAPES)
    return graph, compile_graph(graph)


@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_interpreter(kernels, seed):
    graph, model = kernels
    check(graph, model, seed)


def test_kernels_without_avx512_match_interpreter_and_zmm_path(kernels, tmp_path):
    """The same graph in a fresh process with NNC_NO_AVX512=1 (the AVX2 bodies and tails): it matches
    the interpreter, and what this process computes (the zmm loops where the CPU has AVX-512F) to a
    few ulp: both widths run the same operations per lane, except that g++ may fuse a multiply and an
    add of the chain into one FMA in one loop and not in the other."""
    graph, model = kernels
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests/backend'); import test_codegen_kernels as t; "
            "from nncompile.driver import compile_graph; "
            "g = t.kernel_graph(t.REDUCE_SHAPES, t.CLASSES, t.SIZES, t.NORM_SHAPES, t.HEAD_SHAPES); m = compile_graph(g); t.check(g, m, 3); "
            "np.savez(sys.argv[1], *m(**t.kernel_inputs(g, 3)))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "NNC_NO_AVX512": "1"}
    saved = tmp_path / "avx2.npz"
    done = subprocess.run([sys.executable, "-c", code, str(saved)], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    narrow = np.load(saved)
    wide = model(**kernel_inputs(graph, 3))
    for k, (name, value) in enumerate(zip(graph.outputs, wide)):
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(value, narrow[f"arr_{k}"], rtol=1e-6, atol=1e-7 * scale, err_msg=f"output {name}")


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), cols=st.integers(1, 600), classes=st.integers(1, 70), size=st.integers(1, 300))
def test_random_shapes_match_interpreter(rows, cols, classes, size):
    graph = kernel_graph([(rows, cols)], [classes], [size], [(rows, cols)])
    check(graph, compile_graph(graph), rows + cols)


def test_products_folded_into_reductions(kernels):
    """The muls read only by a sum / mean emit no code where that reduction reads each element once
    (a mean over >= 32 trailing elements, a sum over leading axes leaving more than one output); the
    others stay."""
    graph, model = kernels
    source = (Path(model.module_path).parent / "kernels.cpp").read_text()
    expected = sum((shape[-1] >= 32) + (math.prod(shape[1:]) > 1) for shape in NORM_SHAPES)
    assert expected == 8
    assert source.count("// no product:") == expected


def test_sums_folded_into_producers(kernels):
    """Every producer_sums reduction with more than one output column is computed by its fused
    producer; the rest run their own loop."""
    graph, model = kernels
    source = (Path(model.module_path).parent / "kernels.cpp").read_text()
    assert source.count("// computed by its producer") == 3 * sum(shape[-1] > 1 for shape in NORM_SHAPES)
