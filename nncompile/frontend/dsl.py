"""The `.nn` frontend: source text -> IR ``Graph``.

    g = parse("examples/mlp.nn", set={"B": 32})      # a file; --set overrides dims
    g = parse_text(source, filename="model.nn")      # text

The text is parsed by ``grammar/nn.lark`` (see ``syntax.py``); this module walks the tree once,
top to bottom, and builds the graph through ``GraphBuilder``: every op is type-checked by its
``infer`` rule as it is made, so a mistake is reported at the expression that caused it
(``file:line:col: error: ...``). Blocks are expanded at each call with their own parameter prefix;
``repeat N`` expands a call N times, threading its first argument(s). Reference: docs/language.md.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lark import Token, Tree

from nncompile.errors import InputError, NameError_, NNError, ParseError, ShapeError, SourceLoc
from nncompile.ir.builder import GraphBuilder
from nncompile.ir.graph import Attrs, Graph, Init, TrainSpec
from nncompile.ir.types import DTYPES, TensorType
from nncompile.ops.base import OPS
from nncompile.frontend import layers as layer_table
from nncompile.frontend.expr import ExprEvaluator, Frame, Scope, suggest, unquote
from nncompile.frontend.params import (INITIALIZERS, OPTIMIZERS, bind_optimizer, check_sparsity,
                                       default_init, make_init, make_sparsity, read_weights_file)
from nncompile.frontend.syntax import parse_tree, source_loc
from nncompile.frontend.values import Tensor, as_int, describe

MAX_REPEAT = 1000
MAX_BLOCK_DEPTH = 64
BLOCK_PARAM_TYPES = ("tensor", "int", "float", "bool", "str")


def parse(path: str | Path, set: Mapping[str, int] | None = None) -> Graph:  # noqa: A002 (the API's name)
    """Parse and type-check the `.nn` file at ``path``; ``set`` binds or overrides named dims."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        raise InputError(f"model file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read model file '{path}': {err}") from None
    return parse_text(text, filename=str(path), set=set, base_dir=file.resolve().parent)


def parse_text(text: str, filename: str = "<string>", set: Mapping[str, int] | None = None,  # noqa: A002
               base_dir: str | Path | None = None) -> Graph:
    """Parse `.nn` source text. Relative file names in it resolve against ``base_dir`` (default: cwd)."""
    tree = parse_tree(text, filename)
    evaluator = ModelEvaluator(text, filename, dict(set or {}), Path(base_dir) if base_dir else Path.cwd())
    try:
        return evaluator.run(tree)
    except RecursionError:
        raise ParseError("the program is nested too deeply", SourceLoc(filename, 1, 1)) from None


