"""Torch frontends: a torch module -> IR ``Graph`` with the module's weights.

    g = from_torch(model.eval(), (x,))            # torch.export: ATen ops (fx_aten.py)
    g = from_fx(torch.fx.symbolic_trace(model), (x,))   # torch.fx: torch functions/methods/modules (fx_torch.py)
    outs = nncompile.ir.run(g, {"x": x.numpy()})   # the weights travel in g.weights
    state_dict_names(g)                            # {"v0.weight": "0.weight", ...}
    model.load_state_dict(to_state_dict(g, new_weights), strict=False)   # weights back into torch

Graph inputs are named after the forward's placeholders; parameters and buffers become IR
parameters under their state_dict names (cleaned with ``clean_name``; ``0.weight`` -> ``v0.weight``)
with their values (``Init("given", {"torch_name": ...})``); buffers are not trainable. Constants
(``torch.ones(...)`` in forward, lifted tensors) become non-trainable given parameters. Every tensor
output of forward becomes a graph output. A node the IR cannot express raises ``UnsupportedError``
naming the op and located at the user's source line (the last frame of the node's stack trace
outside torch); for symbolic traces, ``trace()`` records those stack traces.

Also: a tied weight (one Parameter under two names) is one IR parameter; ops whose tensor inputs
are all known at import time (constants, buffers such as a causal mask) are evaluated by torch and
become constants (random ops never are); in-place ops (``x.add_(y)``, ``x += y``, ``inplace=True``)
rebind ``x`` to their result; dropout lowers to identity in eval mode and to the seeded IR dropout
in training mode; batch norm follows the module's mode.
"""
from __future__ import annotations

import inspect
import operator
import re
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import _get_qualified_name, map_aggregate

from nncompile.errors import InputError, NNError, UnsupportedError
from nncompile.frontend.fx_aten import ATEN
from nncompile.frontend.fx_lower import (Lowering, Missing, Value, exception_frame, innermost_frame,
                                         state_dict_names, to_state_dict, user_frame)
from nncompile.frontend.fx_modules import FX_MODULES, call_module_rule
from nncompile.frontend.fx_torch import FX_FUNCTIONS, FX_METHODS
from nncompile.ir.graph import Graph

__all__ = ["from_fx", "from_torch", "state_dict_names", "to_state_dict", "trace"]

# random torch functions: folding them would freeze one sample into the graph
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
           "multinomial", "normal", "poisson"}


def _example_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _first_lines(err: Exception, count: int = 4) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return "\n".join(lines[:count]) or type(err).__name__


# torch.export -----------------------------------------------------------------------------------

