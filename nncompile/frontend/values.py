"""The values a `.nn` program computes with, and argument binding for built-in callables.

A name in a `.nn` scope is bound to a ``Tensor`` (a value of the graph being built) or to a
constant: int, float, bool, str, None, a list of those, or a ``Sparsity`` (from ``sparse(...)``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nncompile.errors import NameError_, ShapeError, SourceLoc
from nncompile.ir.types import Sparsity, TensorType

REQUIRED = object()


@dataclass(frozen=True)
class Tensor:
    """A graph value: its IR name and type."""

    name: str
    type: TensorType

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, Tensor):
        return f"tensor {value.type.dense()}"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if value is None:
        return "none"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Sparsity):
        return "a sparsity pattern"
    return type(value).__name__


def bind_args(what: str, spec: Mapping[str, Any], positional: Sequence[Any], keywords: Mapping[str, Any],
              loc: SourceLoc | None) -> dict[str, Any]:
    """Bind positional then keyword arguments to ``spec`` (name -> default or REQUIRED)."""
    names = list(spec)
    if len(positional) > len(names):
        raise ShapeError(f"{what} takes at most {len(names)} argument{'s' if len(names) != 1 else ''} "
                         f"({', '.join(names) or 'none'}), got {len(positional)}", loc)
    bound = dict(zip(names, positional))
    for key, value in keywords.items():
        if key not in spec:
            raise NameError_(f"{what}: unknown keyword '{key}' (known: {', '.join(names) or 'none'})", loc)
        if key in bound:
            raise NameError_(f"{what}: argument '{key}' given twice", loc)
        bound[key] = value
    for key, default in spec.items():
        if key not in bound:
            if default is REQUIRED:
                raise ShapeError(f"{what}: missing argument '{key}'", loc)
            bound[key] = default
    return {key: bound[key] for key in names}


def as_int(what: str, value: Any, loc: SourceLoc | None, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{what} must be an integer, got {describe(value)}", loc)
    if minimum is not None and value < minimum:
        raise ShapeError(f"{what} must be at least {minimum}, got {value}", loc)
    return value


def as_number(what: str, value: Any, loc: SourceLoc | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShapeError(f"{what} must be a number, got {describe(value)}", loc)
    return float(value)


def as_bool(what: str, value: Any, loc: SourceLoc | None) -> bool:
    if not isinstance(value, bool):
        raise ShapeError(f"{what} must be true or false, got {describe(value)}", loc)
    return value


def as_tensor(what: str, value: Any, loc: SourceLoc | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ShapeError(f"{what} must be a tensor, got {describe(value)}", loc)
    return value


def as_ints(what: str, value: Any, loc: SourceLoc | None, minimum: int = 0, count: int = 2) -> tuple[int, ...]:
    """An int (the same on every axis) or a list of ``count`` ints (kernel sizes, strides, paddings)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ShapeError(f"{what} must be an integer or a list of {count} integers, got {len(value)} values", loc)
        return tuple(as_int(what, v, loc, minimum) for v in value)
    return (as_int(what, value, loc, minimum),) * count


def as_pair(what: str, value: Any, loc: SourceLoc | None, minimum: int = 0) -> tuple[int, int]:
    """An int or a list of two ints."""
    return as_ints(what, value, loc, minimum, 2)
