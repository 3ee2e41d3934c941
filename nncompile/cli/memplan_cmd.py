"""``nncompile memplan TRACE.csv``: plan arena offsets for a buffer trace (MiniMalloc CSV format).

Input rows are ``id,lower,upper,size`` with lifetime ``[lower, upper)``; optional ``alignment``
(and ``offset``/``hint``, ignored on input) columns are accepted, as are the old ``begin``/``start``
and inclusive ``end`` headers. ``-o`` writes the same rows with an ``offset`` column. With
``--capacity`` the command answers whether the buffers fit: exit 0 when proven to fit, 1 otherwise.
``--json`` prints buffers, lower_bound, arena, ratio, status, seconds and method as the last line.
Bad input exits with status 2 and ``file:line: error: ...``.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from nncompile.cli.common import Progress, print_json
from nncompile.errors import InputError, SourceLoc
from nncompile.solvers.packing import METHODS, Problem, plan_problem

START_NAMES = ("lower", "begin", "start")
END_NAMES = ("upper", "end")


def add_arguments(parser) -> None:
    parser.add_argument("trace", help="CSV with columns id,lower,upper,size[,alignment]")
    parser.add_argument("--capacity", type=int, default=None, help="answer whether the buffers fit in N bytes")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds for the exact phase (default 10)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="planner (default auto)")
    parser.add_argument("--alignment", type=int, default=1,
                        help="minimum alignment of every offset (default 1: the trace's own alignment column)")
    parser.add_argument("-o", "--output", default=None, help="write the rows with an offset column here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")


class Trace:
    """A parsed trace: the original rows (for writing back) and the problem arrays."""

    def __init__(self, header: list[str], rows: list[list[str]], problem: Problem):
        self.header = header
        self.rows = rows
        self.problem = problem


def _error(path: str, line_no: int, line: str, message: str) -> InputError:
    return InputError(message, SourceLoc(path, line_no, 0, line))


def read_trace(path: str) -> Trace:
    """Parse a MiniMalloc-format CSV; every problem is reported as ``path:line``."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InputError(f"cannot read trace {path}: {err.strerror or err}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise _error(path, 1, lines[0] if lines else "", "empty trace: expected a header id,lower,upper,size")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    column = {name: i for i, name in enumerate(header)}

    def find(names):
        return next((column[n] for n in names if n in column), None)

    id_col, size_col = column.get("id"), column.get("size")
    start_col, end_col = find(START_NAMES), find(END_NAMES)
    inclusive_end = "upper" not in column and "end" in column
    missing = [name for name, col in (("id", id_col), ("lower", start_col), ("upper", end_col), ("size", size_col))
               if col is None]
    if missing:
        raise _error(path, 1, lines[0], f"missing column(s) {', '.join(missing)} in header "
                     f"(expected id,lower,upper,size)")
    align_col = column.get("alignment")
    gaps_col = column.get("gaps")
    rows, ids, seen = [], [], {}
    start, end, size, align = [], [], [], []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in next(csv.reader([line]))]
        if len(fields) < len(header):
            raise _error(path, line_no, line, f"expected {len(header)} fields, found {len(fields)}")

        def integer(col, name):
            try:
                return int(fields[col])
            except ValueError:
                raise _error(path, line_no, line, f"{name} must be an integer, got {fields[col]!r}") from None

        if gaps_col is not None and fields[gaps_col]:
            raise _error(path, line_no, line, "buffers with gaps are not supported")
        buffer_id = fields[id_col]
        if buffer_id in seen:
            raise _error(path, line_no, line, f"duplicate id {buffer_id!r} (first on line {seen[buffer_id]})")
        seen[buffer_id] = line_no
        lo, hi, sz = integer(start_col, header[start_col]), integer(end_col, header[end_col]), integer(size_col, "size")
        if inclusive_end:
            hi += 1
        al = integer(align_col, "alignment") if align_col is not None and fields[align_col] else 1
        if sz < 0:
            raise _error(path, line_no, line, f"size must be >= 0, got {sz}")
        if hi <= lo:
            raise _error(path, line_no, line, f"empty lifetime: upper ({hi}) must be greater than lower ({lo})")
        if al < 1:
            raise _error(path, line_no, line, f"alignment must be >= 1, got {al}")
        rows.append(fields)
        ids.append(buffer_id)
        start.append(lo)
        end.append(hi)
        size.append(sz)
        align.append(al)
    problem = Problem(ids, np.array(start, np.int64), np.array(end, np.int64), np.array(size, np.int64),
                      np.array(align, np.int64))
    return Trace([h for h in next(csv.reader([lines[0]]))], rows, problem)


def write_offsets(path: str, trace: Trace, offsets: dict) -> None:
    header = [h.strip() for h in trace.header]
    keep = [i for i, h in enumerate(header) if h.lower() != "offset"]
    with open(path, "w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([header[i] for i in keep] + ["offset"])
        for fields, buffer_id in zip(trace.rows, trace.problem.ids):
            writer.writerow([fields[i] for i in keep] + [offsets[buffer_id]])


def run(args) -> int:
    if args.capacity is not None and args.capacity < 0:
        raise InputError(f"--capacity must be >= 0, got {args.capacity}")
    if args.alignment < 1:
        raise InputError(f"--alignment must be >= 1, got {args.alignment}")
    started = time.perf_counter()
    trace = read_trace(args.trace)
    problem = trace.problem
    problem.align = np.maximum(problem.align, args.alignment)
    progress = Progress("memplan")
    placement = plan_problem(problem, method=args.method, capacity=args.capacity, time_limit=args.time_limit,
                             progress=progress.update)
    progress.done(placement.status)
    seconds = time.perf_counter() - started
    fits = None
    if args.capacity is not None:
        fits = placement.status == "optimal" and placement.arena <= args.capacity
    if args.output and (fits is None or fits):
        write_offsets(args.output, trace, placement.offsets)
    print(f"{args.trace}: {problem.n} buffers, lower bound {placement.lower_bound}, "
          f"arena {placement.arena} ({placement.ratio:.4f}x bound), {placement.status} by {placement.method} "
          f"in {seconds:.2f}s")
    if args.capacity is not None:
        verdict = {True: "fits", False: "does not fit" if placement.status == "infeasible" else "not proven to fit"}
        print(f"capacity {args.capacity}: {verdict[fits]}")
    if args.json:
        figures = {"buffers": problem.n, "lower_bound": placement.lower_bound, "arena": placement.arena,
                   "ratio": round(placement.ratio, 6), "status": placement.status, "seconds": round(seconds, 4),
                   "method": placement.method, "gap": round(placement.gap, 6)}
        if args.capacity is not None:
            figures["capacity"] = args.capacity
            figures["fits"] = fits
        print_json(figures)
    return 0 if fits is None or fits else 1
