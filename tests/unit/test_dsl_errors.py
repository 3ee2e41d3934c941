"""Bad .nn inputs: each gives a located error with the exact line:col and message, never a traceback."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from nncompile.errors import InputError, NameError_, NNError, ParseError, ShapeError
from nncompile.frontend import parse, parse_text

M = "model m {\n"
X = "  input x: f32[4, 3]\n"

# (id, source, set, error class, line, col, message)
CASES = [
    ("syntax-missing-paren", M + X + "  h = relu(x\n  output h\n}\n", None, ParseError, 4, 3,
     "unexpected 'output', expected '(', ')', ',', '=' or an operator"),
    ("syntax-bad-char", M + X + "  h = $x\n}\n", None, ParseError, 3, 7,
     "unexpected character '$', expected an expression"),
    ("syntax-unterminated-string", M + '  weights "w.npz\n}\n', None, ParseError, 2, 11, "unterminated string"),
    ("syntax-eof", M + X, None, ParseError, 2, 21,
     "unexpected end of file, expected ';', 'buffer', 'dim', 'input', 'output', 'param', 'return', "
     "'train', 'weights', '}' or a name"),
    ("syntax-missing-colon", M + "  input x f32[4]\n}\n", None, ParseError, 2, 11, "unexpected name 'f32', expected ':'"),
    ("unknown-op", M + X + "  h = relux(x)\n  output h\n}\n", None, NameError_, 3, 7,
     "unknown op, layer or block 'relux' (did you mean 'relu'?)"),
    ("unknown-layer", M + X + "  h = Linaer(x, 3)\n  output h\n}\n", None, NameError_, 3, 7,
     "unknown op, layer or block 'Linaer' (did you mean 'Linear'?)"),
    ("unknown-name", M + X + "  h = relu(hidden)\n  output h\n}\n", None, NameError_, 3, 12, "unknown name 'hidden'"),
    ("unknown-dim", M + "  input x: f32[Q, 3]\n  output x\n}\n", None, NameError_, 2, 16, "unknown name 'Q'"),
    ("unbound-dim", "dim T\n" + M + "  input x: f32[T]\n  output x\n}\n", None, NameError_, 1, 5,
     "dimension 'T' has no value; bind it with --set T=N (or parse(..., set=...))"),
    ("unknown-set", M + X + "  output x\n}\n", {"B": 3}, NameError_, None, None,
     "--set B: no dimension named 'B' in <string>"),
    ("wrong-arity", M + X + "  h = relu(x, x)\n  output h\n}\n", None, ShapeError, 3, 7,
     "relu takes 1 input (x), got 2"),
    ("layer-unknown-keyword", M + X + "  h = Linear(x, 3, bais=false)\n  output h\n}\n", None, NameError_, 3, 7,
     "Linear: unknown keyword 'bais' (known: x, out, bias, sparse)"),
    ("op-unknown-keyword", M + X + "  h = softmax(x, axes=1)\n  output h\n}\n", None, NameError_, 3, 7,
     "softmax: unknown keyword 'axes' (attributes: axis)"),
    ("layer-missing-argument", M + X + "  h = Conv2d(x, 3)\n  output h\n}\n", None, ShapeError, 3, 7,
     "Conv2d: missing argument 'kernel'"),
    ("dtype-mismatch", M + X + "  e = Embedding(x, 10, 4)\n  output e\n}\n", None, ShapeError, 3, 7,
     "Embedding: ids must be an integer tensor, got f32[4,3]"),
    ("non-integer-dim", "dim d = 10\ndim heads = 3\ndim hd = d / heads\n" + M + X + "  output x\n}\n", None,
     ShapeError, 3, 12, "integer division 10 / 3 is not exact (dimensions must divide evenly)"),
    ("float-dim", M + "  input x: f32[4, 2.5]\n  output x\n}\n", None, ShapeError, 2, 19,
     "a dimension must be an integer, got number 2.5"),
    ("duplicate-input", M + X + "  input x: f32[2]\n  output x\n}\n", None, NameError_, 3, 9,
     "'x' is already defined (at <string>:2:9)"),
    ("duplicate-block", "block A(x) { return x }\nblock A(y) { return y }\n" + M + X + "  output x\n}\n", None,
     NameError_, 2, 7, "block 'A' is defined twice (first at <string>:1:7)"),
    ("rebind-dim", "dim B = 2\n" + M + "  B = 3\n  input x: f32[B]\n  output x\n}\n", None, NameError_, 3, 3,
     "'B' is a dimension and cannot be redefined"),
    ("unknown-dtype", M + "  input x: f31[4]\n  output x\n}\n", None, ShapeError, 2, 12,
     "unknown dtype 'f31' (expected one of f32, f64, f16, bf16, i64, i32, bool)"),
    ("weights-missing", M + '  weights "nope.npz"\n' + X + "  output x\n}\n", None, InputError, 2, 11,
     "weights file 'nope.npz' not found"),
    ("bad-repeat-count", "block A(x) { return relu(x) }\n" + M + X + "  h = repeat 0 A(x)\n  output h\n}\n", None,
     ParseError, 4, 14, "repeat count must be an integer from 1 to 1000, got integer 0"),
    ("missing-output", M + X + "  h = relu(x)\n}\n", None, ParseError, 1, 7, "model 'm' has no 'output' statement"),
    ("no-model", "dim B = 3\n", None, ParseError, 1, 1, "no model in this file (expected 'model NAME { ... }')"),
    ("recursion", "block A(x) { return B(x) }\nblock B(x) { return A(x) }\n" + M + X + "  h = A(x)\n  output h\n}\n",
     None, ParseError, 2, 21, "recursive block call: A -> B -> A"),
    ("block-no-return", "block A(x) { y = relu(x) }\n" + M + X + "  h = A(x)\n  output h\n}\n", None, ParseError, 1, 7,
     "block 'A' has no 'return' statement"),
    ("block-arg-type", "block A(x: tensor, n: int) { return x }\n" + M + X + "  h = A(x, 2.5)\n  output h\n}\n", None,
     ShapeError, 4, 7, "block A: argument 'n' must be int, got number 2.5"),
    ("block-unknown-keyword", "block A(x) { return x }\n" + M + X + "  h = A(x, k=2)\n  output h\n}\n", None,
     NameError_, 4, 7, "block A: unknown keyword 'k' (parameters: x)"),
    ("input-in-block", "block A(x) {\n  input y: f32[2]\n  return x\n}\n" + M + X + "  h = A(x)\n  output h\n}\n", None,
     ParseError, 2, 3, "'input' is only allowed in a model, not in block 'A'"),
    ("statement-after-return", "block A(x) {\n  return x\n  y = x\n}\n" + M + X + "  h = A(x)\n  output h\n}\n",
     None, ParseError, 3, 3, "statement after 'return'"),
    ("non-scalar-loss", M + X + "  output x\n  train {\n    loss = relu(x)\n    optimizer sgd()\n  }\n}\n", None,
     ShapeError, 5, 12, "the loss must be a floating-point scalar, got f32[4,3]"),
    ("unknown-optimizer", M + X + "  output x\n  train {\n    loss = sum(x)\n    optimizer sdg(lr=0.1)\n  }\n}\n",
     None, NameError_, 6, 15, "unknown optimizer 'sdg' (known: sgd, adam, adamw)"),
    ("unknown-initializer", M + "  param w: f32[2] = gaussian()\n  output w\n}\n", None, NameError_, 2, 21,
     "unknown initializer 'gaussian' (known: zeros, ones, constant, normal, uniform, kaiming_uniform, "
     "kaiming_normal, xavier_uniform, xavier_normal, load)"),
    ("bad-block-sparsity", M + "  param w: f32[6, 6] = normal() sparse(block=4, density=0.5)\n  output w\n}\n", None,
     ShapeError, 2, 33, "weight shape [6, 6] is not divisible by block 4x4"),
    ("bad-nm-sparsity", M + X + "  h = Linear(x, 4, sparse=sparse(nm=2:4))\n  output h\n}\n", None, ShapeError, 3, 7,
     "last dimension of weight shape [4, 3] is not divisible by M=4 for 2:4 sparsity"),
    ("unpack-count", M + X + "  a, b = relu(x)\n  output a\n}\n", None, ShapeError, 3, 10,
     "2 names on the left, but the right side gives 1 value"),
    ("tensor-index", M + X + "  h = x[0]\n  output h\n}\n", None, ShapeError, 3, 9,
     "tensors cannot be indexed; use slice(x, axis, start, end) or x.shape[i]"),
    ("heads-not-dividing", M + "  input x: f32[2, 5, 6]\n  a = MultiHeadAttention(x, heads=4)\n  output a\n}\n", None,
     ShapeError, 3, 7, "MultiHeadAttention: dim 6 is not divisible by heads=4"),
    ("output-not-tensor", "dim B = 2\n" + M + "  output B\n}\n", None, ShapeError, 3, 10,
     "output 'B' must be a tensor, got integer 2"),
    ("duplicate-layer-name", M + X + '  a = Linear(x, 3, name="fc")\n  b = Linear(a, 3, name="fc")\n  output b\n}\n',
     None, NameError_, 4, 7, "the name 'fc' is already used by another layer or block instance"),
    ("repeat-arity", M + X + "  a, b = repeat 2 add(x, x)\n  output a\n}\n", None, ShapeError, 3, 19,
     "repeat threads 2 values, but 'add' returns 1"),
    ("block-named-like-op", "block relu(x) { return x }\n" + M + X + "  output x\n}\n", None, NameError_, 1, 7,
     "block 'relu' has the name of an op"),
    ("two-models", M + X + "  output x\n}\nmodel n {\n  input y: f32[1]\n  output y\n}\n", None, ParseError, 5, 7,
     "a file holds one model; 'n' is a second one"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_source_gives_located_error(case):
    _, source, settings, kind, line, col, message = case
    with pytest.raises(NNError) as info:
        parse_text(source, set=settings)
    err = info.value
    assert isinstance(err, kind), f"{type(err).__name__}: {err.format()}"
    assert err.message == message, err.format()
    if line is None:
        assert err.loc is None
    else:
        assert (err.loc.line, err.loc.col) == (line, col), err.format()
        assert err.loc.source_line == source.splitlines()[line - 1]


def test_format_shows_file_line_caret():
    with pytest.raises(NNError) as info:
        parse_text(M + X + "  h = relux(x)\n  output h\n}\n", filename="bad.nn")
    assert info.value.format().splitlines() == [
        "bad.nn:3:7: error: unknown op, layer or block 'relux' (did you mean 'relu'?)",
        "      h = relux(x)",
        "          ^",
    ]


def test_error_in_block_instance_notes_the_call_site():
    source = "block A(x: tensor) {\n  y = Linaer(x, 3)\n  return y\n}\n" + M + X + "  h = repeat 2 A(x)\n  output h\n}\n"
    with pytest.raises(NameError_) as info:
        parse_text(source, filename="b.nn")
    assert (info.value.loc.line, info.value.loc.col) == (2, 7)
    assert info.value.notes == ("in block 'A' (instance 'h.0') called at b.nn:7:16",)


def test_shape_mismatch_from_op_rule_is_located():
    source = M + "  input a: f32[4, 3]\n  input b: f32[4, 5]\n  c = a + b\n  output c\n}\n"
    with pytest.raises(ShapeError) as info:
        parse_text(source)
    assert (info.value.loc.line, info.value.loc.col) == (4, 9)  # at the '+'
    assert info.value.message == "add: shapes [4,3] and [4,5] do not broadcast"


def test_linear_feature_mismatch_is_located():
    source = M + X + "  param w: f32[5, 4] = normal()\n  h = linear(x, w)\n  output h\n}\n"
    with pytest.raises(ShapeError) as info:
        parse_text(source)
    assert (info.value.loc.line, info.value.loc.col) == (4, 7)
    assert info.value.message.startswith("linear: input features 3")


def test_weights_file_problems(tmp_path):
    np.savez(tmp_path / "w.npz", **{"fc.weight": np.zeros((2, 2), np.float32), "extra": np.zeros(1)})
    body = 'model m {\n  weights "w.npz"\n  input x: f32[4, 3]\n  fc = Linear(x, 2)\n  output fc\n}\n'
    (tmp_path / "m.nn").write_text(body)
    with pytest.raises(ShapeError) as info:
        parse(tmp_path / "m.nn")
    assert info.value.message == "weights file: 'fc.weight' has shape [2, 2], the parameter is f32[2,3]"
    assert (info.value.loc.line, info.value.loc.col) == (4, 8)
    np.savez(tmp_path / "w.npz", **{"fc.weight": np.zeros((2, 3), np.float32), "extra": np.zeros(1)})
    with pytest.raises(NameError_) as info:
        parse(tmp_path / "m.nn")
    assert info.value.message == "weights file has arrays that match no parameter: extra"
    assert (info.value.loc.line, info.value.loc.col) == (2, 11)
    (tmp_path / "l.nn").write_text('model m {\n  param w: f32[3] = load("w.npz", "nokey")\n  output w\n}\n')
    with pytest.raises(NameError_) as info:
        parse(tmp_path / "l.nn")
    assert info.value.message == "load: 'w.npz' has no array 'nokey' (it has: extra, fc.weight)"
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    (tmp_path / "c.nn").write_text('model m {\n  weights "bad.npz"\n  input x: f32[1]\n  output x\n}\n')
    with pytest.raises(InputError, match="cannot read weights file 'bad.npz'"):
        parse(tmp_path / "c.nn")


def test_missing_model_file():
    with pytest.raises(InputError, match="model file 'no/such.nn' not found"):
        parse("no/such.nn")


def test_set_value_must_be_integer():
    with pytest.raises(InputError, match="--set B: expected an integer"):
        parse_text("dim B = 2\n" + M + X + "  output x\n}\n", set={"B": "x"})


def test_messages_are_dedented_sources():
    # sources written indented in a test still report columns of the text as given
    source = textwrap.dedent("""\
        model m {
            input x: f32[2]
            y = x |> nothing
            output y
        }""")
    with pytest.raises(NameError_) as info:
        parse_text(source)
    assert (info.value.loc.line, info.value.loc.col) == (3, 14)
