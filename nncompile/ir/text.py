"""The IR's text form. ``parse_graph(print_graph(g))`` rebuilds ``g`` exactly.

    graph mlp {
      input x: f32[64,784] @ "mlp.nn":4:9
      param fc1.weight: f32[1024,784] = kaiming_uniform(a=2.23606797749979)
      buffer bn.running_mean: f32[6] = zeros()
      h = linear(x, fc1.weight, fc1.bias) : f32[64,1024] @ "mlp.nn":6:7
      y = conv2d(x, w) {dilation=(1, 1), groups=1} : f32[8,6,24,24]
      output logits
      train loss=loss labels=(labels) optimizer=sgd {lr=0.1, momentum=0.9}
    }

Values of ``given`` parameters are not part of the text; pass them to ``parse_graph(text, weights)``.
"""
from __future__ import annotations

import math
import re
from typing import Any

from nncompile.errors import NNError, ParseError, SourceLoc
from nncompile.ir.graph import Attrs, Graph, Init, Input, Node, Param, TrainSpec
from nncompile.ir.types import Sparsity, TensorType


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def format_attrs(attrs) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in attrs.items())


def _loc(loc: SourceLoc | None) -> str:
    if loc is None:
        return ""
    return f" @ {format_value(loc.file)}:{loc.line}:{loc.col}"


