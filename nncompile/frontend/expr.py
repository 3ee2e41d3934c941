"""Expressions of `.nn`: constants, names, arithmetic, shape queries, pipelines and calls.

``ExprEvaluator`` is the expression half of the `.nn` evaluator (``dsl.ModelEvaluator`` adds the
statements). Arithmetic on tensors becomes IR ops (``a + b`` -> add, ``x * 0.5`` -> scale, ...);
arithmetic on integers is exact (``d / heads`` must divide), so dimensions stay integers.
"""
from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from lark import Token, Tree

from nncompile.errors import NameError_, NNError, ParseError, ShapeError, SourceLoc
from nncompile.ir.builder import GraphBuilder
from nncompile.ir.types import DTYPES, Sparsity
from nncompile.ops.base import OPS, get_op
from nncompile.frontend.syntax import source_loc
from nncompile.frontend.values import Tensor, describe

_INT_LIMIT = 2 ** 62
SCALAR_TYPES = (int, float)


class Scope:
    """Names bound in a model or a block instance; ``parent`` holds the file's top-level dims."""

    def __init__(self, parent: "Scope | None" = None, shadowing: bool = False):
        self.parent = parent
        self.shadowing = shadowing
        self.values: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.locs: dict[str, SourceLoc | None] = {}

    def lookup(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        raise KeyError(name)

    def kind_of(self, name: str) -> str | None:
        scope = self
        while scope is not None:
            if name in scope.kinds:
                return scope.kinds[name]
            scope = scope.parent
        return None

    def names(self) -> list[str]:
        found = set(self.values)
        if self.parent is not None:
            found.update(self.parent.names())
        return sorted(found)

    def define(self, name: str, value: Any, kind: str, loc: SourceLoc | None) -> None:
        """Bind ``name``. Lets may rebind lets and tensors; declarations must be new; dims are fixed.

        A block's scope (``shadowing``) may shadow file-level dims with its parameters and lets; a
        model may not rebind any dim.
        """
        dim_kind = self.kinds.get(name) if self.shadowing else self.kind_of(name)
        if dim_kind == "dim":
            raise NameError_(f"'{name}' is a dimension and cannot be redefined", loc)
        if kind != "let" and name in self.values:
            where = self.locs.get(name)
            raise NameError_(f"'{name}' is already defined" + (f" (at {where})" if where else ""), loc)
        self.values[name] = value
        self.kinds[name] = kind
        self.locs[name] = loc


@dataclass
class Frame:
    """Where statements are being evaluated: the scope and the name prefix of a block instance."""

    scope: Scope
    prefix: str = ""
    block: str | None = None
    returned: Any = None
    has_return: bool = False

    def qualify(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local


def suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ExprEvaluator(ABC):
    """Evaluates expression trees; the subclass provides calls (ops, layers, blocks) and the statements."""

    builder: GraphBuilder
    filename: str
    lines: list[str]

    # locations ----------------------------------------------------------------------------------
    def loc(self, node) -> SourceLoc | None:
        if isinstance(node, Token):
            return source_loc(self.filename, self.lines, node.line, node.column)
        meta = getattr(node, "meta", None)
        if meta is None or getattr(meta, "empty", True):
            return None
        return source_loc(self.filename, self.lines, meta.line, meta.column)

    # expressions ----------------------------------------------------------------------------------
    def expr(self, tree, frame: Frame, hint: str | None = None, owner: str | None = None) -> Any:
        """Value of an expression. ``hint`` names the node it makes; ``owner`` prefixes layer parameters."""
        kind = tree.data
        if kind == "int":
            return self._check_int(int(tree.children[0]), tree)
        if kind == "float":
            value = float(tree.children[0])
            if not math.isfinite(value):
                raise ShapeError(f"number {tree.children[0]} is too large", self.loc(tree))
            return value
        if kind == "string":
            return unquote(str(tree.children[0]))
        if kind == "true":
            return True
        if kind == "false":
            return False
        if kind == "none":
            return None
        if kind == "ratio":
            return [int(tree.children[0]), int(tree.children[1])]
        if kind == "list":
            return [self.expr(c, frame, None, owner) for c in tree.children if c is not None]
        if kind == "var":
            return self.lookup(tree.children[0], frame)
        if kind == "attr":
            return self.attribute(self.expr(tree.children[0], frame, None, owner), tree.children[1])
        if kind == "index":
            return self.index(self.expr(tree.children[0], frame, None, owner),
                              self.expr(tree.children[1], frame, None, owner), tree)
        if kind == "unary_op":
            op_token, operand = tree.children
            return self.unary(str(op_token), self.expr(operand, frame, None, owner), op_token, frame, hint)
        if kind == "binop":
            left, op_token, right = tree.children
            a = self.expr(left, frame, None, owner)
            b = self.expr(right, frame, None, owner)
            return self.binary(str(op_token), a, b, op_token, frame, hint)
        if kind == "pipe":
            value = self.expr(tree.children[0], frame, None, owner)
            return self.call(tree.children[2], frame, hint, owner, piped=value)
        if kind == "call":
            return self.call(tree, frame, hint, owner)
        raise ParseError(f"unsupported expression '{kind}'", self.loc(tree))

    def _check_int(self, value: int, where) -> int:
        if abs(value) > _INT_LIMIT:
            raise ShapeError(f"integer {value} is too large", self.loc(where))
        return value

    def lookup(self, token: Token, frame: Frame) -> Any:
        name = str(token)
        try:
            return frame.scope.lookup(name)
        except KeyError:
            pass
        if name in DTYPES:  # dtype names stand for themselves: cast(ids, dtype=f32)
            return name
        if name in OPS or self.is_callable(name):
            message = f"'{name}' is an op, layer or block; call it with arguments, e.g. {name}(x)"
        else:
            message = f"unknown name '{name}'" + suggest(name, frame.scope.names())
        raise NameError_(message, self.loc(token))

    @abstractmethod
    def is_callable(self, name: str) -> bool:
        """Whether ``name`` is a layer, a block or a built-in function (for error messages)."""

    def attribute(self, value: Any, token: Token) -> Any:
        name = str(token)
        if not isinstance(value, Tensor):
            raise ShapeError(f"{describe(value)} has no attribute '{name}'", self.loc(token))
        if name == "shape":
            return list(value.shape)
        if name == "dtype":
            return value.type.dtype
        if name == "rank":
            return value.type.rank
        if name == "numel":
            return value.type.numel
        raise NameError_(f"a tensor has no attribute '{name}' (known: shape, dtype, rank, numel)", self.loc(token))

    def index(self, value: Any, position: Any, tree: Tree) -> Any:
        loc = self.loc(tree.children[1]) or self.loc(tree)
        if isinstance(value, Tensor):
            raise ShapeError("tensors cannot be indexed; use slice(x, axis, start, end) or x.shape[i]", loc)
        if not isinstance(value, list):
            raise ShapeError(f"{describe(value)} cannot be indexed", loc)
        if isinstance(position, bool) or not isinstance(position, int):
            raise ShapeError(f"a list index must be an integer, got {describe(position)}", loc)
        if not -len(value) <= position < len(value):
            raise ShapeError(f"index {position} is out of range for a list of {len(value)}", loc)
        return value[position]

    # arithmetic ---------------------------------------------------------------------------------
    def unary(self, op: str, value: Any, token: Token, frame: Frame, hint: str | None) -> Any:
        loc = self.loc(token)
        if isinstance(value, Tensor):
            return value if op == "+" else self.emit("neg", [value], {}, loc, frame, hint)
        if isinstance(value, bool) or not isinstance(value, SCALAR_TYPES):
            raise ShapeError(f"cannot apply unary '{op}' to {describe(value)}", loc)
        return value if op == "+" else -value

    def binary(self, op: str, a: Any, b: Any, token: Token, frame: Frame, hint: str | None) -> Any:
        loc = self.loc(token)
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            return self.tensor_binary(op, a, b, loc, frame, hint)
        for value in (a, b):
            if isinstance(value, bool) or not isinstance(value, SCALAR_TYPES):
                raise ShapeError(f"cannot apply '{op}' to {describe(a)} and {describe(b)}", loc)
        return self.number_binary(op, a, b, loc)

    def number_binary(self, op: str, a, b, loc: SourceLoc | None):
        both_int = isinstance(a, int) and isinstance(b, int)
        if op == "/" and b == 0:
            raise ShapeError(f"division by zero: {a} / {b}", loc)
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            result = a * b
        elif op == "/":
            if both_int:
                if a % b:
                    raise ShapeError(f"integer division {a} / {b} is not exact (dimensions must divide evenly)", loc)
                result = a // b
            else:
                result = a / b
        else:
            if both_int:
                if b < 0 or b > 64 or (abs(a) > 1 and b * math.log2(abs(a)) > 62):
                    raise ShapeError(f"integer power {a} ** {b} is out of range", loc)
                result = a ** b
            else:
                try:
                    result = float(a) ** float(b)
                except (OverflowError, ZeroDivisionError):
                    raise ShapeError(f"{a} ** {b} is out of range", loc) from None
                if isinstance(result, complex):
                    raise ShapeError(f"{a} ** {b} is not a real number", loc)
        if isinstance(result, int) and abs(result) > _INT_LIMIT:
            raise ShapeError(f"integer {result} is too large", loc)
        if isinstance(result, float) and not math.isfinite(result):
            raise ShapeError(f"'{op}' gives {result}", loc)
        return result

    def tensor_binary(self, op: str, a: Any, b: Any, loc: SourceLoc | None, frame: Frame, hint: str | None) -> Tensor:
        names = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if op == "**":
                raise ShapeError("the exponent of '**' must be a number, not a tensor", loc)
            return self.emit(names[op], [a, b], {}, loc, frame, hint)
        tensor, scalar = (a, b) if isinstance(a, Tensor) else (b, a)
        if isinstance(scalar, bool) or not isinstance(scalar, SCALAR_TYPES):
            raise ShapeError(f"cannot apply '{op}' to {describe(a)} and {describe(b)}", loc)
        if tensor.type.is_float:
            scalar = float(scalar)
        tensor_first = tensor is a
        if op == "+":
            return self.emit("add_scalar", [tensor], {"value": scalar}, loc, frame, hint)
        if op == "*":
            return self.emit("scale", [tensor], {"factor": scalar}, loc, frame, hint)
        if op == "-":
            if tensor_first:
                return self.emit("add_scalar", [tensor], {"value": -scalar}, loc, frame, hint)
            negated = self.emit("neg", [tensor], {}, loc, frame, None)
            return self.emit("add_scalar", [negated], {"value": scalar}, loc, frame, hint)
        if op == "/":
            if tensor_first:
                if scalar == 0:
                    raise ShapeError("division of a tensor by zero", loc)
                return self.emit("scale", [tensor], {"factor": 1.0 / scalar}, loc, frame, hint)
            inverse = self.emit("pow_scalar", [tensor], {"exponent": -1.0}, loc, frame, None)
            return self.emit("scale", [inverse], {"factor": scalar}, loc, frame, hint)
        if not tensor_first:
            raise ShapeError("the exponent of '**' must be a number, not a tensor", loc)
        return self.emit("pow_scalar", [tensor], {"exponent": float(scalar)}, loc, frame, hint)

    # calls ------------------------------------------------------------------------------------------
    def call_arguments(self, tree: Tree, frame: Frame, owner: str | None, piped: Any = None):
        """(positional values, keyword values) of a call; a piped value goes first."""
        positional = [] if piped is None else [piped]
        keywords: dict[str, Any] = {}
        if tree.data == "var":
            return positional, keywords
        args = tree.children[1]
        for arg in (args.children if args is not None else []):
            if isinstance(arg, Tree) and arg.data == "kwarg":
                key = str(arg.children[0])
                if key in keywords:
                    raise NameError_(f"keyword '{key}' given twice", self.loc(arg.children[0]))
                keywords[key] = self.expr(arg.children[1], frame, None, owner)
            else:
                if keywords:
                    raise ParseError("positional argument after a keyword argument", self.loc(arg))
                positional.append(self.expr(arg, frame, None, owner))
        return positional, keywords

    @abstractmethod
    def call(self, tree: Tree, frame: Frame, hint: str | None, owner: str | None, piped: Any = None) -> Any:
        """Value of a call expression (``piped``: the left side of ``|>``, passed first)."""

    def call_op(self, op: str, positional: list, keywords: dict, loc: SourceLoc | None, frame: Frame,
                hint: str | None) -> Tensor:
        """An IR op: leading tensor arguments are its inputs, then constants fill attributes in order."""
        opdef = get_op(op)
        inputs: list[Tensor] = []
        position = 0
        while position < len(positional) and isinstance(positional[position], Tensor):
            inputs.append(positional[position])
            position += 1
        constants = positional[position:]
        if any(isinstance(v, Tensor) for v in constants):
            raise ShapeError(f"{op}: tensor argument after a constant one; tensors come first", loc)
        if not inputs and opdef.min_inputs > 0 and constants:
            raise ShapeError(f"{op}: argument 1 ({opdef.input_names[0]}) must be a tensor, got {describe(constants[0])}", loc)
        attr_names = list(opdef.attrs)
        if len(constants) > len(attr_names):
            if len(inputs) < opdef.min_inputs:
                raise ShapeError(f"{op}: argument {len(inputs) + 1} ({opdef.input_names[len(inputs)]}) must be a "
                                 f"tensor, got {describe(constants[0])}", loc)
            raise ShapeError(f"{op} takes {len(attr_names)} attribute{'s' if len(attr_names) != 1 else ''} "
                             f"({', '.join(attr_names) or 'none'}), got {len(constants)} extra arguments", loc)
        attrs = dict(zip(attr_names, constants))
        input_names = opdef.input_names
        for key, value in keywords.items():
            if key in input_names and not opdef.variadic:
                slot = input_names.index(key)
                if not isinstance(value, Tensor):
                    raise ShapeError(f"{op}: input '{key}' must be a tensor, got {describe(value)}", loc)
                if slot != len(inputs):
                    raise ShapeError(f"{op}: input '{key}' is input {slot + 1}, but {len(inputs)} inputs come before it", loc)
                inputs.append(value)
            elif key in attrs:
                raise NameError_(f"{op}: attribute '{key}' given twice", loc)
            elif key not in opdef.attrs:
                known = ", ".join(attr_names) or "none"
                raise NameError_(f"{op}: unknown keyword '{key}' (attributes: {known})", loc)
            else:
                attrs[key] = value
        return self.emit(op, inputs, attrs, loc, frame, hint)

    def emit(self, op: str, inputs: list[Tensor], attrs: dict, loc: SourceLoc | None, frame: Frame,
             hint: str | None, name: str | None = None) -> Tensor:
        """Append one node through the builder (its op rules check arity, attributes and shapes)."""
        clean = {key: _attr_value(op, key, value, loc) for key, value in attrs.items()}
        node_name = name or frame.qualify(hint or op)
        try:
            result = self.builder.op(op, [t.name for t in inputs], clean, name=node_name, loc=loc)
        except NNError as err:
            raise err.with_loc(loc)
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError, AttributeError) as err:
            raise ShapeError(f"{op}: invalid arguments ({type(err).__name__}: {err})", loc) from None
        return Tensor(result, self.builder.type_of(result))


def _attr_value(op: str, key: str, value: Any, loc: SourceLoc | None) -> Any:
    if isinstance(value, Tensor):
        raise ShapeError(f"{op}: attribute '{key}' must be a constant, got a tensor", loc)
    if isinstance(value, Sparsity):
        raise ShapeError(f"{op}: attribute '{key}' cannot be a sparsity pattern", loc)
    if isinstance(value, (list, tuple)):
        return tuple(_attr_value(op, key, v, loc) for v in value)
    return value


def unquote(text: str) -> str:
    body = text[1:-1]
    out, i = [], 0
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)
