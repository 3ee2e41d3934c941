"""The op table is complete and its contracts hold for every op.

Walks ``OPS``: every op has ``infer``, ``ref``, ``cost`` and a docstring; every catalog name exists in
its family; a rule an op lacks raises ``MissingRuleError`` naming the op and the rule; canonical
attributes are a fixed point of ``bind_attrs`` (the verifier relies on it); wrong arity, unknown,
missing and badly typed attributes give ``ShapeError`` messages that say what is wrong.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nncompile.errors import MissingRuleError, ShapeError, SourceLoc
from nncompile.ir import GraphBuilder, TensorType
from nncompile.ops import OPS, REQUIRED, Cost, OpDef, defop, get_op
from nncompile.ops.base import RULES

# The catalog of nncompile/ops/README.md, family by family.
CATALOG = {
    "elementwise": ["relu", "gelu", "tanh", "sigmoid", "silu", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf",
                    "leaky_relu", "clamp", "scale", "add_scalar", "pow_scalar", "add", "sub", "mul", "div", "maximum",
                    "minimum", "where", "cast", "identity"],
    "matmul": ["matmul", "linear"],
    "conv": ["conv2d"],
    "pool": ["max_pool2d", "avg_pool2d", "global_avg_pool2d"],
    "norm": ["batch_norm", "layer_norm", "softmax", "log_softmax"],
    "shape": ["reshape", "flatten", "transpose", "permute", "concat", "slice", "expand", "squeeze", "unsqueeze"],
    "embedding": ["embedding"],
    "random": ["dropout"],
    "reduce": ["sum", "mean", "max"],
    "loss": ["cross_entropy", "mse_loss"],
    "attention": ["sdpa"],
}
CATALOG_NAMES = [name for names in CATALOG.values() for name in names]

# Values for attributes that have no default, so every op can be bound.
REQUIRED_EXAMPLES = {
    ("scale", "factor"): 0.5, ("add_scalar", "value"): 1.0, ("pow_scalar", "exponent"): 2.0,
    ("cast", "dtype"): "f64", ("max_pool2d", "kernel"): 2, ("avg_pool2d", "kernel"): (3, 2),
    ("reshape", "shape"): (-1,), ("transpose", "dim0"): 0, ("transpose", "dim1"): 1, ("permute", "dims"): (1, 0),
    ("slice", "axis"): 0, ("expand", "shape"): (2, 3), ("squeeze", "axes"): 0, ("unsqueeze", "axis"): 0,
    ("fused", "body"): (("relu", ("x0",), ()),),
    ("full", "shape"): (2, 3), ("full", "value"): 0, ("embedding_grad", "vocab"): 10,
    ("slice_scatter", "shape"): (4, 6), ("slice_scatter", "axis"): 1,
    ("conv2d_grad_input", "input_shape"): (1, 3, 8, 8), ("conv2d_grad_weight", "weight_shape"): (4, 3, 3, 3),
    ("max_pool2d_grad", "kernel"): 2, ("avg_pool2d_grad", "input_shape"): (1, 2, 6, 6), ("avg_pool2d_grad", "kernel"): 2,
}


def example_attrs(opdef: OpDef) -> dict:
    missing = [k for k, v in opdef.attrs.items() if v is REQUIRED and (opdef.name, k) not in REQUIRED_EXAMPLES]
    if missing:
        pytest.skip(f"add an example value for {opdef.name}.{missing[0]} to REQUIRED_EXAMPLES")
    return {k: REQUIRED_EXAMPLES[(opdef.name, k)] for k, v in opdef.attrs.items() if v is REQUIRED}


def test_every_catalog_op_exists_in_its_family():
    for family, names in CATALOG.items():
        for name in names:
            assert name in OPS, f"catalog op '{name}' is not defined"
            assert OPS[name].family == family, f"{name} is in family '{OPS[name].family}', catalog says '{family}'"
            assert get_op(name) is OPS[name]


def test_readme_lists_every_op():
    readme = (Path(__file__).resolve().parents[2] / "nncompile" / "ops" / "README.md").read_text()
    catalog = readme.split("# Catalog", 1)[1]
    for name in CATALOG_NAMES:
        assert re.search(rf"\b{name}\(", catalog), f"README catalog does not list {name}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_the_required_rules_and_a_docstring(name):
    opdef = OPS[name]
    for rule in ("infer", "ref", "cost"):
        assert callable(getattr(opdef, rule)), f"op '{name}' lacks its '{rule}' rule"
    assert opdef.doc and len(opdef.doc) > 8, f"op '{name}' has no docstring"
    assert opdef.family, f"op '{name}' has no family"
    assert opdef.inputs or opdef.attrs, f"op '{name}' declares neither inputs nor attributes"
    assert opdef.signature().startswith(f"{name}(")


@pytest.mark.parametrize("name", sorted(OPS))
def test_missing_rules_raise_naming_op_and_rule(name):
    opdef = OPS[name]
    for rule in RULES:
        if getattr(opdef, rule) is None:
            with pytest.raises(MissingRuleError, match=rf"op '{name}' has no '{rule}' rule"):
                opdef.rule(rule)
        else:
            assert opdef.rule(rule) is getattr(opdef, rule)


def test_missing_vjp_on_a_fresh_opdef():
    bare = OpDef(name="bare", inputs=("x",), infer=lambda x: x, ref=lambda x: x)
    for rule in ("vjp", "cost", "emit_cpp", "emit_cuda"):
        with pytest.raises(MissingRuleError) as info:
            bare.rule(rule)
        assert info.value.message == f"op 'bare' has no '{rule}' rule"


@pytest.mark.parametrize("name", sorted(OPS))
def test_canonical_attrs_are_a_fixed_point(name):
    opdef = OPS[name]
    bound = opdef.bind_attrs(example_attrs(opdef))
    assert set(bound) == set(opdef.attrs)
    assert opdef.bind_attrs(dict(bound)) == bound
    for key, value in bound.items():
        assert not isinstance(value, list), f"{name}.{key} is not canonical: {value!r}"


def test_spellings_become_one_canonical_value():
    assert get_op("conv2d").bind_attrs({"stride": 2, "padding": [1, 2]})["padding"] == (1, 2)
    assert get_op("conv2d").bind_attrs({"stride": 2})["stride"] == (2, 2)
    assert get_op("max_pool2d").bind_attrs({"kernel": 3})["stride"] == (3, 3)
    scale = get_op("scale").bind_attrs({"factor": 2})["factor"]
    assert scale == 2.0 and isinstance(scale, float)
    assert isinstance(get_op("batch_norm").bind_attrs({"eps": 1})["eps"], float)
    assert get_op("squeeze").bind_attrs({"axes": 1})["axes"] == (1,)
    assert get_op("mean").bind_attrs({"axes": (2, 1)})["axes"] == (1, 2)
    assert get_op("slice").bind_attrs({"axis": 0, "start": None})["start"] == 0


def test_reduction_axes_are_canonical_given_the_input_type():
    x = [TensorType((2, 3, 4))]
    assert get_op("sum").bind_attrs({"axes": -1}, x)["axes"] == (2,)
    assert get_op("max").bind_attrs({"axes": (2, -3)}, x)["axes"] == (0, 2)
    assert get_op("mean").bind_attrs({"axes": None}, x)["axes"] is None
    assert get_op("sum").bind_attrs({"axes": -1})["axes"] == (-1,)      # without types: as written
    with pytest.raises(ShapeError, match="sum: axis 3 is out of range for a rank-3 tensor"):
        get_op("sum").bind_attrs({"axes": 3}, x)
    with pytest.raises(ShapeError, match=r"mean: repeated axis in \[1, -2\]"):
        get_op("mean").bind_attrs({"axes": (1, -2)}, x)


BAD_ATTRS = [
    ("conv2d", {"stride": (1, 2, 3)}, r"conv2d: stride must be an int or a pair of ints, got \(1, 2, 3\)"),
    ("conv2d", {"groups": 0}, r"conv2d: groups must be >= 1, got 0"),
    ("conv2d", {"dilation": True}, r"conv2d: dilation must be an int or a pair of ints, got True"),
    ("max_pool2d", {"kernel": 2, "ceil_mode": 1}, r"max_pool2d: ceil_mode must be true or false, got 1"),
    ("avg_pool2d", {"kernel": (2, 0)}, r"avg_pool2d: kernel must be >= 1, got \(2, 0\)"),
    ("gelu", {"approximate": "fast"}, r"gelu: approximate must be 'none' or 'tanh', got 'fast'"),
    ("scale", {"factor": "2"}, r"scale: factor must be a number, got '2'"),
    ("leaky_relu", {"negative_slope": None}, r"leaky_relu: negative_slope must be a number, got None"),
    ("cast", {"dtype": "f8"}, r"cast: unknown dtype 'f8'"),
    ("softmax", {"axis": 1.0}, r"softmax: axis must be an int, got 1.0"),
    ("layer_norm", {"eps": "small"}, r"layer_norm: eps must be a number, got 'small'"),
    ("batch_norm", {"training": "yes"}, r"batch_norm: training must be true or false, got 'yes'"),
    ("dropout", {"p": -0.1}, r"dropout: p must be in \[0, 1\), got -0.1"),
    ("dropout", {"seed": 2**32}, r"dropout: seed must be an int in \[0, 2\^32\)"),
    ("sum", {"axes": "all"}, r"sum: axes must be an int, a tuple of ints or none, got 'all'"),
    ("max", {"keepdim": None}, r"max: keepdim must be true or false, got None"),
    ("mse_loss", {"reduction": "none"}, r"mse_loss: reduction must be 'mean' or 'sum', got 'none'"),
    ("sdpa", {"causal": "true"}, r"sdpa: causal must be true or false, got 'true'"),
    ("reshape", {"shape": (2, 2.5)}, r"reshape: shape must be a tuple of ints, got \(2, 2.5\)"),
    ("slice", {"axis": 0, "end": 1.5}, r"slice: end must be an int, got 1.5"),
    ("relu", {"inplace": True}, r"relu: unknown attribute 'inplace' \(known: none\)"),
    ("conv2d", {"kernel": 3}, r"conv2d: unknown attribute 'kernel' \(known: stride, padding, dilation, groups\)"),
    ("transpose", {"dim0": 0}, r"transpose: missing required attribute 'dim1'"),
]


@pytest.mark.parametrize("op, attrs, message", BAD_ATTRS, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in BAD_ATTRS])
def test_bad_attributes_are_shape_errors(op, attrs, message):
    with pytest.raises(ShapeError, match=message):
        get_op(op).bind_attrs(attrs)


@pytest.mark.parametrize("op, count, message", [
    ("relu", 2, r"relu takes 1 input \(x\), got 2"),
    ("add", 1, r"add takes 2 inputs \(a, b\), got 1"),
    ("linear", 1, r"linear takes 2 to 3 inputs \(x, weight, bias\?\), got 1"),
    ("batch_norm", 6, r"batch_norm takes 3 to 5 inputs"),
    ("concat", 0, r"concat takes at least 1 input \(\*xs\), got 0"),
])
def test_wrong_arity_is_a_shape_error(op, count, message):
    with pytest.raises(ShapeError, match=message):
        get_op(op).check_arity(count)


def test_builder_reports_op_errors_at_the_call_site():
    g = GraphBuilder()
    x = g.input("x", TensorType((4, 8)))
    w = g.input("w", TensorType((3, 5)))
    loc = SourceLoc("model.nn", 7, 9, "    h = linear(x, w)")
    with pytest.raises(ShapeError) as info:
        g.op("linear", [x, w], loc=loc)
    assert info.value.loc == loc
    text = info.value.format()
    assert text.startswith("model.nn:7:9: error: linear: input features 8 do not match weight f32[3,5]")
    assert text.endswith("        ^")
    with pytest.raises(ShapeError, match=r"relu takes 1 input \(x\), got 2"):
        g.op("relu", [x, x])
    with pytest.raises(ShapeError, match=r"unknown op 'conv3d'"):
        g.op("conv3d", [x])
    with pytest.raises(ShapeError, match=r"unknown attribute 'alpha'"):
        g.op("relu", [x], {"alpha": 1.0})


def test_defining_an_op_twice_is_refused():
    with pytest.raises(ValueError, match="op 'relu' defined twice"):
        defop("relu", inputs=("x",), infer=lambda x: x, ref=lambda x: x)


@pytest.mark.parametrize("name", sorted(CATALOG_NAMES))
def test_cost_is_realistic_on_a_typical_case(name):
    """Costs are non-negative ints; real compute ops count FLOPs, every op writes its output."""
    cases = {   # op -> (input types, attrs)
        "where": ([TensorType((4, 5), "bool"), TensorType((4, 5)), TensorType((4, 5))], {}),
        "cast": ([TensorType((4, 5))], {"dtype": "f64"}),
        "matmul": ([TensorType((2, 4, 6)), TensorType((6, 3))], {}),
        "linear": ([TensorType((4, 6)), TensorType((3, 6)), TensorType((3,))], {}),
        "conv2d": ([TensorType((1, 2, 6, 6)), TensorType((4, 2, 3, 3)), None], {}),
        "max_pool2d": ([TensorType((1, 2, 6, 6))], {"kernel": 2}),
        "global_avg_pool2d": ([TensorType((1, 2, 6, 6))], {}),
        "avg_pool2d": ([TensorType((1, 2, 6, 6))], {"kernel": 2}),
        "batch_norm": ([TensorType((2, 3, 4)), TensorType((3,)), TensorType((3,)), None, None], {}),
        "layer_norm": ([TensorType((2, 3, 4)), TensorType((4,)), TensorType((4,))], {}),
        "reshape": ([TensorType((4, 5))], {"shape": (20,)}),
        "transpose": ([TensorType((4, 5))], {"dim0": 0, "dim1": 1}),
        "permute": ([TensorType((4, 5))], {"dims": (1, 0)}),
        "concat": ([[TensorType((4, 5)), TensorType((2, 5))]], {}),
        "slice": ([TensorType((4, 5))], {"axis": 1, "start": 1}),
        "expand": ([TensorType((1, 5))], {"shape": (4, 5)}),
        "squeeze": ([TensorType((1, 5))], {"axes": 0}),
        "unsqueeze": ([TensorType((4, 5))], {"axis": 0}),
        "embedding": ([TensorType((4,), "i64"), TensorType((10, 5))], {}),
        "cross_entropy": ([TensorType((4, 5)), TensorType((4,), "i64")], {}),
        "sdpa": ([TensorType((2, 4, 8)), TensorType((2, 6, 8)), TensorType((2, 6, 5))], {}),
    }
    opdef = get_op(name)
    in_types, attrs = cases.get(name, ([TensorType((4, 5))] * opdef.min_inputs, {}))
    bound = opdef.bind_attrs({**example_attrs(opdef), **attrs})
    if not opdef.variadic:
        in_types = opdef.split_inputs(in_types)
    out = opdef.infer(*in_types, **bound)
    cost = opdef.cost(out, *in_types, **bound)
    assert isinstance(cost, Cost)
    assert all(isinstance(v, int) and v >= 0 for v in (cost.flops, cost.bytes_read, cost.bytes_written))
    if opdef.family in ("matmul", "conv", "pool", "norm", "reduce", "loss", "attention") or name in (
            "relu", "gelu", "exp", "add", "mul", "dropout"):
        assert cost.flops >= out.numel, f"{name}: {cost.flops} FLOPs for {out.numel} outputs"
    if opdef.family not in ("shape",):
        assert cost.bytes_written == out.nbytes
    if name == "sdpa":
        assert cost.flops >= 2 * (2 * 4 * 6 * 8 + 2 * 4 * 6 * 5)
    if name == "conv2d":
        assert cost.flops == 2 * out.numel * 2 * 3 * 3
