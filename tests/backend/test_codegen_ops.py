"""Generated C++ == the NumPy interpreter, for every op the C++ backend emits.

The op zoo is one graph holding many independent small cases (odd sizes, broadcasting, strides,
padding, groups, causal masks, ...), compiled once per session; hypothesis then varies the input
values. A second property test generates random elementwise chains with broadcasting, runs them
through the fuse pass and the emitter, and checks them against the interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompile.codegen import register_rules
from nncompile.driver import compile_graph
from nncompile.ir import GraphBuilder, Init, TensorType, run
from nncompile.ops.base import OPS

pytestmark = pytest.mark.backend

T = TensorType


def _zoo_cases():
    """(name, build(b) -> output value name); each case makes its own inputs and params."""
    cases = []

    def case(name):
        def wrap(fn):
            cases.append((name, fn))
            return fn
        return wrap

    for op in ("relu", "gelu", "tanh", "sigmoid", "silu", "exp", "neg", "abs", "erf"):
        @case(f"unary_{op}")
        def _(b, op=op):
            return b.op(op, [b.input(f"{op}_x", T((3, 37)))])

    @case("gelu_tanh")
    def _(b):
        return b.op("gelu", [b.input("gt_x", T((5, 19)))], {"approximate": "tanh"})

    @case("log_sqrt_rsqrt")
    def _(b):
        x = b.op("add_scalar", [b.op("abs", [b.input("pos_x", T((4, 21)))])], {"value": 0.5})
        return b.op("add", [b.op("log", [x]), b.op("mul", [b.op("sqrt", [x]), b.op("rsqrt", [x])])])

    @case("scalar_ops")
    def _(b):
        x = b.input("sc_x", T((2, 3, 11)))
        y = b.op("scale", [x], {"factor": 1.5})
        y = b.op("pow_scalar", [y], {"exponent": 2.0})
        y = b.op("clamp", [y], {"min": -1.0, "max": 3.0})
        return b.op("leaky_relu", [b.op("sub", [y, x])], {"negative_slope": 0.2})

    for op in ("add", "sub", "mul", "div", "maximum", "minimum"):
        @case(f"broadcast_{op}")
        def _(b, op=op):
            a = b.input(f"{op}_a", T((4, 1, 9)))
            c = b.input(f"{op}_b", T((3, 1)))
            if op == "div":
                c = b.op("add_scalar", [b.op("abs", [c])], {"value": 1.0})
            return b.op(op, [a, c])

    @case("linear_bias_relu_residual")
    def _(b):
        x = b.input("lin_x", T((2, 5, 33)))
        w = b.param("lin_w", T((17, 33)), Init("normal", {"std": 0.2}))
        bias = b.param("lin_b", T((17,)), Init("normal"))
        r = b.input("lin_r", T((2, 5, 17)))
        return b.op("add", [b.op("relu", [b.op("linear", [x, w, bias])]), r])

    @case("linear_then_chain")
    def _(b):
        x = b.input("lc_x", T((7, 24)))
        w = b.param("lc_w", T((40, 24)), Init("normal", {"std": 0.2}))
        h = b.op("linear", [x, w])
        return b.op("mul", [b.op("sigmoid", [h]), b.op("tanh", [h])])

    @case("matmul_batched_broadcast")
    def _(b):
        a = b.input("mm_a", T((2, 3, 5, 7)))
        c = b.input("mm_b", T((3, 7, 4)))
        return b.op("matmul", [a, c])

    @case("matmul_shared_rhs")
    def _(b):
        return b.op("matmul", [b.input("ms_a", T((6, 5, 9))), b.input("ms_b", T((9, 13)))])

    @case("conv_stride_pad_bias_relu")
    def _(b):
        x = b.input("cv_x", T((2, 3, 11, 9)))
        w = b.param("cv_w", T((8, 3, 3, 3)), Init("normal", {"std": 0.3}))
        bias = b.param("cv_b", T((8,)), Init("normal"))
        y = b.op("conv2d", [x, w, bias], {"stride": (2, 1), "padding": (1, 2)})
        return b.op("relu", [y])

    @case("conv_groups_dilation")
    def _(b):
        x = b.input("cg_x", T((1, 4, 10, 10)))
        w = b.param("cg_w", T((6, 2, 3, 3)), Init("normal", {"std": 0.3}))
        return b.op("conv2d", [x, w], {"groups": 2, "dilation": (2, 2), "padding": (1, 1)})

    # small images of every size and padding: g++ 12.2 -O3 once miscompiled an inline im2col at 6x6/7x7
    for size in range(3, 11):
        for pad in (0, 1, 2):
            @case(f"conv_{size}x{size}_pad{pad}")
            def _(b, size=size, pad=pad):
                x = b.input(f"cs{size}p{pad}_x", T((1, 3, size, size + 1)))
                w = b.param(f"cs{size}p{pad}_w", T((4, 3, 3, 3)), Init("normal", {"std": 0.3}))
                return b.op("conv2d", [x, w], {"padding": (pad, pad), "stride": (1 + size % 2, 1)})

            @case(f"pool_{size}x{size}_pad{pad}")
            def _(b, size=size, pad=pad):
                x = b.input(f"ps{size}p{pad}_x", T((1, 2, size, size + 1)))
                y = b.op("max_pool2d", [x], {"kernel": (3, 3), "stride": (1 + size % 2, 1), "padding": (1, 1)})
                z = b.op("avg_pool2d", [x], {"kernel": (pad + 1, 3), "stride": (1, 2), "padding": (pad // 2, 1)})
                return b.op("add", [b.op("sum", [y]), b.op("sum", [z])])

    @case("conv_pointwise_residual")
    def _(b):
        x = b.input("cp_x", T((2, 5, 6, 7)))
        w = b.param("cp_w", T((5, 5, 1, 1)), Init("normal", {"std": 0.3}))
        return b.op("add", [b.op("conv2d", [x, w]), x])

    @case("max_pool")
    def _(b):
        return b.op("max_pool2d", [b.input("mp_x", T((2, 3, 9, 8)))], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)})

    @case("max_pool_ceil")
    def _(b):
        return b.op("max_pool2d", [b.input("mpc_x", T((1, 2, 7, 7)))], {"kernel": (2, 2), "ceil_mode": True})

    @case("avg_pool_pad")
    def _(b):
        return b.op("avg_pool2d", [b.input("ap_x", T((2, 3, 8, 9)))], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)})

    @case("avg_pool_no_pad_count")
    def _(b):
        return b.op("avg_pool2d", [b.input("apn_x", T((1, 2, 7, 6)))],
                    {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False})

    @case("global_avg_pool")
    def _(b):
        return b.op("global_avg_pool2d", [b.input("gap_x", T((2, 5, 6, 7)))])

    @case("batch_norm_eval")
    def _(b):
        x = b.input("bn_x", T((3, 4, 5, 2)))
        mean = b.param("bn_mean", T((4,)), Init("normal"), trainable=False)
        var = b.param("bn_var", T((4,)), Init("uniform", {"low": 0.5, "high": 2.0}), trainable=False)
        w = b.param("bn_w", T((4,)), Init("normal"))
        bias = b.param("bn_b", T((4,)), Init("normal"))
        return b.op("batch_norm", [x, mean, var, w, bias])

    @case("batch_norm_train")
    def _(b):
        x = b.input("bnt_x", T((6, 3, 4)))
        mean = b.param("bnt_mean", T((3,)), Init("zeros"), trainable=False)
        var = b.param("bnt_var", T((3,)), Init("ones"), trainable=False)
        return b.op("batch_norm", [x, mean, var], {"training": True})

    @case("layer_norm")
    def _(b):
        x = b.input("ln_x", T((3, 4, 10)))
        w = b.param("ln_w", T((4, 10)), Init("normal"))
        bias = b.param("ln_b", T((4, 10)), Init("normal"))
        return b.op("layer_norm", [x, w, bias], {"normalized_ndim": 2})

    for op, axis in (("softmax", -1), ("softmax", 1), ("log_softmax", -1), ("log_softmax", 0)):
        @case(f"{op}_{axis}")
        def _(b, op=op, axis=axis):
            return b.op(op, [b.input(f"{op}{axis + 2}_x", T((3, 5, 7)))], {"axis": axis})

    for op, axes, keep in (("sum", None, False), ("mean", (1,), True), ("max", (0, 2), False), ("sum", (2,), False),
                           ("sum", (-1,), True), ("mean", (-3, -1), False)):
        @case(f"{op}_{axes}_{keep}")
        def _(b, op=op, axes=axes, keep=keep):
            name = f"red_{op}_{'all' if axes is None else '_'.join(str(a).replace('-', 'm') for a in axes)}"
            return b.op(op, [b.input(name, T((3, 4, 5)))], {"axes": axes, "keepdim": keep})

    @case("cross_entropy")
    def _(b):
        return b.op("cross_entropy", [b.input("ce_logits", T((6, 11))), b.input("ce_labels", T((6,), "i64"))])

    @case("mse_loss")
    def _(b):
        return b.op("mse_loss", [b.input("mse_a", T((4, 9))), b.input("mse_b", T((4, 9)))])

    @case("embedding")
    def _(b):
        w = b.param("emb_w", T((13, 6)), Init("normal"))
        return b.op("embedding", [b.input("emb_ids", T((2, 5), "i64")), w])

    for causal in (False, True):
        @case(f"sdpa_causal_{causal}")
        def _(b, causal=causal):
            tag = "c" if causal else "n"
            q = b.input(f"q_{tag}", T((2, 2, 7, 8)))
            k = b.input(f"k_{tag}", T((2, 2, 9, 8)))
            v = b.input(f"v_{tag}", T((2, 2, 9, 5)))
            return b.op("sdpa", [q, k, v], {"causal": causal})

    @case("shape_ops")
    def _(b):
        x = b.input("sh_x", T((2, 3, 4, 5)))
        t = b.op("transpose", [x], {"dim0": 1, "dim1": 3})
        p = b.op("permute", [x], {"dims": (0, 2, 1, 3)})
        s = b.op("slice", [p], {"axis": 1, "start": 1, "end": 4, "step": 2})
        r = b.op("reshape", [s], {"shape": (2, -1)})
        f = b.op("flatten", [t])
        c = b.op("concat", [r, f], {"axis": 1})
        e = b.op("expand", [b.op("unsqueeze", [b.op("sum", [c], {"axes": (1,)})], {"axis": 1})], {"shape": (2, 7)})
        return b.op("concat", [c, e], {"axis": 1})

    @case("dropout")
    def _(b):
        return b.op("dropout", [b.input("do_x", T((4, 300)))], {"p": 0.3, "seed": 7})

    @case("where_cast")
    def _(b):
        x = b.input("wc_x", T((3, 8)))
        cond = b.op("cast", [b.op("relu", [x])], {"dtype": "bool"})
        return b.op("where", [cond, x, b.op("neg", [x])])

    return cases


def random_inputs(graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {}
    for item in graph.inputs:
        t = item.type
        if t.dtype == "i64":
            high = 11 if "ce_" in item.name else 13
            found[item.name] = rng.integers(0, high, t.shape)
        else:
            found[item.name] = rng.standard_normal(t.shape).astype(np.float32)
    return found


@pytest.fixture(scope="module")
def zoo():
    register_rules()
    b = GraphBuilder("zoo")
    outputs = [build(b) for _, build in _zoo_cases()]
    b.output(*outputs)
    graph = b.build()
    return graph, compile_graph(graph)


def test_every_op_has_a_cpp_rule():
    register_rules()
    missing = [name for name, opdef in OPS.items() if opdef.emit_cpp is None]
    assert not missing, f"ops without emit_cpp: {missing}"


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_zoo_matches_interpreter(zoo, seed):
    graph, model = zoo
    inputs = random_inputs(graph, seed)
    expected = run(graph, inputs, model.parameters())
    got = model(**inputs)
    for name, value in zip(graph.outputs, got):
        ref = expected[name]
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(value, ref, rtol=2e-4, atol=2e-5 * scale, err_msg=f"output {name}")


_UNARY = ["relu", "tanh", "sigmoid", "silu", "gelu", "neg", "abs"]
_BINARY = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def chains(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank)))
    steps = draw(st.lists(st.tuples(st.sampled_from(_UNARY + _BINARY), st.integers(0, 2**16)), min_size=1, max_size=6))
    return shape, steps


@settings(max_examples=6, deadline=None)
@given(chains())
def test_random_broadcast_chains(spec):
    register_rules()
    shape, steps = spec
    b = GraphBuilder("chain")
    value = b.input("x", T(shape))
    for i, (op, pick) in enumerate(steps):
        if op in _UNARY:
            value = b.op(op, [value])
        else:
            # a broadcast operand: some dims of the shape set to 1, maybe fewer leading dims
            other_shape = tuple(d if (pick >> k) & 1 else 1 for k, d in enumerate(shape))[(pick >> 8) % len(shape):]
            other = b.input(f"y{i}", T(other_shape))
            value = b.op(op, [other, value] if pick & 1 else [value, other])
    b.output(value)
    graph = b.build()
    model = compile_graph(graph)
    inputs = random_inputs(graph, 0)
    np.testing.assert_allclose(model(**inputs), run(graph, inputs)[value], rtol=1e-5, atol=1e-5)
