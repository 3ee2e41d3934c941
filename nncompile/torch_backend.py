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
- Unsupported torch ops stay in eager PyTorch and the regions between them are compiled (torch.fx's
  capability-based partitioner), with one warning naming the ops; a graph the IR cannot express for
  another reason (a non-f32 kernel, ...) runs eagerly with a warning naming the reason.
  ``make_backend(strict=True)`` (or ``NNCOMPILE_STRICT=1``) raises instead of falling back.
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


def _op_name(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    return _qualified(node.target)


def _qualified(target) -> str:
    from torch.fx.node import _get_qualified_name

    try:
        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001 - a name for a message only
        return getattr(target, "__name__", str(target))


def _supported(gm, node) -> bool:
    """Whether the FX frontend has a rule for this call (it may still reject its arguments)."""
    from nncompile.frontend.fx_modules import FX_MODULES
    from nncompile.frontend.fx_torch import FX_FUNCTIONS, FX_METHODS

    if node.op == "call_function":
        return node.target in FX_FUNCTIONS
    if node.op == "call_method":
        return node.target in FX_METHODS
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in FX_MODULES
    return False    # placeholders, get_attr, output: not partition members


def _compile_whole(gm, example_inputs, threads, march, verbose):
    """A callable running ``gm`` natively (raises NNError when the IR cannot express it)."""
    import nncompile as nnc
    from nncompile.frontend.fx import from_fx

    out_value, as_sequence = _flatten_outputs(gm)
    with torch.no_grad():
        graph = from_fx(gm, tuple(t.detach() for t in example_inputs))
        model = nnc.compile(graph, threads=threads, march=march, verbose=verbose)
    count = len(out_value) if as_sequence else 1
    if len(model.output_names) != count:
        raise NNError(f"the graph returns {count} values, the compiled module {len(model.output_names)}")
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


class _CompiledPart(torch.nn.Module):
    """A partition of a Dynamo graph, run by its compiled module."""

    def __init__(self, run, original):
        super().__init__()
        self.run, self.original = run, original

    def forward(self, *args):
        return self.run(*args)


def _partition_inputs(fused, example_inputs) -> dict[str, tuple]:
    """The example inputs each fused submodule sees, recorded by running the partitioned graph once."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if str(target).startswith("fused_"):
                seen[str(target)] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Recorder(fused).run(*example_inputs)
    return seen


def _compile_parts(gm, example_inputs, unsupported, threads, march, verbose):
    """Compile the supported regions of ``gm``; the unsupported nodes stay in eager PyTorch."""
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    class Support(OperatorSupportBase):
        def is_node_supported(self, submodules, node) -> bool:
            return _supported(gm, node)

    partitioner = CapabilityBasedPartitioner(gm, Support(), allows_single_node_partition=True)
    partitions = partitioner.propose_partitions()
    if not partitions:
        return gm.forward, 0
    fused = partitioner.fuse_partitions(partitions)
    inputs = _partition_inputs(fused, example_inputs)
    compiled = 0
    for name, args in inputs.items():
        sub = getattr(fused, name)
        if any(not isinstance(a, torch.Tensor) for a in args):
            continue
        try:
            run = _compile_whole(sub, list(args), threads, march, verbose)
        except NNError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"nncompile backend: part {name} runs eagerly: {first}", EagerFallbackWarning, stacklevel=4)
            continue
        setattr(fused, name, _CompiledPart(run, sub))
        compiled += 1
    fused.recompile()
    return fused.forward, compiled


def _compile_graph(gm, example_inputs, *, strict, threads, march, verbose):
    strict = bool(int(os.environ.get(STRICT_ENV, "0") or 0)) if strict is None else strict
    if any(not isinstance(t, torch.Tensor) for t in example_inputs):
        kinds = sorted({type(t).__name__ for t in example_inputs if not isinstance(t, torch.Tensor)})
        return _eager(gm, f"the graph takes non-tensor inputs ({', '.join(kinds)}: symbolic sizes?); "
                          "nncompile compiles static shapes, pass dynamic=False to torch.compile", strict)
    if any(t.device.type != "cpu" for t in example_inputs):
        return _eager(gm, "inputs are not on the CPU (the CUDA target is separate: nnc.compile(..., target='cuda'))",
                      strict)
    unsupported = [n for n in gm.graph.nodes if n.op.startswith("call_") and not _supported(gm, n)]
    if unsupported:
        names = ", ".join(sorted({_op_name(n) for n in unsupported}))
        if strict:
            raise NNError(f"torch.compile(backend='nncompile'): unsupported torch ops: {names}")
        forward, compiled = _compile_parts(gm, example_inputs, unsupported, threads, march, verbose)
        warnings.warn(f"nncompile backend: unsupported torch ops run eagerly: {names} "
                      f"({compiled} compiled part{'s' if compiled != 1 else ''} around them)",
                      EagerFallbackWarning, stacklevel=2)
        return forward
    try:
        return _compile_whole(gm, example_inputs, threads, march, verbose)
    except NNError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return _eager(gm, first, strict)


def register() -> None:
    """Register ``backend="nncompile"`` with TorchDynamo (the entry point does this on install)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "nncompile" not in _COMPILER_FNS:
        register_backend(name="nncompile")(nncompile_backend)
