"""The ``fused`` op: a small straight-line program of other ops, run as one kernel.

The fuse pass groups an elementwise chain (optionally headed by a GEMM or conv) into one node whose
``body`` attribute lists the steps. Each step is ``(op, args, attrs)``: ``args`` name external inputs
``"x0", "x1", ...`` or earlier steps ``"t0", "t1", ...``; ``attrs`` is a tuple of ``(key, value)``
pairs. The last step is the result. Its semantics are exactly those of running the steps, so every
rule here is derived from the steps' own rules.

    body=(("linear", ("x0", "x1", "x2"), ()), ("relu", ("t0",), ()))
"""
from __future__ import annotations

from nncompile.errors import ShapeError
from nncompile.ops.base import REQUIRED, Cost, defop, get_op


def steps(body) -> list[tuple[str, tuple[str, ...], dict]]:
    return [(op, tuple(args), dict(attrs)) for op, args, attrs in body]


def _resolve(args, inputs, temps):
    found = []
    for ref in args:
        kind, index = ref[0], int(ref[1:])
        pool = inputs if kind == "x" else temps
        if kind not in "xt" or index >= len(pool):
            raise ShapeError(f"fused: bad step argument '{ref}'")
        found.append(pool[index])
    return found


def _run(body, inputs, rule: str):
    temps = []
    for op, args, attrs in steps(body):
        opdef = get_op(op)
        temps.append(opdef.rule(rule)(*opdef.split_inputs(_resolve(args, inputs, temps)), **attrs))
    if not temps:
        raise ShapeError("fused: empty body")
    return temps


def _infer(xs, body):
    return _run(body, list(xs), "infer")[-1]


def _ref(xs, body):
    return _run(body, list(xs), "ref")[-1]


def _cost(out, xs, body):
    types = _run(body, list(xs), "infer")
    flops = 0
    for (op, args, attrs), t in zip(steps(body), types):
        opdef = get_op(op)
        in_types = opdef.split_inputs(_resolve(args, list(xs), types))
        flops += opdef.rule("cost")(t, *in_types, **attrs).flops
    return Cost(flops, sum(x.nbytes for x in xs), out.nbytes)


defop("fused", inputs=("*xs",), attrs={"body": REQUIRED}, infer=_infer, ref=_ref, cost=_cost, family="fused",
      doc="A fused chain of ops (elementwise, optionally headed by a GEMM or conv); made by the fuse pass.")
