"""The ``nncompile`` command.

``nncompile MODEL.nn -o build/ ...`` compiles a model; the other forms are subcommands::

    nncompile check MODEL.nn [--json]
    nncompile memplan TRACE.csv [--capacity N] [--time-limit S] [-o OFFSETS.csv] [--json]
    nncompile remat GRAPH.json --budget FRACTION|BYTES [--exact] [--time-limit S] [-o SCHEDULE.json] [--json]
    nncompile parallel (MODEL.nn | --profile DIR) --cluster CLUSTER.json [-o PLAN.json] [--json]

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Any ``NNError`` ends the command with its located message and exit status 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nncompile.errors import NNError

SUBCOMMANDS = {
    "check": "parse and type-check a model; print shapes, parameters, FLOPs and memory",
    "memplan": "plan offsets for a buffer trace (MiniMalloc CSV format)",
    "remat": "choose what to recompute in a training graph under a memory budget",
    "parallel": "search a hybrid-parallel plan (DP/ZeRO/TP/PP/checkpointing) for a cluster",
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and a one-line message, as every other bad input does."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _load(name: str):
    return importlib.import_module(f"nncompile.cli.{name}_cmd")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        parser = _Parser(prog=f"nncompile {name}", description=SUBCOMMANDS[name])
        _load(name).add_arguments(parser)
        parser.set_defaults(_module=name)
        return parser
    parser = _Parser(
        prog="nncompile",
        description="Compile a .nn model to a native module. Subcommands: "
        + ", ".join(f"{k} ({v})" for k, v in SUBCOMMANDS.items()),
    )
    _load("compile").add_arguments(parser)
    parser.set_defaults(_module="compile")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv[1:] if argv and argv[0] in SUBCOMMANDS else argv)
    try:
        return int(_load(args._module).run(args) or 0)
    except NNError as err:
        print(err.format(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nncompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
