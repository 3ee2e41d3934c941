"""``torch.compile(model, backend="nncompile")``: TorchDynamo hands each captured FX graph to
:func:`nncompile_backend`, which lowers it to IR (``from_fx``), compiles it to a native module and
returns a callable that runs it.

    model = torch.compile(net.eval(), backend="nncompile", dynamic=False)
    with torch.inference_mode():
        y = model(x)

The backend is registered under the name ``nncompile`` through the ``torch_dynamo_backends`` entry
point (installing the package is enough); ``register()`` does it by hand where the package is on the
path without being installed.

What it does with each graph:

- Dynamo lifts parameters and buffers to graph inputs, so the compiled module reads the current
  weights on every call (training them in torch between calls is seen).
- Shapes are static: each input shape gets its own module (the build cache makes a recompile of a
  known graph cheap). Graphs with symbolic sizes (Dynamo's automatic dynamic shapes) run eagerly;
  pass ``dynamic=False`` to ``torch.compile`` to compile every shape.
- The compiled module computes values, not autograd graphs: a call that needs gradients (grad mode on
  and an input that requires grad) runs the graph eagerly. Train with ``nnc.compile(module, example,
  train=True, ...)``, which compiles the backward pass and the optimizer too.
- A graph the IR cannot express (an unsupported op, a non-f32 kernel, ...) runs eagerly with one
  warning naming the reason; ``make_backend(strict=True)`` (or ``NNCOMPILE_STRICT=1``) raises instead.
"""
from __future__ import annotations

import os
import warnings

import torch

from nncompile.errors import NNError

__all__ = ["make_backend", "nncompile_backend"]

STRICT_ENV = "NNCOMPILE_STRICT"


class EagerFallbackWarning(UserWarning):
    """A graph (or a call) that the nncompile backend runs in eager PyTorch instead."""


def _flatten_outputs(gm) -> tuple[object, bool]:
    """The FX graph's output node argument and whether it is a tuple/list (Dynamo's usual form)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    return value, isinstance(value, (tuple, list))


def make_backend(*, strict: bool | None = None, threads: int | None = None, march: str = "x86-64-v3",
                 verbose: bool = False):
    """A Dynamo backend with options: ``torch.compile(m, backend=make_backend(strict=True))``."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        return _compile_graph(gm, example_inputs, strict=strict, threads=threads, march=march, verbose=verbose)

    backend.__name__ = "nncompile"
    return backend


def nncompile_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """The ``backend="nncompile"`` entry point (default options)."""
    return _compile_graph(gm, example_inputs, strict=None, threads=None, march="x86-64-v3", verbose=False)


def _eager(gm, reason: str, strict: bool):
    if strict:
        raise NNError(f"torch.compile(backend='nncompile'): {reason}")
    warnings.warn(f"nncompile backend: running this graph eagerly: {reason}", EagerFallbackWarning, stacklevel=3)
    return gm.forward


def _compile_graph(gm, example_inputs, *, strict, threads, march, verbose):
    import nncompile as nnc
    from nncompile.frontend.fx import from_fx

    strict = bool(int(os.environ.get(STRICT_ENV, "0") or 0)) if strict is None else strict
    if any(not isinstance(t, torch.Tensor) for t in example_inputs):
        kinds = sorted({type(t).__name__ for t in example_inputs if not isinstance(t, torch.Tensor)})
        return _eager(gm, f"the graph takes non-tensor inputs ({', '.join(kinds)}: symbolic sizes?); "
                          "nncompile compiles static shapes, pass dynamic=False to torch.compile", strict)
    if any(t.device.type != "cpu" for t in example_inputs):
        return _eager(gm, "inputs are not on the CPU (the CUDA target is separate: nnc.compile(..., target='cuda'))",
                      strict)
    out_value, as_sequence = _flatten_outputs(gm)
    try:
        with torch.no_grad():
            graph = from_fx(gm, tuple(t.detach() for t in example_inputs))
            model = nnc.compile(graph, threads=threads, march=march, verbose=verbose)
    except NNError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return _eager(gm, first, strict)
    count = len(out_value) if as_sequence else 1
    if len(model.output_names) != count:
        return _eager(gm, f"the graph returns {count} values, the compiled module {len(model.output_names)}", strict)
    warned = []

    def run(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if not warned:
                warned.append(True)
                warnings.warn("nncompile backend: a call that needs gradients runs eagerly (use torch.no_grad() "
                              "or torch.inference_mode() for the compiled module; nnc.compile(..., train=True) "
                              "compiles training)", EagerFallbackWarning, stacklevel=2)
            return gm.forward(*args)
        outs = model(*[a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return tuple(outs) if as_sequence else outs[0]

    run.compiled_model = model
    return run


def register() -> None:
    """Register ``backend="nncompile"`` with TorchDynamo (the entry point does this on install)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "nncompile" not in _COMPILER_FNS:
        register_backend(name="nncompile")(nncompile_backend)