def from_torch(module: nn.Module, example_inputs, *, decompose: bool = False, sparsity=None) -> Graph:
    """Capture ``module`` with ``torch.export.export`` and lower its ATen graph to IR.

    ``decompose=True`` lowers the core-ATen graph of ``run_decompositions()`` instead (more, smaller
    ops: addmm, bmm, _softmax, native_layer_norm, ...). The module's train/eval mode is respected
    (call ``.eval()`` for inference: dropout off, batch norm on running statistics).
    Weights pruned with ``torch.nn.utils.prune`` keep their mask as a fixed sparsity pattern;
    ``sparsity="auto"`` also gives one to weights that are mostly exact zeros (``fx_sparse.py``).
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    from nncompile.frontend.fx_sparse import apply_sparsity, pruned_copy

    module, masks = pruned_copy(module)
    if masks or sparsity is not None:
        return apply_sparsity(from_torch(module, example_inputs, decompose=decompose), sparsity, masks)
    args = _example_tuple(example_inputs)
    try:
        with warnings.catch_warnings():  # torch-internal deprecation chatter while exporting
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(module, args)
        if decompose:
            # keep ops whole that are one IR op but decompose into comparisons/gathers the IR lacks
            table = torch.export.default_decompositions()
            for op in (torch.ops.aten._safe_softmax.default, torch.ops.aten.cross_entropy_loss.default,
                       torch.ops.aten.logsumexp.default):
                table.pop(op, None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                program = program.run_decompositions(table)
    except Exception as err:
        raise UnsupportedError(f"torch.export could not capture {type(module).__name__}: {_first_lines(err)}",
                               exception_frame(err)) from err
    return _lower_exported(program, type(module).__name__)


def _lower_exported(program, name: str) -> Graph:
    from torch.export.graph_signature import InputKind, OutputKind

    low = Lowering(name)
    sig = program.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
    env: dict[fx.Node, object] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            if spec is not None and spec.kind == InputKind.PARAMETER:
                tensor = program.state_dict[spec.target]
                env[node] = low.state_param(spec.target, tensor, trainable=tensor.requires_grad)
            elif spec is not None and spec.kind == InputKind.BUFFER:
                tensor = program.state_dict.get(spec.target)
                if tensor is None:
                    tensor = program.constants[spec.target]
                env[node] = low.state_param(spec.target, tensor, trainable=False)
            elif spec is not None and spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                value = program.constants[spec.target]
                if not isinstance(value, torch.Tensor):
                    raise UnsupportedError(f"constant '{spec.target}' of type {type(value).__name__} is not supported")
                env[node] = low.constant(value, base=spec.target)
            else:
                example = node.meta.get("val")
                env[node] = low.input(node.name, example) if isinstance(example, torch.Tensor) else example
        elif node.op == "call_function":
            env[node] = _lower_aten_node(low, node, env)
        elif node.op == "output":
            results = list(node.args[0])
            user = [i for i, spec in enumerate(sig.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
            outputs = [env[results[i]] if isinstance(results[i], fx.Node) else results[i] for i in user]
            return low.finish(outputs)
        else:
            raise UnsupportedError(f"unexpected {node.op} node '{node.name}' in the exported graph")
    raise UnsupportedError("the exported graph has no output")


def _aten_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return _get_qualified_name(target) if callable(target) else str(target)


def _bind_schema(target, args: tuple, kwargs: dict) -> dict:
    """ATen arguments by schema name, defaults filled."""
    bound = {}
    position = 0
    for arg in target._schema.arguments:
        if not arg.kwarg_only and position < len(args):
            bound[arg.name] = args[position]
            position += 1
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _lower_aten_node(low: Lowering, node: fx.Node, env: dict):
    name = _aten_name(node.target)
    short = name.split(".")[1] if name.startswith("aten.") else name.rsplit(".", 1)[-1]
    _locate(low, node, short)
    args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, fx.Node) else a)
    kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, fx.Node) else a)
    if node.target is operator.getitem:
        return _getitem_tuple(low, args[0], args[1])
    rule = ATEN.get(name)
    inplace = short.endswith("_") and isinstance(node.target, torch._ops.OpOverload)
    if rule is None and inplace:  # x.op_(...): the out-of-place rule, and x names the result from now on
        rule = ATEN.get(f"aten.{short[:-1]}.{node.target._overloadname}")
    if rule is not None and inplace:
        result = _call_rule(low, rule, name, lambda: rule(low, **_bind_schema(node.target, args, kwargs)))
        if isinstance(node.args[0], fx.Node):
            env[node.args[0]] = result
        return result
    if isinstance(node.target, torch._ops.OpOverload) and (rule is None or _all_known(low, args, kwargs)):
        folded = _fold(low, node.target, args, kwargs, short, has_rule=rule is not None)
        if folded is not _NOT_FOLDED:
            return folded
    if rule is None:
        raise UnsupportedError(f"unsupported torch op {name} (node '{node.name}')", low.loc,
                               notes=(_coverage_note("ATen"),) + low.notes())
    return _call_rule(low, rule, name, lambda: rule(low, **_bind_schema(node.target, args, kwargs)))


def _getitem_tuple(low: Lowering, container, index):
    if isinstance(container, Value):
        from nncompile.frontend.fx_torch import index_tensor

        return index_tensor(low, container, index)
    return container[index]


_NOT_FOLDED = object()


def _all_known(low: Lowering, args, kwargs) -> bool:
    """True when every tensor argument's value is known at import time (constants, buffers)."""
    values = []
    map_aggregate((args, kwargs), lambda a: values.append(a) if isinstance(a, (Value, Missing)) else None)
    return all(isinstance(v, Value) and v.name in low.known for v in values)


def _fold(low: Lowering, target: Callable, args, kwargs, short: str, has_rule: bool = False):
    """Evaluate a call whose tensor inputs are all known at import time; its result is a constant.

    Random ops are never folded (that would freeze one sample): with a rule (dropout) they lower
    normally, without one they are an error."""
    if not _all_known(low, args, kwargs):
        return _NOT_FOLDED
    if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()) or short in _RANDOM:
        if has_rule:
            return _NOT_FOLDED
        raise low.unsupported(f"random op {short} in forward is not supported")
    real_args, real_kwargs = map_aggregate((args, kwargs), lambda a: low.known[a.name] if isinstance(a, Value) else a)
    try:
        result = target(*real_args, **real_kwargs)
    except Exception:
        return _NOT_FOLDED
    return map_aggregate(result, lambda r: low.constant(r, base=short) if isinstance(r, torch.Tensor) else r)


