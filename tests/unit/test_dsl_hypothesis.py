"""Generated .nn programs: random layer/op chains parse, verify and compute what NumPy computes;
random and mutated sources never raise anything but an NNError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompile.errors import NNError
from nncompile.frontend import parse_text
from nncompile.ir import graphs_equal, materialize, parse_graph, print_graph, run, verify

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HEADER = """
block Dense(x: tensor, n: int) {
    a = Linear(x, n)
    return relu(a)
}
"""

# step kinds; each gives (source line, numpy function of (h, weights))
STEPS = ("linear", "relu", "tanh", "sigmoid", "scale", "add_const", "residual", "layernorm", "pipe", "block",
         "rsub")


def _layer_norm(h, w, b):
    mean = h.mean(-1, keepdims=True)
    var = h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-5) * w + b


def step_source(kind: str, index: int, width: int, const: float):
    """(line of .nn, reference function, new width)."""
    name = f"l{index}"
    if kind == "linear":
        return (f"h = Linear(h, {width}, name=\"{name}\")",
                lambda h, w: h @ w[f"{name}.weight"].T + w[f"{name}.bias"], width)
    if kind == "block":
        return (f"h = Dense(h, {width}, name=\"{name}\")",
                lambda h, w: np.maximum(h @ w[f"{name}.a.weight"].T + w[f"{name}.a.bias"], 0), width)
    if kind == "layernorm":
        return (f"h = LayerNorm(h, name=\"{name}\")",
                lambda h, w: _layer_norm(h, w[f"{name}.weight"], w[f"{name}.bias"]), None)
    simple = {
        "relu": ("h = relu(h)", lambda h, w: np.maximum(h, 0)),
        "tanh": ("h = tanh(h)", lambda h, w: np.tanh(h)),
        "sigmoid": ("h = h |> sigmoid", lambda h, w: 1 / (1 + np.exp(-h))),
        "scale": (f"h = h * {const!r}", lambda h, w: h * const),
        "add_const": (f"h = {const!r} + h", lambda h, w: h + const),
        "residual": ("h = h + relu(h)", lambda h, w: h + np.maximum(h, 0)),
        "pipe": ("h = h |> relu |> tanh", lambda h, w: np.tanh(np.maximum(h, 0))),
        "rsub": (f"h = {const!r} - h", lambda h, w: const - h),
    }
    line, fn = simple[kind]
    return line, fn, None


programs = st.lists(
    st.tuples(st.sampled_from(STEPS), st.integers(1, 6), st.floats(-2.0, 2.0, allow_nan=False).map(lambda v: round(v, 3))),
    min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs, batch=st.integers(1, 3), width=st.integers(1, 5), seed=st.integers(0, 1000))
def test_random_chains_parse_and_match_numpy(program, batch, width, seed):
    lines = [HEADER, "dim B = 2", "model chain {", f"    input x: f32[B, {width}]", "    h = x"]
    refs = []
    for index, (kind, new_width, const) in enumerate(program):
        line, fn, _ = step_source(kind, index, new_width, const)
        lines.append("    " + line)
        refs.append(fn)
    lines += ["    output h", "}"]
    graph = parse_text("\n".join(lines), filename="chain.nn", set={"B": batch})
    verify(graph)
    weights = {k: v.astype(np.float64) for k, v in materialize(graph, seed=seed).items()}
    x = np.random.default_rng(seed).normal(size=(batch, width))
    h = x
    for fn in refs:
        h = fn(h, weights)
    got = run(graph, {"x": x}, weights, dtype=np.float64)[graph.outputs[0]]
    np.testing.assert_allclose(got, h, rtol=1e-9, atol=1e-9)
    back = parse_graph(print_graph(graph), dict(graph.weights))
    assert graphs_equal(graph, back)


# random CNNs against torch ----------------------------------------------------------------------------

conv_steps = st.lists(st.one_of(
    st.tuples(st.just("conv"), st.integers(1, 4), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1)),
    st.tuples(st.just("relu")), st.tuples(st.just("bn")), st.tuples(st.just("pool")), st.tuples(st.just("gelu")),
), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=conv_steps, channels=st.integers(1, 3), size=st.integers(6, 10), seed=st.integers(0, 100))
def test_random_cnns_match_torch(steps, channels, size, seed):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(seed)
    lines = [f"model cnn {{", f"    input x: f32[2, {channels}, {size}, {size}]", "    h = x"]
    modules, state = [], {}
    c, hw = channels, size
    for index, step in enumerate(steps):
        name = f"s{index}"
        if step[0] == "conv":
            _, out, k, stride, pad = step
            if hw + 2 * pad < k:
                continue
            lines.append(f"    h = Conv2d(h, {out}, kernel={k}, stride={stride}, padding={pad}, name=\"{name}\")")
            module = nn.Conv2d(c, out, k, stride=stride, padding=pad)
            c, hw = out, (hw + 2 * pad - k) // stride + 1
        elif step[0] == "bn":
            lines.append(f"    h = BatchNorm(h, name=\"{name}\")")
            module = nn.BatchNorm2d(c).eval()
            with torch.no_grad():
                module.weight.normal_(), module.bias.normal_(), module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        elif step[0] == "pool":
            if hw < 2:
                continue
            lines.append("    h = max_pool2d(h, kernel=2)")
            module, hw = nn.MaxPool2d(2), hw // 2
        else:
            lines.append(f"    h = {step[0]}(h)")
            module = nn.ReLU() if step[0] == "relu" else nn.GELU()
        modules.append(module)
        state.update({f"{name}.{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()
                      if not k.endswith("num_batches_tracked")})
    lines += ["    y = flatten(h) |> Linear(3, name=\"head\")", "    output y", "}"]
    head = nn.Linear(c * hw * hw, 3)
    state.update({f"head.{k}": v.detach().numpy().copy() for k, v in head.state_dict().items()})
    graph = parse_text("\n".join(lines), filename="cnn.nn")
    assert set(graph.param_names) == set(state)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        want = head(torch.flatten(nn.Sequential(*modules)(x), 1)).numpy()
    got = run(graph, {"x": x.numpy()}, state)[graph.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


# robustness ------------------------------------------------------------------------------------------

_TOKENS = ["model", "block", "dim", "input", "param", "buffer", "output", "return", "train", "repeat", "as",
           "loss", "optimizer", "sparse", "weights", "{", "}", "(", ")", "[", "]", ",", ":", ";", "=", "+", "-",
           "*", "/", "**", "|>", ".", "x", "h", "B", "relu", "Linear", "f32", "i64", "0", "1", "2.5", "-3",
           '"s"', "#", "\n", " ", "shape", "none", "true", "2:4", "Conv2d", "sum", "reshape", "layers"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_token_soup_only_raises_nnerror(tokens):
    _parse_or_nnerror(" ".join(tokens))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_only_raises_nnerror(text):
    _parse_or_nnerror(text)


_SOURCES = {name: (EXAMPLES / f"{name}.nn").read_text() for name in ("mlp", "lenet", "sparse_mlp", "gpt")}
_SMALL = {"gpt": {"B": 1, "T": 8, "layers": 1, "d": 32}}


@st.composite
def mutated_sources(draw):
    name = draw(st.sampled_from(sorted(_SOURCES)))
    text = _SOURCES[name]
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if action == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 12)):]
        elif action == "insert":
            text = text[:position] + draw(st.sampled_from(_TOKENS)) + text[position:]
        elif action == "replace":
            text = text[:position] + draw(st.sampled_from(_TOKENS)) + text[position + 1:]
        else:
            start = text.rfind("\n", 0, position) + 1
            end = text.find("\n", position)
            end = len(text) if end < 0 else end
            text = text[:end] + "\n" + text[start:end] + text[end:]
    return name, text


@settings(max_examples=150, deadline=None)
@given(mutated_sources())
def test_mutated_examples_only_raise_nnerror(case):
    name, text = case
    settings_for = dict(_SMALL.get(name, {}))
    try:
        parse_text(text, filename=f"{name}.nn", set=settings_for, base_dir=EXAMPLES)
    except NNError as err:
        assert err.format()  # formats without raising
        if err.loc is not None:
            assert err.loc.line >= 1


def _parse_or_nnerror(text: str) -> None:
    try:
        parse_text(text, filename="fuzz.nn")
    except NNError as err:
        assert err.format()


# random well-formed syntax with arbitrary meaning: the evaluator must fail only with NNError ------------

_NAMES = ["x", "h", "a", "b", "B", "n", "w"]
_CALLEES = ["relu", "add", "linear", "reshape", "transpose", "softmax", "sum", "concat", "slice", "Linear",
            "LayerNorm", "Conv2d", "Embedding", "MultiHeadAttention", "Dropout", "BatchNorm", "Blk", "Pair",
            "sparse", "normal", "sdpa", "cross_entropy", "max_pool2d", "cast", "nothing"]
_KEYWORDS = ["name", "axis", "shape", "heads", "p", "kernel", "bias", "sparse", "density", "dtype", "k", "causal"]

_atoms = st.one_of(st.sampled_from(_NAMES), st.integers(0, 40).map(str), st.sampled_from(["0.5", "true", "none", "(-1)",
                   '"s"', "2:4", "f32", "x.shape", "x.shape[-1]", "h.rank", "x.foo", "[]"]))


def _compose(children):
    call_args = st.lists(st.one_of(children, st.tuples(st.sampled_from(_KEYWORDS), children).map(
        lambda kv: f"{kv[0]}={kv[1]}")), max_size=4).map(", ".join)
    return st.one_of(
        st.tuples(st.sampled_from(_CALLEES), call_args).map(lambda c: f"{c[0]}({c[1]})"),
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**", "|>"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})" if t[1] != "|>" else f"{t[0]} |> relu"),
        st.lists(children, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        children.map(lambda e: f"-{e}"),
        children.map(lambda e: f"({e})[0]"),
    )


_exprs = st.recursive(_atoms, _compose, max_leaves=8)
_statements = st.one_of(
    st.tuples(st.sampled_from(_NAMES), _exprs).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(st.sampled_from(_NAMES), _exprs, st.sampled_from(["Blk", "Linear", "relu", "Pair"]), _exprs).map(
        lambda t: f"{t[0]} = repeat ({t[1]}) {t[2]}(h, {t[3]})"),
    st.tuples(_exprs, _exprs).map(lambda t: f"a, b = Pair({t[0]}, {t[1]})"),
    st.tuples(_exprs, st.sampled_from(["Pair", "add", "Blk"])).map(lambda t: f"a, b = repeat ({t[0]}) {t[1]}(h, x)"),
    st.tuples(st.sampled_from(_NAMES), _exprs).map(lambda t: f"param {t[0]}: f32[{t[1]}] = normal()"),
    st.tuples(st.sampled_from(_NAMES), _exprs).map(lambda t: f"param {t[0]}: f32[4, 4] sparse(density={t[1]})"),
    st.tuples(st.sampled_from(_NAMES), _exprs).map(lambda t: f"dim {t[0]} = {t[1]}"),
    st.sampled_from(_NAMES).map(lambda n: f"output {n}"),
)
_block_src = """
block Blk(x: tensor, n: int = 4) { y = Linear(x, n); return relu(y) }
block Pair(a, b) { return b, a }
"""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_statements, max_size=8))
def test_random_statements_only_raise_nnerror(statements):
    source = _block_src + "dim B = 2\nmodel r {\n  input x: f32[B, 4]\n  h = x\n  " + "\n  ".join(statements) + "\n}\n"
    _parse_or_nnerror(source)
