"""Located errors: every user-facing failure says what went wrong and where.

An ``NNError`` carries an optional ``SourceLoc`` (file, line, column and the text of that line).
``format()`` renders the compiler-style message::

    model.nn:12:7: error: matmul: inner dimensions differ (784 vs 512)
        h = matmul(x, w)
            ^

The command line prints ``format()`` and exits with status 2; the Python API raises the error.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLoc:
    """Where something came from: a `.nn` file position or the Python frame of an fx node."""

    file: str
    line: int
    col: int = 0
    source_line: str | None = None

    def __str__(self) -> str:
        if self.col:
            return f"{self.file}:{self.line}:{self.col}"
        return f"{self.file}:{self.line}"


class NNError(Exception):
    """Base of all nncompile errors that reach a user."""

    kind = "error"

    def __init__(self, message: str, loc: SourceLoc | None = None, notes: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.notes = tuple(notes)

    def with_loc(self, loc: SourceLoc | None) -> "NNError":
        """Return this error located at ``loc`` unless it already has a location."""
        if self.loc is None and loc is not None:
            self.loc = loc
        return self

    def format(self) -> str:
        head = f"{self.kind}: {self.message}"
        lines = [f"{self.loc}: {head}" if self.loc else head]
        if self.loc is not None and self.loc.source_line is not None:
            text = self.loc.source_line.rstrip("\n")
            lines.append(f"    {text}")
            if self.loc.col:
                # keep tabs so the caret lines up under the same column
                pad = "".join(c if c == "\t" else " " for c in text[: self.loc.col - 1])
                lines.append(f"    {pad}^")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class ParseError(NNError):
    """Malformed `.nn` or IR text."""


class NameError_(NNError):
    """An unknown or duplicate name (a value, op, block, dimension or parameter)."""


class ShapeError(NNError):
    """A type rule failed: shapes, ranks or dtypes do not fit."""


class UnsupportedError(NNError):
    """A construct nncompile cannot handle (e.g. an unsupported torch op)."""


class VerifyError(NNError):
    """The IR broke an invariant (a pass produced an invalid graph)."""


class MissingRuleError(NNError):
    """An op lacks a rule (vjp, cost, emitter) that a stage needs."""


class BuildError(NNError):
    """The native compiler failed; the message points into the generated source."""


class SolverError(NNError):
    """A solver could not produce an answer (e.g. an infeasible memory budget)."""


class InputError(NNError, ValueError):
    """A bad argument to a compiled module or a command (wrong shape, dtype, missing file)."""