def _call_rule(low: Lowering, rule: Callable, name: str, call: Callable):
    try:
        return call()
    except NNError as err:
        if err.loc is None and low.loc is None:
            err.notes = tuple(err.notes) + tuple(n for n in low.notes() if n not in err.notes)
        raise err.with_loc(low.loc)
    except Exception as err:  # arguments the rule does not understand: say which op, where
        raise UnsupportedError(f"{name}: cannot convert this call ({type(err).__name__}: {err})", low.loc,
                               notes=low.notes()) from err


def _locate(low: Lowering, node: fx.Node, op_text: str) -> None:
    low.node_name = node.name
    low.op_text = op_text
    low.loc = user_frame(node.meta.get("stack_trace"), op_text)
    low.torch_frame = innermost_frame(node.meta.get("stack_trace"))


def _coverage_note(kind: str) -> str:
    return f"see nncompile/frontend/fx_{'aten' if kind == 'ATen' else 'torch'}.py for the supported {kind} ops"


# torch.fx ---------------------------------------------------------------------------------------

# modules whose forward does not trace symbolically (shape checks, fast paths): lowered whole
_WHOLE_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


class _Tracer(fx.Tracer):
    """symbolic_trace with stack traces, keeping the ``_WHOLE_MODULES`` as leaf modules."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # buffers as get_attr nodes (a causal mask sliced by x.size(1))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _WHOLE_MODULES) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, num_inputs: int | None = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that records stack traces (for located errors), keeps
    attention and transformer layers whole (they do not trace symbolically), and fixes forward arguments past the first ``num_inputs``
    to their defaults (so ``mask=None`` branches trace)."""
    if isinstance(module, _WHOLE_MODULES):
        raise UnsupportedError(f"{type(module).__name__} does not trace symbolically; pass the module itself to "
                               "from_fx, or trace a module that contains it")
    concrete = None
    if num_inputs is not None:
        params = list(inspect.signature(module.forward).parameters.values())[num_inputs:]
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        graph = _Tracer().trace(module, concrete_args=concrete)
    except Exception as err:
        raise UnsupportedError(f"torch.fx could not trace {type(module).__name__}: {_first_lines(err)}",
                               exception_frame(err)) from err
    return fx.GraphModule(module, graph, type(module).__name__)


def from_fx(graph_module: nn.Module, example_inputs) -> Graph:
    """Lower a torch.fx ``GraphModule`` (e.g. from ``symbolic_trace``) to IR.

    A plain ``nn.Module`` is traced first with ``trace()``. Shapes come from ``example_inputs``;
    ``x.size()``/``x.shape`` are known at import time, so shape arithmetic folds away.
    """
    args = _example_tuple(example_inputs)
    if not isinstance(graph_module, fx.GraphModule):
        if not isinstance(graph_module, nn.Module):
            raise InputError(f"from_fx needs a torch.fx.GraphModule or nn.Module, got {type(graph_module).__name__}")
        if isinstance(graph_module, _WHOLE_MODULES):
            return _lower_whole_module(graph_module, args)
        original = graph_module
        graph_module = trace(graph_module, len(args))
    else:
        original = graph_module
    low = Lowering(type(graph_module).__name__)
    # state comes from the module the user gave (a GraphModule turns plain tensor attributes into buffers)
    params = dict(original.named_parameters())
    buffers = dict(original.named_buffers())
    env: dict[fx.Node, object] = {}
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise InputError(f"{len(args)} example inputs given, the traced forward takes {len(placeholders)}")
    position = 0
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if position < len(args):
                example = args[position]
                # the forward's argument name (node.name may be renamed, e.g. input -> input_1)
                name = str(node.target).lstrip("*")
                env[node] = low.input(name, example) if isinstance(example, torch.Tensor) else example
            elif node.args:
                env[node] = node.args[0]
            else:
                raise InputError(f"no example input for forward argument '{node.target}'")
            position += 1
        elif node.op == "get_attr":
            env[node] = _lower_get_attr(low, graph_module, node, params, buffers)
        elif node.op in ("call_function", "call_method", "call_module"):
            env[node] = _lower_fx_call(low, graph_module, node, env)
        elif node.op == "output":
            outputs = []
            map_aggregate(node.args[0], lambda a: outputs.append(env[a] if isinstance(a, fx.Node) else a))
            return low.finish(outputs)
    raise UnsupportedError("the traced graph has no output")


