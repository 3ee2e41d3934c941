"""Elementwise ops: activations, math, scalar ops and broadcasting binary ops."""
from __future__ import annotations

import numpy as np

from nncompile.errors import ShapeError
from nncompile.ir.types import DTYPES, TensorType
from nncompile.ops.base import REQUIRED, Cost, broadcast_shapes, defop, elementwise_cost, require_float
from nncompile.ops.validate import as_choice, as_float, normalizer, optional_float

FAMILY = "elementwise"


def _float_unary(op):
    def infer(x, **attrs):
        require_float(op, x)
        return x.dense()
    return infer


def _erf(x):
    import torch

    return torch.erf(torch.from_numpy(np.array(x, order="C"))).numpy().astype(x.dtype)   # keeps rank 0


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi).astype(x.dtype) * (x + x.dtype.type(0.044715) * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0).astype(x.dtype)))


def _sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


UNARY = {
    "relu": (lambda x: np.maximum(x, 0).astype(x.dtype), 1, "max(x, 0)"),
    "tanh": (np.tanh, 4, "hyperbolic tangent"),
    "sigmoid": (_sigmoid, 4, "1 / (1 + exp(-x))"),
    "silu": (lambda x: (x * _sigmoid(x)).astype(x.dtype), 5, "x * sigmoid(x)"),
    "exp": (np.exp, 4, "exponential e^x"),
    "log": (np.log, 4, "natural logarithm"),
    "sqrt": (np.sqrt, 1, "square root"),
    "rsqrt": (lambda x: (1.0 / np.sqrt(x)).astype(x.dtype), 2, "1 / sqrt(x)"),
    "neg": (np.negative, 1, "negation -x"),
    "abs": (np.abs, 1, "absolute value |x|"),
    "erf": (_erf, 8, "the error function"),
}

for _name, (_fn, _flops, _doc) in UNARY.items():
    defop(_name, inputs=("x",), infer=_float_unary(_name), ref=lambda x, _fn=_fn: np.asarray(_fn(x)).astype(x.dtype),
          cost=elementwise_cost(_flops), family=FAMILY, doc=_doc)


def _approximate(op, name, value):
    return as_choice(op, name, value, ("none", "tanh"))


defop("gelu", inputs=("x",), attrs={"approximate": "none"}, infer=_float_unary("gelu"),
      ref=lambda x, approximate: _gelu(x, approximate).astype(x.dtype), cost=elementwise_cost(8),
      normalize=normalizer("gelu", approximate=_approximate), family=FAMILY,
      doc="Gaussian error linear unit (erf form, or tanh approximation)")
defop("leaky_relu", inputs=("x",), attrs={"negative_slope": 0.01}, infer=_float_unary("leaky_relu"),
      ref=lambda x, negative_slope: np.where(x > 0, x, x * x.dtype.type(negative_slope)).astype(x.dtype),
      cost=elementwise_cost(2), normalize=normalizer("leaky_relu", negative_slope=as_float), family=FAMILY,
      doc="x if x > 0 else negative_slope * x")


def _clamp_ref(x, min=None, max=None):
    y = x
    if min is not None:
        y = np.maximum(y, x.dtype.type(min))
    if max is not None:
        y = np.minimum(y, x.dtype.type(max))
    return y.astype(x.dtype)


defop("clamp", inputs=("x",), attrs={"min": None, "max": None}, infer=_float_unary("clamp"), ref=_clamp_ref,
      cost=elementwise_cost(2), normalize=normalizer("clamp", min=optional_float, max=optional_float),
      family=FAMILY, doc="min(max(x, min), max); either bound may be none")
defop("scale", inputs=("x",), attrs={"factor": REQUIRED}, infer=_float_unary("scale"),
      ref=lambda x, factor: (x * x.dtype.type(factor)).astype(x.dtype), cost=elementwise_cost(1), family=FAMILY,
      normalize=normalizer("scale", factor=as_float), doc="x * factor (a compile-time constant)")
defop("add_scalar", inputs=("x",), attrs={"value": REQUIRED}, infer=_float_unary("add_scalar"),
      ref=lambda x, value: (x + x.dtype.type(value)).astype(x.dtype), cost=elementwise_cost(1), family=FAMILY,
      normalize=normalizer("add_scalar", value=as_float), doc="x + value (a compile-time constant)")
defop("pow_scalar", inputs=("x",), attrs={"exponent": REQUIRED}, infer=_float_unary("pow_scalar"),
      ref=lambda x, exponent: np.power(x, x.dtype.type(exponent)).astype(x.dtype), cost=elementwise_cost(4),
      normalize=normalizer("pow_scalar", exponent=as_float), family=FAMILY,
      doc="x ** exponent (a compile-time constant)")


def _binary_infer(op):
    def infer(a, b, **attrs):
        if a.dtype != b.dtype:
            raise ShapeError(f"{op}: operands have different dtypes ({a} and {b})")
        return TensorType(broadcast_shapes(op, a.shape, b.shape), a.dtype)
    return infer


BINARY = {
    "add": (np.add, "a + b"), "sub": (np.subtract, "a - b"), "mul": (np.multiply, "a * b"),
    "div": (np.divide, "a / b"), "maximum": (np.maximum, "elementwise max(a, b)"),
    "minimum": (np.minimum, "elementwise min(a, b)"),
}

for _name, (_fn, _doc) in BINARY.items():
    defop(_name, inputs=("a", "b"), infer=_binary_infer(_name),
          ref=lambda a, b, _fn=_fn: np.asarray(_fn(a, b)).astype(np.result_type(a, b)),
          cost=elementwise_cost(1), family=FAMILY, doc=_doc + " (NumPy broadcasting)")


def _where_infer(cond, a, b):
    if cond.dtype != "bool":
        raise ShapeError(f"where: the condition must be bool, got {cond}")
    if a.dtype != b.dtype:
        raise ShapeError(f"where: branches have different dtypes ({a} and {b})")
    return TensorType(broadcast_shapes("where", cond.shape, a.shape, b.shape), a.dtype)


defop("where", inputs=("cond", "a", "b"), infer=_where_infer, ref=lambda cond, a, b: np.where(cond, a, b),
      cost=elementwise_cost(1), family=FAMILY, doc="a where cond else b (broadcasting)")


def _cast_normalize(attrs):
    if attrs["dtype"] not in DTYPES:
        raise ShapeError(f"cast: unknown dtype {attrs['dtype']!r}")
    return attrs


def _cast_ref(x, dtype):
    from nncompile.ir.types import numpy_dtype

    return x.astype(numpy_dtype(dtype))


defop("cast", inputs=("x",), attrs={"dtype": REQUIRED}, infer=lambda x, dtype: x.with_dtype(dtype), ref=_cast_ref,
      cost=elementwise_cost(0), normalize=_cast_normalize, family=FAMILY, doc="convert to another dtype")
defop("identity", inputs=("x",), infer=lambda x: x.dense(), ref=lambda x: x.copy(),
      cost=lambda out, x: Cost(0, x.nbytes, out.nbytes), family=FAMILY, doc="x unchanged")
