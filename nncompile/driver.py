"""compile_graph: IR graph -> passes -> C++ -> native module -> CompiledModel (+ the build directory).

The build directory holds everything needed to load and inspect the result::

    model.json      manifest: inputs, outputs, parameter layout, arena size, module file, figures
    <module>.so     the compiled module          weights.npz  initial weights
    kernels.cpp / binding.cpp  the generated code   graph.ir  the IR after the passes
    plan.json       the decisions of every pass and their figures
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nncompile.codegen.build import BuildOptions, build_module
from nncompile.errors import UnsupportedError
from nncompile.ir.graph import Graph
from nncompile.ir.init import materialize
from nncompile.passes.pipeline import PipelineOptions, run_pipeline
from nncompile.passes.plan_memory import param_layout
from nncompile.runtime import MANIFEST, CompiledModel


@dataclass(frozen=True)
class TrainOptions:
    """What a training step does: the loss to minimize and the optimizer with its hyper-parameters
    (sgd: lr, momentum, dampening, weight_decay, nesterov; adam / adamw: lr, betas, eps, weight_decay)."""

    optimizer: str = "sgd"
    hyper: tuple = ()
    loss: str | None = None

    @classmethod
    def from_graph(cls, graph: Graph, optimizer=None, loss: str | None = None) -> "TrainOptions":
        """From ``nnc.compile``'s ``optimizer=("adamw", {"lr": 1e-3})`` or the graph's training section."""
        if optimizer is None:
            if graph.train is None:
                raise UnsupportedError(f"model '{graph.name}' has no training section: pass loss= and optimizer=")
            return cls(graph.train.optimizer, tuple(graph.train.hyper.items()), loss or graph.train.loss)
        name, hyper = (optimizer, {}) if isinstance(optimizer, str) else optimizer
        return cls(name, tuple(dict(hyper).items()), loss)


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    build: BuildOptions = field(default_factory=BuildOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    threads: int | None = None
    seed: int = 0
    verbose: bool = False
    memory_budget: object = None      # training arena budget: bytes, "60%", 0.6, "8MB" (passes/recompute.py)
    recompute: str = "fast"           # fast | exact | every_layer | sqrt_n
    cuda_arch: str | None = None      # target "cuda": sm_80, sm_90, ... (None: detected, else sm_80)


def _type_json(name: str, t) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": t.dtype}


@dataclass
class _Built:
    lowered: Graph
    reports: list
    plan: object
    source: object
    path: Path
    cache_hit: bool


def _build(graph: Graph, options: CompileOptions, layout, keep_inputs: bool, say) -> _Built:
    from nncompile.codegen.cpp import CppEmitter
    from nncompile.codegen.cpp_ops_nn import workspace_bytes

    say("running passes")
    lowered, reports, plan = run_pipeline(graph, options.pipeline, workspace_bytes, layout, keep_inputs)
    say("generating C++")
    # the inference module keeps sparse weights' values packed between calls; the training module's
    # weights change every step, so it packs them on each call
    packed = not keep_inputs
    probe = CppEmitter(lowered, plan, "nnc_module", packed_values=packed).emit_kernels()[0]
    module_name = "nnc_" + hashlib.sha256(probe.encode()).hexdigest()[:16]
    source = CppEmitter(lowered, plan, module_name, packed_values=packed).emit()
    say("compiling")
    path, hit = build_module(source, options.build, verbose=options.verbose)
    return _Built(lowered, reports, plan, source, path, hit)


def _module_manifest(built) -> dict:
    return {
        "module_name": built.source.module_name, "module_file": built.path.name,
        "inputs": [_type_json(i.name, i.type) for i in built.lowered.inputs],
        "outputs": [_type_json(o, built.lowered.type_of(o)) for o in built.lowered.outputs],
        "arena_bytes": built.plan.arena_bytes, "figures": {r.name: r.figures for r in built.reports},
    }


def params_manifest(graph: Graph, layout) -> list[dict]:
    """Each parameter's type, offset in the parameter block, trainability and torch name (if imported)."""
    return [dict(_type_json(p.name, p.type), offset=layout[0][p.name], trainable=p.trainable,
                 **({"source": p.init.args["torch_name"]} if "torch_name" in p.init.args else {}))
            for p in graph.params]


def train_manifest(graph: Graph, tg, train: TrainOptions, layout, module: dict) -> dict:
    """The manifest's ``train`` entry: the training module (``module``), loss, gradient and update outputs,
    the trainable f32 prefix of the parameter block the optimizer updates, and the optimizer."""
    trainable = [p for p in graph.params if p.trainable and p.type.dtype == "f32"]
    end = max((layout[0][p.name] + p.type.nbytes for p in trainable), default=0)
    return {**module, "loss": tg.loss, "step_input": tg.step_input, "grads": tg.grads, "updates": tg.updates,
            "trainable_bytes": end, "optimizer": {"name": train.optimizer, "hyper": dict(train.hyper)},
            "label_inputs": list(graph.train.label_inputs) if graph.train else []}


