"""nncompile: a compiler-style static graph optimizer for neural networks.

    import nncompile as nnc
    g = nnc.parse("examples/mlp.nn", set={"B": 64})      # .nn source -> IR Graph
    g = nnc.from_torch(module, (x,))                       # torch.export -> IR Graph
    m = nnc.compile(g)                                     # -> CompiledModel (native C++ module)
    y = m(x)
    m = nnc.load("build/")
"""
from __future__ import annotations

from nncompile.errors import NNError
from nncompile.ir import Graph, GraphBuilder, TensorType
from nncompile.runtime import CompiledModel, load

__all__ = ["CompiledModel", "Graph", "GraphBuilder", "NNError", "TensorType", "compile", "from_fx", "from_torch",
           "load", "parse", "parse_text"]
__version__ = "0.1.0"


def parse(path, set=None) -> Graph:
    """Parse and type-check a ``.nn`` file; ``set`` binds named dimensions (``{"B": 64}``)."""
    from nncompile.frontend.dsl import parse as _parse

    return _parse(path, set=set)


def parse_text(text: str, filename: str = "<string>", set=None) -> Graph:
    from nncompile.frontend.dsl import parse_text as _parse_text

    return _parse_text(text, filename=filename, set=set)


def from_torch(module, example_inputs) -> Graph:
    """Capture a torch module with torch.export (ATen ops) into an IR graph with its weights."""
    from nncompile.frontend.fx import from_torch as _from_torch

    return _from_torch(module, example_inputs)


def from_fx(graph_module, example_inputs) -> Graph:
    """Convert a torch.fx GraphModule (e.g. from symbolic_trace) into an IR graph."""
    from nncompile.frontend.fx import from_fx as _from_fx

    return _from_fx(graph_module, example_inputs)


def compile(model, example_inputs=None, train: bool = False, loss=None, optimizer=None, target: str = "cpu",
            memory_budget=None, out_dir=None, *, weights=None, threads=None, march: str = "x86-64-v3",
            verbose: bool = False, recompute: str = "fast") -> CompiledModel:
    """Compile a Graph (or a torch module, with ``example_inputs``) into a native CompiledModel.

    ``train=True`` also compiles the training step (``m.train_step(x, labels)``): the loss is the
    graph's training section, or ``loss="cross_entropy"`` (class indices) / ``"mse"`` applied to the
    model's single output; ``optimizer=("sgd" | "adam" | "adamw", {hyper-parameters})``.
    ``memory_budget`` (with ``train=True``): the training step's arena must fit it — bytes, or a
    fraction of the no-recompute arena (``"60%"``, ``0.6``, ``"8MB"``); forward values are recomputed
    in the backward pass to fit (``recompute="fast" | "exact"``, or the baselines ``"every_layer"`` /
    ``"sqrt_n"``); an infeasible budget raises ``MemoryBudgetError`` with the smallest feasible one.
    """
    from nncompile.codegen.build import BuildOptions
    from nncompile.driver import CompileOptions, compile_graph
    from nncompile.errors import InputError

    if not isinstance(model, Graph):
        if example_inputs is None:
            raise InputError("compiling a torch module needs example_inputs")
        model = from_torch(model, tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,))
    if (memory_budget is not None or recompute != "fast") and not train:
        raise InputError("memory_budget= and recompute= apply to the training step: they need train=True")
    train_options = None
    if train:
        from nncompile.autodiff import with_loss
        from nncompile.driver import TrainOptions

        if isinstance(loss, str) and loss in ("cross_entropy", "mse"):
            model = with_loss(model, loss)
            loss = None
        if optimizer is None and model.train is None:
            optimizer = ("sgd", {"lr": 0.01})
        train_options = TrainOptions.from_graph(model, optimizer, loss)
    elif loss is not None or optimizer is not None:
        raise InputError("loss= and optimizer= need train=True")
    options = CompileOptions(target=target, build=BuildOptions(march=march), threads=threads, verbose=verbose,
                             memory_budget=memory_budget, recompute=recompute)
    return compile_graph(model, options, weights=weights, out_dir=out_dir, train=train_options)
