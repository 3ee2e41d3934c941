"""Attribute checks shared by the ``normalize`` rules: one canonical Python type per attribute.

Each helper returns the canonical value or raises ``ShapeError`` naming the op and the attribute,
so ``scale(x; factor=2)`` and ``factor=2.0`` become the same IR, and ``factor="2"`` is a clear error.
"""
from __future__ import annotations

from nncompile.errors import ShapeError


def as_int(op: str, name: str, value, *, minimum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ShapeError(f"{op}: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ShapeError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def as_float(op: str, name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ShapeError(f"{op}: {name} must be a number, got {value!r}")
    return float(value)


def as_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ShapeError(f"{op}: {name} must be true or false, got {value!r}")
    return value


def as_choice(op: str, name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        wanted = " or ".join(repr(c) for c in choices)
        raise ShapeError(f"{op}: {name} must be {wanted}, got {value!r}")
    return value


def normalizer(op: str, **kinds):
    """A ``normalize`` rule from per-attribute checks: ``normalizer("gelu", approximate=check)``.

    Each value of ``kinds`` is ``check(op, name, value) -> canonical value``.
    """
    def normalize(attrs: dict) -> dict:
        for name, check in kinds.items():
            attrs[name] = check(op, name, attrs[name])
        return attrs
    return normalize


def optional_float(op: str, name: str, value):
    return as_float(op, name, value, allow_none=True)


def optional_int(op: str, name: str, value):
    return as_int(op, name, value, allow_none=True)