def _lower_whole_module(module: nn.Module, args: tuple) -> Graph:
    """A module that is lowered by its rule (no trace): inputs named after its forward's arguments."""
    low = Lowering(type(module).__name__)
    names = list(inspect.signature(module.forward).parameters)
    if len(args) > len(names):
        raise InputError(f"{len(args)} example inputs given, {type(module).__name__}.forward takes {len(names)}")
    values = [low.input(name, a) if isinstance(a, torch.Tensor) else a for name, a in zip(names, args)]
    low.op_text = type(module).__name__
    result = _call_rule(low, lambda: None, low.op_text, lambda: call_module_rule(low, module, "", *values))
    outputs = list(result) if isinstance(result, tuple) else [result]
    return low.finish([o for o in outputs if o is not None])


# tensors that torch.fx made while tracing (e.g. ``torch.ones(3)`` in forward): constants, not state
_FX_CONSTANT = re.compile(r"^_tensor_constant\d+$")


def _lower_get_attr(low: Lowering, root: nn.Module, node: fx.Node, params: dict, buffers: dict):
    _locate(low, node, node.target)
    if node.target in params:
        tensor = params[node.target]
        return low.state_param(node.target, tensor, trainable=tensor.requires_grad)
    if node.target in buffers and not _FX_CONSTANT.match(node.target):
        return low.state_param(node.target, buffers[node.target], trainable=False)
    value = _attribute(root, node.target)
    return low.constant(value, base=node.target) if isinstance(value, torch.Tensor) else value


def _attribute(root: nn.Module, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _lower_fx_call(low: Lowering, root: nn.Module, node: fx.Node, env: dict):
    args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, fx.Node) else a)
    kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, fx.Node) else a)
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        kind = type(module).__name__
        _locate(low, node, kind)
        rule = next((r for t, r in FX_MODULES.items() if type(module) is t), None)
        if rule is None:
            raise UnsupportedError(f"unsupported torch module {type(module).__module__}.{kind} "
                                   f"(submodule '{node.target}')", low.loc,
                                   notes=(_trace_note(node),) + low.notes())
        return _call_rule(low, rule, kind, lambda: rule(low, module, node.target, *args, **kwargs))
    if node.op == "call_method":
        name = f"Tensor.{node.target}"
        _locate(low, node, node.target)
        rule = FX_METHODS.get(node.target)
        if isinstance(args[0], Value) and _all_known(low, args, kwargs):
            folded = _fold(low, lambda s, *a, **k: getattr(s, node.target)(*a, **k), args, kwargs,
                           node.target, has_rule=rule is not None)
            if folded is not _NOT_FOLDED:
                return folded
        if rule is None:
            if not isinstance(args[0], (Value, Missing)):
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            raise UnsupportedError(f"unsupported torch op {name} (node '{node.name}')", low.loc,
                                   notes=(_trace_note(node),) + low.notes())
        result = _call_rule(low, rule, name, lambda: rule(low, *args, **kwargs))
        if node.target.endswith("_") and not node.target.startswith("__") and isinstance(node.args[0], fx.Node):
            env[node.args[0]] = result  # x.add_(y): later uses of x see the result
        return result
    name = _get_qualified_name(node.target)
    short = getattr(node.target, "__name__", name)
    _locate(low, node, short)
    rule = FX_FUNCTIONS.get(node.target)
    if rule is None or _all_known(low, args, kwargs):
        folded = _fold(low, node.target, args, kwargs, short, has_rule=rule is not None)
        if folded is not _NOT_FOLDED:
            return folded
    if rule is None:
        raise UnsupportedError(f"unsupported torch op {name} (node '{node.name}')", low.loc,
                               notes=(_trace_note(node),) + low.notes())
    result = _call_rule(low, rule, name, lambda: rule(low, *args, **kwargs))
    if node.args and isinstance(node.args[0], fx.Node) and (kwargs.get("inplace") is True
                                                            or node.target in _INPLACE_OPERATORS):
        env[node.args[0]] = result  # F.relu(x, inplace=True), x += y: later uses of x see the result
    return result


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _trace_note(node: fx.Node) -> str:
    if node.meta.get("stack_trace"):
        return _coverage_note("torch")
    return "trace with nncompile.frontend.fx.trace(module) to see the source line"