class ModelEvaluator(ExprEvaluator):
    """Walks a parsed `.nn` file and builds its model's graph."""

    def __init__(self, text: str, filename: str, overrides: dict[str, int], base_dir: Path):
        self.filename = filename
        self.lines = text.splitlines()
        self.base_dir = base_dir
        self.overrides = overrides
        self.used_overrides: set[str] = set()
        self.builder = GraphBuilder("model")
        self.blocks: dict[str, Tree] = {}
        self.prefixes: set[str] = set()
        self.call_stack: list[str] = []
        self.top = Scope()
        self.weights: dict[str, Any] | None = None
        self.weights_loc: SourceLoc | None = None
        self.weights_used: set[str] = set()
        self.outputs: list[str] = []
        self.train: TrainSpec | None = None
        self._labels: list[str] = []
        self.dim_names: list[str] = []

    # the file -----------------------------------------------------------------------------------
    def run(self, tree: Tree) -> Graph:
        for name, value in self.overrides.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"--set {name}: expected an integer, got {value!r}")
            self.overrides[name] = int(value)
        models = [item for item in tree.children if isinstance(item, Tree) and item.data == "model_def"]
        for item in tree.children:
            if isinstance(item, Tree) and item.data == "block_def":
                self.define_block(item)
        for item in tree.children:
            if isinstance(item, Tree) and item.data == "dim_decl":
                self.dim_decl(item, Frame(self.top))
        if not models:
            raise ParseError("no model in this file (expected 'model NAME { ... }')",
                             source_loc(self.filename, self.lines, 1, 1))
        if len(models) > 1:
            raise ParseError(f"a file holds one model; '{models[1].children[0]}' is a second one",
                             self.loc(models[1].children[0]))
        graph = self.model(models[0])
        unused = sorted(set(self.overrides) - self.used_overrides)
        if unused:
            raise NameError_(f"--set {unused[0]}: no dimension named '{unused[0]}' in {self.filename}"
                             + suggest(unused[0], self.dim_names))
        return graph

    def define_block(self, tree: Tree) -> None:
        name_token = tree.children[0]
        name = str(name_token)
        if name in self.blocks:
            first = self.loc(self.blocks[name].children[0])
            raise NameError_(f"block '{name}' is defined twice (first at {first})", self.loc(name_token))
        if name in OPS or name in layer_table.LAYERS:
            what = "an op" if name in OPS else "a built-in layer"
            raise NameError_(f"block '{name}' has the name of {what}", self.loc(name_token))
        params = tree.children[1].children if tree.children[1] is not None else []
        seen = set()
        for param in params:
            pname, annotation, _ = param.children
            if str(pname) in seen:
                raise NameError_(f"block '{name}': parameter '{pname}' is listed twice", self.loc(pname))
            seen.add(str(pname))
            if annotation is not None and str(annotation) not in BLOCK_PARAM_TYPES:
                raise NameError_(f"unknown parameter type '{annotation}' (known: {', '.join(BLOCK_PARAM_TYPES)})",
                                 self.loc(annotation))
        self.blocks[name] = tree

    def model(self, tree: Tree) -> Graph:
        name_token, body = tree.children
        self.builder = GraphBuilder(str(name_token))
        frame = Frame(Scope(self.top))
        self.statements(body, frame)
        if not self.outputs:
            raise ParseError(f"model '{name_token}' has no 'output' statement", self.loc(name_token))
        if self.weights is not None:
            unused = sorted(k for k in set(self.weights) - self.weights_used if not k.endswith("num_batches_tracked"))
            if unused:
                raise NameError_(f"weights file has arrays that match no parameter: {', '.join(unused[:5])}"
                                 + (" ..." if len(unused) > 5 else ""), self.weights_loc)
        self.builder.output(*self.outputs)
        self.builder.train = self.train
        return self.builder.build()

    # statements -----------------------------------------------------------------------------------
    def statements(self, body: Tree, frame: Frame) -> None:
        for stmt in body.children:
            if not isinstance(stmt, Tree):
                continue
            if frame.has_return:
                raise ParseError("statement after 'return'", self.loc(stmt))
            getattr(self, stmt.data)(stmt, frame)

    def _only_in_model(self, keyword: str, tree: Tree, frame: Frame) -> None:
        if frame.block is not None:
            raise ParseError(f"'{keyword}' is only allowed in a model, not in block '{frame.block}'", self.loc(tree))

    def dim_decl(self, tree: Tree, frame: Frame) -> None:
        if frame.block is not None:
            raise ParseError("'dim' is only allowed at top level or in a model; use a block parameter", self.loc(tree))
        name_token, value_tree = tree.children
        name = str(name_token)
        loc = self.loc(name_token)
        if name in self.overrides:
            value = self.overrides[name]
            self.used_overrides.add(name)
        elif value_tree is not None:
            value = self.expr(value_tree, frame)
            loc = self.loc(value_tree) or loc
        else:
            raise NameError_(f"dimension '{name}' has no value; bind it with --set {name}=N (or parse(..., set=...))",
                             self.loc(name_token))
        as_int(f"dimension '{name}'", value, loc, 1)
        frame.scope.define(name, value, "dim", self.loc(name_token))
        self.dim_names.append(name)

    def tensor_type(self, tree: Tree, frame: Frame) -> TensorType:
        dtype_token, *dim_trees = tree.children
        dtype = str(dtype_token)
        if dtype not in DTYPES:
            raise ShapeError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPES)})", self.loc(dtype_token))
        dims = []
        for dim_tree in dim_trees:
            if dim_tree is None:
                continue
            value = self.expr(dim_tree, frame)
            dims.append(as_int("a dimension", value, self.loc(dim_tree), 0))
        return TensorType(tuple(dims), dtype)

    def input_decl(self, tree: Tree, frame: Frame, where: str = "model") -> None:
        self._only_in_model("input", tree, frame)
        name_token, type_tree = tree.children
        type_ = self.tensor_type(type_tree, frame)
        loc = self.loc(name_token)
        frame.scope.define(str(name_token), None, "input", loc)
        name = self.builder.input(str(name_token), type_, loc)
        frame.scope.values[str(name_token)] = Tensor(name, type_)
        if where == "train":
            self._labels.append(name)

    def param_decl(self, tree: Tree, frame: Frame, trainable: bool = True) -> None:
        if trainable:
            name_token, type_tree, init_tree, sparse_tree = tree.children
        else:
            (name_token, type_tree, init_tree), sparse_tree = tree.children, None
        type_ = self.tensor_type(type_tree, frame)
        loc = self.loc(name_token)
        sparsity = None
        if sparse_tree is not None:
            args = sparse_tree.children[0]
            positional, keywords = self.call_arguments(Tree("call", [None, args]), frame, None)
            sparsity = make_sparsity(positional, keywords, self.loc(sparse_tree), self.base_dir)
            check_sparsity(sparsity, type_.shape, self.loc(sparse_tree))
            type_ = TensorType(type_.shape, type_.dtype, sparsity)
        if init_tree is not None:
            init_name = init_tree.children[0]
            positional, keywords = self.call_arguments(init_tree, frame, None)
            init = make_init(str(init_name), positional, keywords, type_.shape, self.loc(init_name), self.base_dir)
        else:
            init = default_init(type_.shape, trainable)
        frame.scope.define(str(name_token), None, "param" if trainable else "buffer", loc)
        tensor = self.new_param(frame.qualify(str(name_token)), type_, init, trainable, loc)
        frame.scope.values[str(name_token)] = tensor

    def buffer_decl(self, tree: Tree, frame: Frame) -> None:
        self.param_decl(tree, frame, trainable=False)

    def new_param(self, name: str, type_: TensorType, init: Init, trainable: bool, loc: SourceLoc | None) -> Tensor:
        """Declare a parameter or buffer; a value in the model's weights file replaces its initializer."""
        if self.builder.has(name):
            raise NameError_(f"parameter name '{name}' is already taken", loc)
        value = None
        if self.weights is not None and name in self.weights:
            value = self.weights[name]
            if tuple(value.shape) != type_.shape:
                raise ShapeError(f"weights file: '{name}' has shape {list(value.shape)}, the parameter is {type_}",
                                 loc, notes=(f"weights file declared at {self.weights_loc}",))
            self.weights_used.add(name)
        self.builder.param(name, type_, None if value is not None else init, trainable=trainable, loc=loc, value=value)
        return Tensor(name, type_)

    def weights_decl(self, tree: Tree, frame: Frame) -> None:
        self._only_in_model("weights", tree, frame)
        token = tree.children[0]
        if self.weights is not None:
            raise ParseError(f"a model has one 'weights' file (first at {self.weights_loc})", self.loc(tree))
        if self.builder.params:
            raise ParseError("'weights' must come before the first parameter or layer", self.loc(tree))
        shown = unquote(str(token))
        self.weights_loc = self.loc(token)
        self.weights = read_weights_file(self.base_dir / shown, shown, self.weights_loc)

    def let_stmt(self, tree: Tree, frame: Frame) -> None:
        targets_tree, value_tree = tree.children
        targets = [str(t) for t in targets_tree.children]
        hint = targets[0] if len(targets) == 1 else None
        value = self.expr(value_tree, frame, hint=hint, owner=targets[0])
        self.bind_targets(targets_tree, value, frame, self.loc(value_tree))

    def bind_targets(self, targets_tree: Tree, value: Any, frame: Frame, loc: SourceLoc | None) -> None:
        tokens = list(targets_tree.children)
        if len(tokens) == 1:
            frame.scope.define(str(tokens[0]), value, "let", self.loc(tokens[0]))
            return
        if not isinstance(value, tuple) or len(value) != len(tokens):
            count = len(value) if isinstance(value, tuple) else 1
            raise ShapeError(f"{len(tokens)} names on the left, but the right side gives {count} value"
                             + ("s" if count != 1 else ""), loc)
        for token, item in zip(tokens, value):
            frame.scope.define(str(token), item, "let", self.loc(token))

    def repeat_stmt(self, tree: Tree, frame: Frame) -> None:
        targets_tree, count_tree, call_tree, as_token = tree.children
        targets = [str(t) for t in targets_tree.children]
        count = self.expr(count_tree, frame)
        count_loc = self.loc(count_tree)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_REPEAT:
            raise ParseError(f"repeat count must be an integer from 1 to {MAX_REPEAT}, got {describe(count)}", count_loc)
        if as_token is not None:
            base = self.claim_prefix(frame.qualify(str(as_token)), self.loc(as_token))
        else:
            base = self.unique_prefix(frame.qualify(targets[0]))
        positional, keywords = self.call_arguments(call_tree, frame, targets[0])
        if len(positional) < len(targets):
            raise ShapeError(f"repeat threads {len(targets)} value(s) through the first positional argument(s), "
                             f"but the call has {len(positional)}", self.loc(call_tree))
        name_token = call_tree.children[0]
        current: Any = tuple(positional[: len(targets)]) if len(targets) > 1 else positional[0]
        for i in range(count):
            threaded = list(current) if len(targets) > 1 else [current]
            args = threaded + positional[len(targets):]
            current = self.dispatch(name_token, args, dict(keywords), frame, None, None, prefix=f"{base}.{i}")
            if len(targets) > 1 and not (isinstance(current, tuple) and len(current) == len(targets)):
                got = len(current) if isinstance(current, tuple) else 1
                raise ShapeError(f"repeat threads {len(targets)} values, but '{name_token}' returns {got}",
                                 self.loc(call_tree))
        self.bind_targets(targets_tree, current, frame, self.loc(call_tree))

    def output_stmt(self, tree: Tree, frame: Frame) -> None:
        self._only_in_model("output", tree, frame)
        for token in tree.children:
            value = self.lookup(token, frame)
            if not isinstance(value, Tensor):
                raise ShapeError(f"output '{token}' must be a tensor, got {describe(value)}", self.loc(token))
            if value.name in self.outputs:
                raise NameError_(f"'{token}' is already an output", self.loc(token))
            self.outputs.append(value.name)

    def return_stmt(self, tree: Tree, frame: Frame) -> None:
        if frame.block is None:
            raise ParseError("'return' is only allowed in a block; a model uses 'output'", self.loc(tree))
        values = tuple(self.expr(child, frame, owner="out") for child in tree.children)
        frame.returned = values[0] if len(values) == 1 else values
        frame.has_return = True

    def train_def(self, tree: Tree, frame: Frame) -> None:
        self._only_in_model("train", tree, frame)
        if self.train is not None:
            raise ParseError("a model has one 'train' section", self.loc(tree))
        loss: Tensor | None = None
        optimizer: tuple[str, dict] | None = None
        for stmt in tree.children:
            if not isinstance(stmt, Tree):
                continue
            if stmt.data == "input_decl":
                self.input_decl(stmt, frame, "train")
            elif stmt.data == "let_stmt":
                self.let_stmt(stmt, frame)
            elif stmt.data == "loss_stmt":
                if loss is not None:
                    raise ParseError("the train section has a second 'loss'", self.loc(stmt))
                value = self.expr(stmt.children[0], frame, hint="loss", owner="loss")
                where = self.loc(stmt.children[0])
                if not isinstance(value, Tensor):
                    raise ShapeError(f"the loss must be a tensor, got {describe(value)}", where)
                if value.type.numel != 1 or not value.type.is_float:
                    raise ShapeError(f"the loss must be a floating-point scalar, got {value.type.dense()}", where)
                loss = value
            elif stmt.data == "optimizer_stmt":
                if optimizer is not None:
                    raise ParseError("the train section has a second 'optimizer'", self.loc(stmt))
                name_token, args = stmt.children
                positional, keywords = self.call_arguments(Tree("call", [name_token, args]), frame, None)
                optimizer = (str(name_token), bind_optimizer(str(name_token), positional, keywords, self.loc(name_token)))
        if loss is None:
            raise ParseError("the train section has no 'loss = ...'", self.loc(tree))
        if optimizer is None:
            raise ParseError(f"the train section has no 'optimizer' (one of: {', '.join(OPTIMIZERS)})", self.loc(tree))
        self.train = TrainSpec(loss.name, tuple(self._labels), optimizer[0], Attrs(optimizer[1]))

    # calls ----------------------------------------------------------------------------------------
    def is_callable(self, name: str) -> bool:
        return name in self.blocks or name in layer_table.LAYERS or name == "sparse"

    def call(self, tree: Tree, frame: Frame, hint: str | None, owner: str | None, piped: Any = None) -> Any:
        name_token = tree.children[0]
        positional, keywords = self.call_arguments(tree, frame, owner, piped)
        return self.dispatch(name_token, positional, keywords, frame, hint, owner)

    def dispatch(self, name_token: Token, positional: list, keywords: dict, frame: Frame, hint: str | None,
                 owner: str | None, prefix: str | None = None) -> Any:
        """Call a built-in, a block, a layer or an op by name (in that order)."""
        name = str(name_token)
        loc = self.loc(name_token)
        if name == "sparse":
            return make_sparsity(positional, keywords, loc, self.base_dir)
        if name in self.blocks or name in layer_table.LAYERS:
            # name="..." chooses the prefix, unless it is a block's own parameter called 'name'
            explicit = None
            if name in layer_table.LAYERS or not self._block_has(name, "name"):
                explicit = keywords.pop("name", None)
            if explicit is not None and not isinstance(explicit, str):
                raise ShapeError(f"{name}: name= must be a string, got {describe(explicit)}", loc)
            if prefix is None and explicit is not None:
                prefix = self.claim_prefix(frame.qualify(explicit), loc)
            elif prefix is None:
                prefix = self.unique_prefix(frame.qualify(owner or name.lower()))
            elif explicit is not None:
                raise ParseError("name= cannot be used inside 'repeat'; use 'as NAME'", loc)
            if name in self.blocks:
                return self.call_block(name, positional, keywords, loc, prefix)
            out_name = frame.qualify(hint) if hint else f"{prefix}.out"
            return layer_table.call_layer(self, name, positional, keywords, loc, prefix, out_name)
        if name in OPS:
            return self.call_op(name, positional, keywords, loc, frame, hint)
        if name in INITIALIZERS:
            raise ParseError(f"initializer '{name}' can only follow '=' in a param or buffer declaration", loc)
        candidates = [*self.blocks, *layer_table.LAYERS, *OPS]
        raise NameError_(f"unknown op, layer or block '{name}'" + suggest(name, candidates), loc)

    def _block_has(self, block: str, param: str) -> bool:
        params = self.blocks[block].children[1]
        return params is not None and any(str(p.children[0]) == param for p in params.children)

    def unique_prefix(self, base: str) -> str:
        """A parameter prefix no other layer or block instance has used (``fc``, ``fc_1``, ...)."""
        candidate, count = base, 0
        while candidate in self.prefixes:
            count += 1
            candidate = f"{base}_{count}"
        self.prefixes.add(candidate)
        return candidate

    def claim_prefix(self, prefix: str, loc: SourceLoc | None) -> str:
        """An explicitly chosen prefix (name=..., as ...); choosing one twice is an error."""
        if prefix in self.prefixes:
            raise NameError_(f"the name '{prefix}' is already used by another layer or block instance", loc)
        self.prefixes.add(prefix)
        return prefix

    def call_block(self, name: str, positional: list, keywords: dict, loc: SourceLoc | None, prefix: str) -> Any:
        """Expand one instance of a user block under ``prefix``."""
        if name in self.call_stack:
            chain = " -> ".join([*self.call_stack[self.call_stack.index(name):], name])
            raise ParseError(f"recursive block call: {chain}", loc)
        if len(self.call_stack) >= MAX_BLOCK_DEPTH:
            raise ParseError(f"blocks nested more than {MAX_BLOCK_DEPTH} deep", loc)
        tree = self.blocks[name]
        params = tree.children[1].children if tree.children[1] is not None else []
        frame = Frame(Scope(self.top, shadowing=True), prefix=prefix, block=name)
        if len(positional) > len(params):
            raise ShapeError(f"block {name} takes {len(params)} argument{'s' if len(params) != 1 else ''}, "
                             f"got {len(positional)}", loc)
        names = [str(p.children[0]) for p in params]
        for key in keywords:
            if key not in names:
                raise NameError_(f"block {name}: unknown keyword '{key}' (parameters: {', '.join(names)})", loc)
            if names.index(key) < len(positional):
                raise NameError_(f"block {name}: argument '{key}' given twice", loc)
        self.call_stack.append(name)
        try:
            for index, param in enumerate(params):
                pname, annotation, default = param.children
                if index < len(positional):
                    value = positional[index]
                elif str(pname) in keywords:
                    value = keywords[str(pname)]
                elif default is not None:
                    value = self.expr(default, frame)
                else:
                    raise ShapeError(f"block {name}: missing argument '{pname}'", loc)
                self._check_block_arg(name, str(pname), annotation, value, loc)
                frame.scope.define(str(pname), value, "arg", self.loc(pname))
            self.statements(tree.children[2], frame)
        except NNError as err:
            err.notes = (*err.notes, f"in block '{name}' (instance '{prefix}') called at {loc}")
            raise
        finally:
            self.call_stack.pop()
        if not frame.has_return:
            raise ParseError(f"block '{name}' has no 'return' statement", self.loc(tree.children[0]))
        return frame.returned

    def _check_block_arg(self, block: str, pname: str, annotation: Token | None, value: Any, loc) -> None:
        kind = str(annotation) if annotation is not None else None
        ok = {
            None: True,
            "tensor": isinstance(value, Tensor),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            raise ShapeError(f"block {block}: argument '{pname}' must be {kind}, got {describe(value)}", loc)
