"""OpDef: every rule of one op, side by side.

An op is defined once, with ``defop``:

    defop("relu", inputs=("x",), infer=same_type, ref=lambda x: np.maximum(x, 0),
          cost=elementwise_cost(1), doc="max(x, 0)")

Rules and their signatures (attributes are passed as keyword arguments):

- ``infer(*in_types, **attrs) -> TensorType`` — raise ``ShapeError`` (no location needed: the
  builder adds the node's source location) when the inputs don't fit;
- ``ref(*arrays, **attrs) -> np.ndarray`` — the NumPy reference; it *is* the semantics;
- ``cost(out_type, *in_types, **attrs) -> Cost`` — FLOPs and bytes moved;
- ``vjp(grad, node, *in_names) -> tuple`` — gradients w.r.t. each input, built from other ops through
  the ``grad`` builder (``None`` for inputs that need no gradient; filled by the training work);
- ``emit_cpp`` / ``emit_cuda`` — code for the C++ and CUDA emitters.

Inputs are declared by name: ``"x"`` required, ``"bias?"`` optional (None when absent), ``"*xs"``
variadic (only as the single input). Attributes are declared with defaults; ``REQUIRED`` marks
attributes without one. ``normalize(attrs) -> attrs`` may canonicalize them (e.g. ``stride=2`` to
``(2, 2)``) so the IR always holds one spelling; ``canonicalize(attrs, *in_types) -> attrs`` does what
needs the input types (e.g. reduction axes ``-1`` -> ``(2,)``) when the caller passes them to
``bind_attrs``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nncompile.errors import MissingRuleError, ShapeError
from nncompile.ir.types import TensorType


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes_read: int
    bytes_written: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written)


RULES = ("infer", "ref", "cost", "vjp", "emit_cpp", "emit_cuda")


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    infer: Callable[..., TensorType]
    ref: Callable[..., Any]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    cost: Callable[..., Cost] | None = None
    vjp: Callable[..., Any] | None = None
    emit_cpp: Callable[..., Any] | None = None
    emit_cuda: Callable[..., Any] | None = None
    normalize: Callable[[dict], dict] | None = None
    canonicalize: Callable[..., dict] | None = None
    family: str = ""
    doc: str = ""

    def rule(self, rule: str) -> Callable:
        """The named rule, or a MissingRuleError naming the op and the rule."""
        fn = getattr(self, rule)
        if fn is None:
            raise MissingRuleError(f"op '{self.name}' has no '{rule}' rule")
        return fn

    @property
    def variadic(self) -> bool:
        return len(self.inputs) == 1 and self.inputs[0].startswith("*")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.strip("*?") for i in self.inputs)

    @property
    def min_inputs(self) -> int:
        if self.variadic:
            return 1
        return sum(1 for i in self.inputs if not i.endswith("?"))

    @property
    def max_inputs(self) -> int | None:
        return None if self.variadic else len(self.inputs)

    def signature(self) -> str:
        attrs = ", ".join(f"{k}" if v is REQUIRED else f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{self.name}({', '.join(self.inputs)}{'; ' + attrs if attrs else ''})"

    def bind_attrs(self, given: Mapping[str, Any], in_types: list | None = None) -> dict[str, Any]:
        """Fill defaults, reject unknown or missing attributes, canonicalize.

        With ``in_types`` (the input types, None for absent optional inputs) the op's ``canonicalize``
        rule also runs, for spellings that depend on the inputs (negative axes).
        """
        unknown = [k for k in given if k not in self.attrs]
        if unknown:
            known = ", ".join(self.attrs) or "none"
            raise ShapeError(f"{self.name}: unknown attribute '{unknown[0]}' (known: {known})")
        merged = {k: given.get(k, default) for k, default in self.attrs.items()}
        missing = [k for k, v in merged.items() if v is REQUIRED]
        if missing:
            raise ShapeError(f"{self.name}: missing required attribute '{missing[0]}'")
        merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
        if self.normalize is not None:
            merged = self.normalize(merged)
        if self.canonicalize is not None and in_types is not None:
            merged = self.canonicalize(merged, *self.split_inputs(list(in_types)))
        return merged

    def check_arity(self, count: int) -> None:
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            if self.variadic:
                expect = "at least 1 input"
            elif self.min_inputs == self.max_inputs:
                expect = f"{self.min_inputs} input{'s' if self.min_inputs != 1 else ''}"
            else:
                expect = f"{self.min_inputs} to {self.max_inputs} inputs"
            raise ShapeError(f"{self.name} takes {expect} ({', '.join(self.inputs)}), got {count}")

    def split_inputs(self, values: list) -> list:
        """Pad optional inputs with None so rules get one positional slot per declared input."""
        if self.variadic:
            return [list(values)]
        return list(values) + [None] * (len(self.inputs) - len(values))


OPS: dict[str, OpDef] = {}


def defop(name: str, *, inputs: tuple[str, ...], infer, ref, family: str = "", **rules) -> OpDef:
    """Define and register an op. See the module docstring for the rules."""
    if name in OPS:
        raise ValueError(f"op '{name}' defined twice")
    opdef = OpDef(name=name, inputs=tuple(inputs), infer=infer, ref=ref, family=family, **rules)
    OPS[name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    import nncompile.ops  # noqa: F401  (registers every family)

    try:
        return OPS[name]
    except KeyError:
        raise ShapeError(f"unknown op '{name}'") from None


def set_rule(op_name: str, rule: str, fn: Callable) -> None:
    """Attach a rule defined elsewhere (e.g. an emitter table) to an op."""
    from dataclasses import replace

    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}'")
    OPS[op_name] = replace(get_op(op_name), **{rule: fn})


# Common rules -------------------------------------------------------------------------------------


def same_type(x: TensorType, *rest, **attrs) -> TensorType:
    return x.dense()


def elementwise_cost(flops_per_element: int = 1):
    def cost(out: TensorType, *ins: TensorType, **attrs) -> Cost:
        read = sum(t.nbytes for t in ins if t is not None)
        return Cost(flops_per_element * out.numel, read, out.nbytes)

    return cost


def require_float(op: str, *types: TensorType) -> None:
    for t in types:
        if t is not None and not t.is_float:
            raise ShapeError(f"{op}: expected a floating-point tensor, got {t}")


def normalize_axis(op: str, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{op}: axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank if rank else 0


def broadcast_shapes(op: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            pretty = " and ".join(f"[{','.join(map(str, s))}]" for s in shapes)
            raise ShapeError(f"{op}: shapes {pretty} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)
