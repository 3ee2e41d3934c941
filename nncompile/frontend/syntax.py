"""Reading `.nn` text: the lark LALR parser for ``grammar/nn.lark`` and its errors in words.

``parse_tree(text, filename)`` returns the lark tree (positions kept on every node) or raises a
located ``ParseError`` that names what was found and what would have been accepted there::

    mlp.nn:4:12: error: unexpected ')', expected an expression
        h = relu()
                 ^
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from nncompile.errors import ParseError, SourceLoc

GRAMMAR_PATH = Path(__file__).resolve().parents[2] / "grammar" / "nn.lark"

# terminals described in words; keywords and punctuation are shown quoted
_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*' or '/'",
    "POW_OP": "'**'",
    "PIPE": "'|>'",
    "$END": "end of file",
}
# when all of these are acceptable, the parser wants an expression
_EXPRESSION_START = {"NAME", "INT", "FLOAT", "STRING", "LPAR", "LSQB", "ADD_OP"}
# after a complete operand these may continue the expression; reported together as "an operator"
_OPERATORS = {"ADD_OP", "MUL_OP", "POW_OP", "PIPE", "DOT", "LSQB"}


@lru_cache(maxsize=1)
def parser() -> lark.Lark:
    if not GRAMMAR_PATH.exists():
        raise ParseError(f"the .nn grammar is missing: {GRAMMAR_PATH}")
    return lark.Lark(GRAMMAR_PATH.read_text(), parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def source_loc(filename: str, lines: list[str], line: int, col: int) -> SourceLoc:
    text = lines[line - 1] if 0 < line <= len(lines) else None
    return SourceLoc(filename, line, col, text)


def _describe_terminal(name: str) -> str:
    if name in _WORDS:
        return _WORDS[name]
    try:
        pattern = parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'"


def describe_expected(expected) -> str:
    """The set of acceptable terminals, in words (keywords quoted, expressions collapsed)."""
    names = set(expected)
    summary = []
    if _EXPRESSION_START <= names:
        names -= _EXPRESSION_START
        summary.append("an expression")
    elif len(names & _OPERATORS) >= 3:
        names -= _OPERATORS
        summary.append("an operator")
    words = sorted(_describe_terminal(n) for n in names if n not in _WORDS)
    words += sorted(_describe_terminal(n) for n in names if n in _WORDS) + summary
    if not words:
        return "nothing more"
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "NAME":
        return f"name '{token.value}'"
    if token.type in ("INT", "FLOAT"):
        return f"number {token.value}"
    if token.type == "STRING":
        return f"string {token.value}"
    return f"'{token.value}'"


def _end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character (where 'end of file' is reported)."""
    stripped = text.rstrip()
    lines = stripped.split("\n")
    return len(lines), len(lines[-1]) + 1


def _acceptable(err: UnexpectedToken) -> set[str]:
    """The terminals really acceptable at the error (LALR's merged lookahead sets can list more)."""
    parser_state = getattr(err, "interactive_parser", None)
    if parser_state is not None:
        try:
            return set(parser_state.accepts())
        except Exception:  # noqa: BLE001 (fall back to lark's own set)
            pass
    return set(err.expected)


def parse_tree(text: str, filename: str = "<string>") -> lark.Tree:
    """Parse `.nn` source into a lark tree; syntax errors become located ``ParseError``s."""
    lines = text.splitlines()
    try:
        return parser().parse(text)
    except UnexpectedToken as err:
        if err.token.type == "$END":
            line, col = _end_position(text)
        else:
            line, col = err.line, err.column
        message = f"unexpected {_describe_token(err.token)}, expected {describe_expected(_acceptable(err))}"
        raise ParseError(message, source_loc(filename, lines, line, col)) from None
    except UnexpectedCharacters as err:
        char = text[err.pos_in_stream] if 0 <= err.pos_in_stream < len(text) else err.char
        if char == '"':
            message = "unterminated string"
        else:
            message = f"unexpected character {char!r}"
            if err.allowed:
                message += f", expected {describe_expected(err.allowed)}"
        raise ParseError(message, source_loc(filename, lines, err.line, err.column)) from None
    except UnexpectedEOF as err:
        line, col = _end_position(text)
        message = f"unexpected end of file, expected {describe_expected(err.expected)}"
        raise ParseError(message, source_loc(filename, lines, line, col)) from None
    except UnexpectedInput as err:  # any other lark input error
        raise ParseError(f"syntax error: {err}", source_loc(filename, lines, getattr(err, "line", 1),
                                                            getattr(err, "column", 1))) from None
