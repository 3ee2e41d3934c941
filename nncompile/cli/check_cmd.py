"""``nncompile check MODEL.nn [--set NAME=VALUE ...] [--inference] [--print-ir] [--json]``: type-check a model.

Prints one row per node (name, op, output type, parameters it reads, FLOPs from the op's cost
rule) and the totals: parameters, parameter bytes, FLOPs, activation bytes (every node output
kept, no reuse), inputs and outputs. ``--json`` puts the totals on the last line::

    nncompile check examples/mlp.nn --set B=128 --json
"""
from __future__ import annotations

from nncompile.cli.common import print_json
from nncompile.errors import InputError, MissingRuleError
from nncompile.frontend.dsl import parse
from nncompile.ir.builder import prune
from nncompile.ir.graph import Graph
from nncompile.ir.text import print_graph
from nncompile.ops.base import get_op


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .nn file")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="bind or override a named dimension (repeatable), e.g. --set B=64")
    parser.add_argument("--inference", action="store_true",
                        help="leave out the training section's nodes (loss) and label inputs")
    parser.add_argument("--print-ir", action="store_true", help="print the graph's IR text before the table")
    parser.add_argument("--json", action="store_true", help="print the totals as one JSON object on the last line")


def parse_settings(items: list[str]) -> dict[str, int]:
    """``["B=64", "T=128"]`` -> ``{"B": 64, "T": 128}``; a malformed item is an InputError."""
    settings: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise InputError(f"--set expects NAME=VALUE, got '{item}'")
        try:
            settings[name] = int(value.strip())
        except ValueError:
            raise InputError(f"--set {name}: expected an integer, got '{value.strip()}'") from None
    return settings


def node_figures(graph: Graph) -> list[dict]:
    """Per node: name, op, type, parameter elements read, FLOPs (None when the op has no cost rule)."""
    param_sizes = {p.name: p.type.numel for p in graph.params}
    rows = []
    for node in graph.nodes:
        opdef = get_op(node.op)
        in_types = [graph.type_of(name) for name in node.inputs]
        try:
            cost = opdef.rule("cost")(node.type, *opdef.split_inputs(in_types), **node.attrs)
            flops = int(cost.flops)
        except MissingRuleError:
            flops = None
        rows.append({"node": node.name, "op": node.op, "type": str(node.type.dense()),
                     "params": sum(param_sizes.get(name, 0) for name in node.inputs), "flops": flops,
                     "bytes": node.type.nbytes})
    return rows


def totals(graph: Graph, rows: list[dict]) -> dict:
    return {
        "model": graph.name,
        "nodes": len(graph.nodes),
        "params": graph.num_params(),
        "trainable_params": graph.num_params(trainable_only=True),
        "param_bytes": sum(p.type.nbytes for p in graph.params),
        "nonzero_params": sum(nonzero_count(p.type) for p in graph.params),
        "flops": sum(row["flops"] or 0 for row in rows),
        "activation_bytes": sum(row["bytes"] for row in rows),
        "inputs": {item.name: str(item.type) for item in graph.inputs},
        "outputs": {name: str(graph.type_of(name)) for name in graph.outputs},
        "missing_cost": sorted({row["op"] for row in rows if row["flops"] is None}),
        "train": None if graph.train is None else {"loss": graph.train.loss, "optimizer": graph.train.optimizer,
                                                    "labels": list(graph.train.label_inputs)},
    }


def nonzero_count(type_) -> int:
    """Entries a weight keeps under its sparsity pattern (all of them when it is dense)."""
    sparsity = type_.sparsity
    if sparsity is None:
        return type_.numel
    if sparsity.expected_density is not None and sparsity.kind != "unstructured":
        return round(type_.numel * sparsity.expected_density)
    return int(sparsity.mask(type_.shape).sum())


def human(count: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {suffix}{unit}"
    return f"{count:g} {unit}".rstrip()


def format_table(rows: list[dict]) -> str:
    header = ("node", "op", "output", "params", "FLOPs")
    cells = [header] + [(r["node"], r["op"], r["type"], f"{r['params']:,}" if r["params"] else "-",
                         "?" if r["flops"] is None else f"{r['flops']:,}") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        left = "  ".join(row[i].ljust(widths[i]) for i in range(3))
        right = "  ".join(row[i].rjust(widths[i]) for i in range(3, 5))
        lines.append(f"{left}  {right}".rstrip())
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def run(args) -> int:
    graph = parse(args.model, set=parse_settings(args.set))
    if args.inference and graph.train is not None:
        graph = prune(graph)
    rows = node_figures(graph)
    figures = totals(graph, rows)
    if args.print_ir:
        print(print_graph(graph))
    print(f"model {graph.name}: {args.model}")
    print(format_table(rows))
    print()
    print(f"inputs       {', '.join(f'{k}: {v}' for k, v in figures['inputs'].items())}")
    print(f"outputs      {', '.join(f'{k}: {v}' for k, v in figures['outputs'].items())}")
    print(f"parameters   {figures['params']:,} ({human(figures['params'])}; "
          f"{figures['trainable_params']:,} trainable), {human(figures['param_bytes'], 'B')}")
    if figures["nonzero_params"] != figures["params"]:
        print(f"nonzero      {figures['nonzero_params']:,} parameters under the declared sparsity patterns "
              f"({figures['nonzero_params'] / max(figures['params'], 1):.1%})")
    print(f"FLOPs        {figures['flops']:,} ({human(figures['flops'])}) per forward pass"
          + (f"; no cost rule for: {', '.join(figures['missing_cost'])}" if figures["missing_cost"] else ""))
    print(f"activations  {human(figures['activation_bytes'], 'B')} (all node outputs, no reuse)")
    if graph.train is not None:
        t = graph.train
        hyper = ", ".join(f"{k}={v}" for k, v in t.hyper.items())
        print(f"training     loss {t.loss}, labels {', '.join(t.label_inputs) or '-'}, optimizer {t.optimizer}({hyper})")
    if args.json:
        print_json(figures)
    return 0