def compile_graph(graph: Graph, options: CompileOptions = CompileOptions(), *, weights: dict | None = None,
                  out_dir: str | Path | None = None, progress=None, train: TrainOptions | None = None) -> CompiledModel:
    """Compile ``graph`` for the CPU: an inference module and, with ``train``, a training-step module
    sharing one parameter block. ``weights`` default to the graph's initializers."""
    if options.target == "cuda":
        from nncompile.codegen.cuda_driver import compile_graph_cuda

        return compile_graph_cuda(graph, options, weights=weights, out_dir=out_dir, progress=progress, train=train)
    if options.target != "cpu":
        raise UnsupportedError(f"target '{options.target}' is not available in this build (only 'cpu' and 'cuda')")
    from nncompile.codegen import register_rules

    register_rules()
    start = time.perf_counter()
    say = progress or (lambda text: None)
    layout = param_layout(graph.params, options.pipeline.memory.alignment)
    t0 = time.perf_counter()
    inference = _build(graph, options, layout, False, say)
    timings = {"build_s": time.perf_counter() - t0, "cache_hit": inference.cache_hit}
    manifest = {"format": 1, "model": graph.name, "target": options.target, "weights_file": "weights.npz",
                **_module_manifest(inference), "param_bytes": layout[1], "march": options.build.march,
                "params": params_manifest(graph, layout)}
    if inference.source.packed:
        # sparse weights' packed values follow the parameters in the same block (see CppEmitter.pack_slot)
        manifest["packed_values"] = inference.source.packed
        manifest["param_bytes"] = max(layout[1], inference.source.packed["end"])
    plan_json = {"passes": [r.to_json() for r in inference.reports], "memory": inference.plan.to_json()}
    from nncompile.codegen.cpp_sparse import DECISIONS as sparse_choices   # per-layer sparse/dense kernel choices
    if sparse_choices.get(inference.source.module_name):
        plan_json["sparse"] = sparse_choices[inference.source.module_name]
    modules = [(inference, "")]
    if train is not None:
        from nncompile.autodiff import training_graph

        say("differentiating")
        tg = training_graph(graph, train.loss)
        t0 = time.perf_counter()
        train_graph, recompute = tg.graph, None
        if options.memory_budget is not None or options.recompute != "fast":
            from nncompile.passes.recompute import RecomputeOptions, check_planned_arena, fit_memory_budget

            say("choosing what to recompute")
            train_graph, recompute = fit_memory_budget(tg.graph, options.memory_budget, options.pipeline, layout,
                                                       RecomputeOptions(method=options.recompute), progress=say)
        training = _build(train_graph, options, layout, True, say)
        if recompute is not None:
            check_planned_arena(recompute, training.plan.arena_bytes)
            training.reports.insert(0, recompute)
        timings["train_build_s"] = time.perf_counter() - t0
        timings["train_cache_hit"] = training.cache_hit
        manifest["train"] = train_manifest(graph, tg, train, layout, _module_manifest(training))
        plan_json["train"] = {"passes": [r.to_json() for r in training.reports], "memory": training.plan.to_json()}
        if sparse_choices.get(training.source.module_name):
            plan_json["train"]["sparse"] = sparse_choices[training.source.module_name]
        modules.append((training, "_train"))
    manifest["timings"] = timings
    if weights is None:
        weights = materialize(graph, options.seed)
    weights = {p.name: weights[p.name] for p in graph.params}
    model = CompiledModel(inference.path, manifest, weights, plan_json,
                          train_module_path=modules[1][0].path if len(modules) > 1 else None)
    if options.threads:
        model.set_threads(options.threads)
    if out_dir is not None:
        write_build_dir(Path(out_dir), manifest, modules, plan_json, weights)
    timings["total_s"] = time.perf_counter() - start
    return model


def write_build_dir(out: Path, manifest: dict, modules: list, plan_json: dict, weights: dict,
                    kernels_suffix: str = ".cpp") -> None:
    """The build folder: modules, generated sources (``kernels<suffix>``), lowered IR, plan, memory pictures,
    weights and the manifest ``nnc.load`` reads."""
    out.mkdir(parents=True, exist_ok=True)
    for built, suffix in modules:
        shutil.copy2(built.path, out / built.path.name)
        (out / f"kernels{suffix}{kernels_suffix}").write_text(built.source.kernels)
        (out / f"graph{suffix}.ir").write_text(str(built.lowered))
    if modules[0][0].source.binding:
        (out / "binding.cpp").write_text(modules[0][0].source.binding)
    (out / "plan.json").write_text(json.dumps(plan_json, indent=1, default=str))
    from nncompile.report_png import write_memory_png

    pictures = {"memory.png": plan_json.get("memory"), "memory_train.png": plan_json.get("train", {}).get("memory")}
    for picture, memory in pictures.items():
        if memory:
            write_memory_png(out / picture, memory)     # the arena over time, buffers as rectangles
    np.savez(out / "weights.npz", **{k: np.asarray(v) for k, v in weights.items()})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