def print_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name} {{"]
    for item in graph.inputs:
        lines.append(f"  input {item.name}: {item.type}{_loc(item.loc)}")
    for p in graph.params:
        keyword = "param" if p.trainable else "buffer"
        lines.append(f"  {keyword} {p.name}: {p.type} = {p.init.kind}({format_attrs(p.init.args)}){_loc(p.loc)}")
    for node in graph.nodes:
        attrs = f" {{{format_attrs(node.attrs)}}}" if node.attrs else ""
        lines.append(f"  {node.name} = {node.op}({', '.join(node.inputs)}){attrs} : {node.type}{_loc(node.loc)}")
    if graph.outputs:
        lines.append(f"  output {', '.join(graph.outputs)}")
    if graph.train is not None:
        t = graph.train
        hyper = f" {{{format_attrs(t.hyper)}}}" if t.hyper else ""
        lines.append(f"  train loss={t.loss} labels={format_value(tuple(t.label_inputs))} optimizer={t.optimizer}{hyper}")
    lines.append("}")
    return "\n".join(lines) + "\n"


_TOKEN = re.compile(r"""
    (?P<ws>[ \t]+|\#[^\n]*)
  | (?P<nl>\n)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?|\d+)|-?inf(?![\w.])|nan(?![\w.]))
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}()\[\]:,=@;])
""", re.X)


class _Reader:
    def __init__(self, text: str, filename: str):
        self.filename = filename
        self.lines = text.splitlines()
        self.tokens: list[tuple[str, str, int, int]] = []
        line, line_start, pos = 1, 0, 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                raise self.error_at(f"unexpected character {text[pos]!r}", line, pos - line_start + 1)
            kind = match.lastgroup
            if kind == "nl":
                line, line_start = line + 1, match.end()
            elif kind != "ws":
                self.tokens.append((kind, match.group(), line, match.start() - line_start + 1))
            pos = match.end()
        self.tokens.append(("eof", "", line, 1))
        self.i = 0

    def error_at(self, message: str, line: int, col: int) -> ParseError:
        source = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        return ParseError(message, SourceLoc(self.filename, line, col, source))

    def error(self, message: str) -> ParseError:
        _, text, line, col = self.tokens[self.i]
        return self.error_at(f"{message} (found {text!r})" if text else f"{message} (found end of input)", line, col)

    def peek(self, value: str | None = None, kind: str | None = None) -> bool:
        tok_kind, text, _, _ = self.tokens[self.i]
        return (value is None or text == value) and (kind is None or tok_kind == kind)

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        if not self.peek(value, kind):
            raise self.error(f"expected {value or kind}")
        text = self.tokens[self.i][1]
        self.i += 1
        return text

    def name(self) -> str:
        """A value name: any identifier, keywords included, and the names ``inf`` / ``nan``."""
        kind, text, _, _ = self.tokens[self.i]
        if kind == "name" or (kind == "number" and text in ("inf", "nan")):
            self.i += 1
            return text
        raise self.error("expected a name")

    def located(self, start: int, build):
        """``build()``, with a semantic error (bad dtype, dimension, sparsity) located at token ``start``."""
        try:
            return build()
        except ParseError:
            raise
        except NNError as err:
            _, _, line, col = self.tokens[start]
            raise err.with_loc(self.error_at(err.message, line, col).loc) from None
        except (TypeError, ValueError) as err:
            _, _, line, col = self.tokens[start]
            raise self.error_at(str(err), line, col) from None

    def accept(self, value: str) -> bool:
        if self.peek(value):
            self.i += 1
            return True
        return False

    def value(self) -> Any:
        kind, text, _, _ = self.tokens[self.i]
        if kind == "string":
            self.i += 1
            return re.sub(r"\\(.)", r"\1", text[1:-1])
        if kind == "number":
            self.i += 1
            if text in ("inf", "-inf", "nan") or any(c in text for c in ".eE") and not text.startswith("0x"):
                return float(text)
            return int(text)
        if kind == "name" and text in ("true", "false", "none"):
            self.i += 1
            return {"true": True, "false": False, "none": None}[text]
        if self.accept("("):
            items = []
            while not self.accept(")"):
                items.append(self.value())
                if not self.accept(","):
                    self.take(")")
                    break
            return tuple(items)
        raise self.error("expected a value")

    def kwargs(self, close: str) -> dict[str, Any]:
        found = {}
        while not self.accept(close):
            key = self.take(kind="name")
            self.take("=")
            found[key] = self.value()
            if not self.accept(","):
                self.take(close)
                break
        return found

    def tensor_type(self) -> TensorType:
        start = self.i
        return self.located(start, lambda: self._tensor_type(start))

    def _tensor_type(self, start: int) -> TensorType:
        dtype = self.take(kind="name")
        self.take("[")
        dims = []
        while not self.accept("]"):
            dims.append(int(self.take(kind="number")))
            if not self.accept(","):
                self.take("]")
                break
        sparsity = None
        if self.accept("sparse"):
            kind = self.take(kind="name")
            self.take("(")
            args = self.kwargs(")")
            if kind == "block":
                args["block"] = (args.pop("bh"), args.pop("bw"))
            sparsity = Sparsity(kind, **args)
        return TensorType(tuple(dims), dtype, sparsity)

    def loc(self) -> SourceLoc | None:
        if not self.accept("@"):
            return None
        file = self.value()
        self.take(":")
        line = int(self.take(kind="number"))
        self.take(":")
        col = int(self.take(kind="number"))
        return SourceLoc(file, line, col)


def parse_graph(text: str, weights: dict | None = None, filename: str = "<ir>") -> Graph:
    """Parse the text form back into a Graph (types are taken as written; run the verifier to check)."""
    r = _Reader(text, filename)
    r.take("graph")
    name = r.take(kind="name")
    r.take("{")
    inputs, params, nodes, outputs, train = [], [], [], [], None
    defined: set[str] = set()

    def define(start: int, value_name: str) -> str:
        if value_name in defined:
            _, _, line, col = r.tokens[start]
            raise r.error_at(f"'{value_name}' is defined twice", line, col)
        defined.add(value_name)
        return value_name

    while not r.accept("}"):
        start = r.i
        if r.i + 1 < len(r.tokens) and r.tokens[r.i + 1][1] == "=" and r.tokens[r.i][0] in ("name", "number"):
            value_name = define(start, r.name())
            r.take("=")
            op = r.take(kind="name")
            r.take("(")
            args = []
            while not r.accept(")"):
                args.append(r.name())
                if not r.accept(","):
                    r.take(")")
                    break
            attrs = r.kwargs("}") if r.accept("{") else {}
            r.take(":")
            type_ = r.tensor_type()
            nodes.append(Node(value_name, op, tuple(args), Attrs(attrs), type_, r.loc()))
        elif r.accept("input"):
            value_name = define(start, r.name())
            r.take(":")
            inputs.append(Input(value_name, r.tensor_type(), r.loc()))
        elif r.peek("param") or r.peek("buffer"):
            trainable = r.take(kind="name") == "param"
            value_name = define(start, r.name())
            r.take(":")
            type_ = r.tensor_type()
            r.take("=")
            kind = r.take(kind="name")
            r.take("(")
            init = Init(kind, r.kwargs(")"))
            params.append(Param(value_name, type_, init, trainable, r.loc()))
        elif r.accept("output"):
            outputs.append(r.name())
            while r.accept(","):
                outputs.append(r.name())
        elif r.accept("train"):
            spec = {}
            for key in ("loss", "labels", "optimizer"):
                r.take(key)
                r.take("=")
                spec[key] = r.value() if key == "labels" else r.name()
            hyper = r.kwargs("}") if r.accept("{") else {}
            train = TrainSpec(spec["loss"], tuple(spec["labels"]), spec["optimizer"], Attrs(hyper))
        else:
            raise r.error("expected input, param, buffer, output, train or NAME = op(...)")
    r.take(kind="eof")
    return Graph(name, tuple(inputs), tuple(params), tuple(nodes), tuple(outputs), train, weights or {})


def graphs_equal(a: Graph, b: Graph) -> bool:
    """Structural equality (names, ops, attrs, types, inits, outputs, training spec)."""
    return (a.name == b.name and a.inputs == b.inputs and a.params == b.params and a.nodes == b.nodes
            and a.outputs == b.outputs and a.train == b.train)
