"""Generated C++ for the conv / pool backward ops == their NumPy refs (the interpreter).

One graph holds every case (grouped, strided, dilated, padded, pointwise and depthwise convs; max
pools with ties, dilation and ceil_mode; average pools with and without count_include_pad), compiled
once. It runs on 1 thread (images in turn, threads inside the GEMMs) and on 2 and 3 threads (one
image per thread with per-thread partial weight gradients, including a team size that does not
divide the batch), and every output is compared with the interpreter.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nncompile.ops.conv_grad  # noqa: F401  (until nncompile.ops imports it)
from nncompile.codegen import cpp_ops_grad, cpp_ops_nn, register_rules
from nncompile.driver import compile_graph
from nncompile.ir import GraphBuilder, TensorType, run
from nncompile.ops import get_op

pytestmark = pytest.mark.backend

T = TensorType

CONV_CASES = {
    # name: (x shape, weight shape, attrs)
    "grouped": ((3, 4, 9, 8), (6, 2, 3, 3), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 2}),
    "pointwise": ((2, 5, 6, 7), (3, 5, 1, 1), {}),
    "pointwise_grouped": ((3, 6, 4, 5), (9, 2, 1, 1), {"groups": 3}),
    "depthwise": ((4, 3, 7, 7), (6, 1, 3, 3), {"padding": 1, "groups": 3}),
    "gaps": ((2, 3, 10, 11), (4, 3, 2, 2), {"stride": 3}),          # stride > kernel: rows no window reads
    "lenet": ((8, 6, 14, 14), (16, 6, 5, 5), {}),
    "wide": ((2, 8, 12, 12), (48, 8, 3, 3), {"padding": 1}),
}
MAX_CASES = {
    "max_ceil": ((2, 3, 9, 10), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    "max_dilated": ((2, 2, 11, 9), {"kernel": (2, 3), "stride": (1, 2), "padding": (1, 1), "dilation": (2, 1)}),
    "max_plain": ((4, 6, 12, 12), {"kernel": 2}),
    "max_long_rows": ((1, 2, 3, 1031), {"kernel": 2, "stride": (1, 2), "padding": 1}),   # rows of > 512 windows
}
AVG_CASES = {
    "avg_pad": ((2, 3, 9, 10), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": True}),
    "avg_nopad": ((2, 3, 9, 10), {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                                  "count_include_pad": False}),
    "avg_rect": ((3, 2, 7, 12), {"kernel": (2, 4), "stride": (1, 3), "padding": (1, 2)}),
}


def _out_shape(op: str, x_shape, *rest, **attrs):
    opdef = get_op(op)
    types = [T(x_shape)] + [T(s) for s in rest]
    return opdef.infer(*opdef.split_inputs(types), **opdef.bind_attrs(attrs)).shape


def build_graph():
    b = GraphBuilder("conv_grads")
    outputs = []
    for name, (x_shape, w_shape, attrs) in CONV_CASES.items():
        y_shape = _out_shape("conv2d", x_shape, w_shape, **attrs)
        x, w, gy = b.input(f"{name}_x", T(x_shape)), b.input(f"{name}_w", T(w_shape)), b.input(f"{name}_gy", T(y_shape))
        outputs.append(b.op("conv2d_grad_input", [gy, w], {"input_shape": x_shape, **attrs}, name=f"{name}_dx"))
        outputs.append(b.op("conv2d_grad_weight", [x, gy], {"weight_shape": w_shape, **attrs}, name=f"{name}_dw"))
    for name, (x_shape, attrs) in MAX_CASES.items():
        x, gy = b.input(f"{name}_x", T(x_shape)), b.input(f"{name}_gy", T(_out_shape("max_pool2d", x_shape, **attrs)))
        outputs.append(b.op("max_pool2d_grad", [x, gy], attrs, name=f"{name}_dx"))
    for name, (x_shape, attrs) in AVG_CASES.items():
        gy = b.input(f"{name}_gy", T(_out_shape("avg_pool2d", x_shape, **attrs)))
        outputs.append(b.op("avg_pool2d_grad", [gy], {"input_shape": x_shape, **attrs}, name=f"{name}_dx"))
    b.output(*outputs)
    return b.build()


def with_grad_workspaces(graph, node):
    found = cpp_ops_grad.workspace_bytes(graph, node)
    return found if found is not None else ORIGINAL_WORKSPACE(graph, node)


ORIGINAL_WORKSPACE = cpp_ops_nn.workspace_bytes


@pytest.fixture(scope="module")
def compiled():
    register_rules()
    cpp_ops_grad.register()
    graph = build_graph()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpp_ops_nn, "workspace_bytes", with_grad_workspaces)
        model = compile_graph(graph)
    return graph, model


def random_inputs(graph, seed: int) -> dict[str, np.ndarray]:
    """Normal values; max-pool inputs are small integers, so most windows hold a tie for the maximum."""
    rng = np.random.default_rng(seed)
    found = {}
    for item in graph.inputs:
        if item.name.startswith("max_") and item.name.endswith("_x"):
            found[item.name] = rng.integers(-2, 3, item.type.shape).astype(np.float32)
        else:
            found[item.name] = rng.standard_normal(item.type.shape).astype(np.float32)
    return found


def test_workspace_is_planned_for_the_column_buffer(compiled):
    graph, model = compiled
    by_name = {n.name: n for n in graph.nodes}
    assert cpp_ops_grad.workspace_bytes(graph, by_name["grouped_dx"]) == 4 * (2 * 3 * 3) * (5 * 8)   # Cg*kh*kw rows, oh*ow columns
    assert cpp_ops_grad.workspace_bytes(graph, by_name["pointwise_dw"]) == 0
    assert cpp_ops_grad.workspace_bytes(graph, by_name["max_plain_dx"]) == 0
    assert cpp_ops_grad.workspace_bytes(graph, SimpleNamespace(op="relu")) is None


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), threads=st.sampled_from([1, 2, 3]))
def test_generated_code_matches_the_refs(compiled, seed, threads):
    graph, model = compiled
    inputs = random_inputs(graph, seed)
    expected = run(graph, inputs, {})
    model.set_threads(threads)
    try:
        got = model(**inputs)
    finally:
        model.set_threads(2)
    for name, value in zip(graph.outputs, got):
        ref = expected[name]
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(value, ref, rtol=2e-4, atol=2e-5 * scale, err_msg=f"output {name} on {threads} threads")


def test_one_thread_and_many_threads_agree(compiled):
    graph, model = compiled
    inputs = random_inputs(graph, 7)
    results = {}
    for threads in (1, 2):
        model.set_threads(threads)
        results[threads] = [np.array(v) for v in model(**inputs)]
    model.set_threads(2)
    for name, one, many in zip(graph.outputs, results[1], results[2]):
        np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-5, err_msg=name)
