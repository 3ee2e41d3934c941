"""Schedules of a recomputation plan and the simulator that judges them.

A schedule is the ordered list of steps a plan executes: ``("compute", v)`` runs op ``v`` (all of
its inputs must be resident; its output, ``mem[v]`` bytes, becomes resident) and ``("free", v)``
releases ``v``'s resident output.  An op may be computed again after it was freed.  The peak is the
largest total of resident outputs right after any compute step, so the inputs and the output of
the running op always count (Checkmate's accounting).

Solvers only choose the *compute sequence*; ``schedule_from_sequence`` then frees every output as
early as possible (right after its last use before it is computed again, or right after it is
computed when nothing uses that copy), which is the least memory any free placement can reach for
that sequence.  ``simulate`` checks any schedule independently of how it was made.

Example::

    steps = plain_schedule(g)                  # each op once, in order, free after last use
    result = simulate(g, steps)                # result.peak is peak_0, result.valid is True
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nncompile.solvers.remat_graph import RematGraph

Step = tuple[str, int]


@dataclass(frozen=True)
class SimResult:
    """What running a schedule costs: peak bytes, total compute and whether it was valid."""

    peak: int
    compute: float
    valid: bool
    errors: tuple[str, ...] = ()
    computes: int = 0
    peak_step: int = -1
    recomputed: tuple[int, ...] = field(default=())


def simulate(graph: RematGraph, steps: list[Step]) -> SimResult:
    """Run ``steps`` and report peak, compute and validity (every input resident, every op run)."""
    resident = [False] * graph.n
    times = [0] * graph.n
    live = 0
    peak = 0
    peak_step = -1
    compute = 0.0
    errors: list[str] = []
    for index, step in enumerate(steps):
        try:
            kind, v = step
            v = int(v)
        except (TypeError, ValueError):
            errors.append(f"step {index}: not an (op, node) pair: {step!r}")
            continue
        if not 0 <= v < graph.n:
            errors.append(f"step {index}: node {v} does not exist")
            continue
        if kind == "compute":
            missing = [u for u in graph.preds[v] if not resident[u]]
            if missing:
                errors.append(f"step {index}: compute {v} needs {missing} resident")
            if resident[v]:
                errors.append(f"step {index}: compute {v} while its output is still resident")
            else:
                resident[v] = True
                live += graph.mem[v]
            times[v] += 1
            compute += graph.cost[v]
            if live > peak:
                peak, peak_step = live, index
        elif kind == "free":
            if not resident[v]:
                errors.append(f"step {index}: free {v} which is not resident")
            else:
                resident[v] = False
                live -= graph.mem[v]
        else:
            errors.append(f"step {index}: unknown op {kind!r}")
    never = [v for v in range(graph.n) if times[v] == 0]
    if never:
        errors.append(f"nodes never computed: {never[:10]}{' ...' if len(never) > 10 else ''}")
    return SimResult(
        peak=peak,
        compute=compute,
        valid=not errors,
        errors=tuple(errors[:20]),
        computes=sum(times),
        peak_step=peak_step,
        recomputed=tuple(v for v in range(graph.n) if times[v] > 1),
    )


def plain_sequence(graph: RematGraph) -> list[int]:
    """Each op once, in the graph's topological order."""
    return list(range(graph.n))


def plain_schedule(graph: RematGraph) -> list[Step]:
    """The no-recompute baseline: each op once in order, each output freed after its last use."""
    return schedule_from_sequence(graph, plain_sequence(graph))


def plain_peak(graph: RematGraph) -> int:
    """peak_0: the peak of the plain schedule; budget fractions are relative to it."""
    return sequence_profile(graph, plain_sequence(graph)).peak


@dataclass(frozen=True)
class Profile:
    """Lifetimes of every output copy of a compute sequence (positions in the sequence)."""

    starts: list[int]        # position of the compute step that made copy c
    ends: list[int]          # position of the last compute step that needs copy c (>= start)
    nodes: list[int]         # which op copy c belongs to
    peak: int
    compute: float

    def live_bytes(self, mem) -> list[int]:
        """Resident bytes right after each compute step."""
        delta = [0] * (len(self.starts) + 1)
        for c, v in enumerate(self.nodes):
            delta[self.starts[c]] += mem[v]
            delta[self.ends[c] + 1] -= mem[v]
        total, out = 0, []
        for d in delta[:-1]:
            total += d
            out.append(total)
        return out


def sequence_profile(graph: RematGraph, sequence: list[int]) -> Profile:
    """Lifetimes, peak and compute of a compute sequence with the earliest frees.

    Raises ``ValueError`` if an op runs before one of its inputs was ever computed.
    """
    current = [-1] * graph.n            # copy index of each op's latest computation
    starts: list[int] = []
    ends: list[int] = []
    nodes: list[int] = []
    mem = graph.mem
    compute = 0.0
    for pos, v in enumerate(sequence):
        for u in graph.preds[v]:
            c = current[u]
            if c < 0:
                raise ValueError(f"op {v} at position {pos} runs before its input {u} was computed")
            ends[c] = pos
        current[v] = len(starts)
        starts.append(pos)
        ends.append(pos)
        nodes.append(v)
        compute += graph.cost[v]
    length = len(sequence)
    delta = [0] * (length + 1)
    for c, v in enumerate(nodes):
        delta[starts[c]] += mem[v]
        delta[ends[c] + 1] -= mem[v]
    peak = total = 0
    for d in delta[:-1]:
        total += d
        if total > peak:
            peak = total
    return Profile(starts, ends, nodes, peak, compute)


def schedule_from_sequence(graph: RematGraph, sequence: list[int]) -> list[Step]:
    """Compute steps of ``sequence`` with each output freed as early as possible."""
    profile = sequence_profile(graph, sequence)
    frees_after: list[list[int]] = [[] for _ in sequence]
    for c, v in enumerate(profile.nodes):
        frees_after[profile.ends[c]].append(v)
    steps: list[Step] = []
    for pos, v in enumerate(sequence):
        steps.append(("compute", v))
        for u in sorted(frees_after[pos]):
            steps.append(("free", u))
    return steps


def buffer_lifetimes(graph: RematGraph, sequence: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, size) of every output copy, with [start, end) in compute-step positions.

    The largest total size live at one position equals the simulated peak, so this is the trace
    a memory planner packs into one arena.
    """
    profile = sequence_profile(graph, sequence)
    return [(profile.starts[c], profile.ends[c] + 1, graph.mem[v]) for c, v in enumerate(profile.nodes)]


def copy_inputs(graph: RematGraph, sequence: list[int]) -> list[tuple[int, tuple[int, ...]]]:
    """For each compute step: (op, positions of the steps whose outputs it reads, in input order).

    This is what applying a plan to an IR needs: one node per compute step, a recomputed op being
    a duplicate whose consumers read the copy made at the given position.
    """
    latest = [-1] * graph.n
    wiring = []
    for pos, v in enumerate(sequence):
        sources = tuple(latest[u] for u in graph.preds[v])
        if any(src < 0 for src in sources):
            raise ValueError(f"op {v} at position {pos} runs before one of its inputs was computed")
        wiring.append((v, sources))
        latest[v] = pos
    return wiring


def schedule_to_json(graph: RematGraph, steps: list[Step]) -> list[dict]:
    """SCHEDULE.json content: ``[{"op": "compute", "node": ID, "name": ...}, ...]``, file ids."""
    return [{"op": kind, "node": graph.source_id(v), "name": graph.names[v]} for kind, v in steps]
