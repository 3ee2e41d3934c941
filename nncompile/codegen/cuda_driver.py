"""compile_graph for ``target="cuda"``: IR graph -> passes -> CUDA -> nvcc -> CudaCompiledModel (+ build dir).

The same passes and parameter layout as the CPU target (``driver.py``); the CUDA kernels need no
arena scratch, so the plan holds only the values. Compiling needs nvcc, not a GPU: the build
directory (``kernels.cu``, the module, ``model.json`` with ``"target": "cuda"``) is written either way,
and the returned model reports the missing GPU when it is first run.

    build/model.json  kernels.cu  [kernels_train.cu]  <module>.so  graph.ir  plan.json  weights.npz
"""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nncompile.errors import UnsupportedError
from nncompile.ir.graph import Graph


@dataclass
class _Built:
    lowered: Graph
    reports: list
    plan: object
    source: object
    path: Path
    cache_hit: bool
    seconds: float = 0.0      # the nvcc run (or cache lookup) alone


def build_options(options):
    """nvcc options: ``options.cuda_arch``; TF32 tensor cores in the GEMM when ``NNCOMPILE_CUDA_TF32=1``."""
    import os

    from nncompile.codegen.build_cuda import CudaBuildOptions

    tf32 = bool(getattr(options, "cuda_tf32", False)) or os.environ.get("NNCOMPILE_CUDA_TF32") == "1"
    return CudaBuildOptions(arch=getattr(options, "cuda_arch", None), tf32=tf32)


def _prepare(graph: Graph, options, layout, keep_inputs: bool, say):
    """Passes and CUDA emission (Python); the nvcc run is separate so that two modules compile at once."""
    from nncompile.codegen.cuda import CudaEmitter
    from nncompile.codegen.cuda_ops_nn import workspace_bytes
    from nncompile.passes.pipeline import run_pipeline

    say("running passes")
    lowered, reports, plan = run_pipeline(graph, options.pipeline, workspace_bytes, layout, keep_inputs)
    say("generating CUDA")
    probe = CudaEmitter(lowered, plan, "nnc_module").emit_kernels()[0]
    module_name = "nncu_" + hashlib.sha256(probe.encode()).hexdigest()[:16]
    return lowered, reports, plan, CudaEmitter(lowered, plan, module_name).emit()


def _compile(prepared, options) -> _Built:
    from nncompile.codegen.build_cuda import build_cuda_module

    lowered, reports, plan, source = prepared
    start = time.perf_counter()
    path, hit = build_cuda_module(source, build_options(options), verbose=options.verbose)
    return _Built(lowered, reports, plan, source, path, hit, time.perf_counter() - start)


def _module_manifest(built: _Built) -> dict:
    from nncompile.codegen.cuda import device_arena_bytes
    from nncompile.driver import _module_manifest as cpu_module_manifest

    return {**cpu_module_manifest(built), "device_arena_bytes": device_arena_bytes(built.plan.arena_bytes)}


def compile_graph_cuda(graph: Graph, options, *, weights: dict | None = None, out_dir=None, progress=None, train=None):
    """``driver.compile_graph`` for the CUDA target (same arguments); returns a ``CudaCompiledModel``."""
    from nncompile.codegen.build_cuda import resolve_arch
    from nncompile.codegen.cuda_ops_nn import register_cuda_rules
    from nncompile.driver import params_manifest, train_manifest, write_build_dir
    from nncompile.ir.init import materialize
    from nncompile.passes.plan_memory import param_layout
    from nncompile.runtime_cuda import CudaCompiledModel

    if getattr(options, "memory_budget", None) is not None or getattr(options, "recompute", "fast") != "fast":
        raise UnsupportedError("the CUDA target does not support memory budgets / recomputation yet")
    register_cuda_rules()
    start = time.perf_counter()
    say = progress or (lambda text: None)
    layout = param_layout(graph.params, options.pipeline.memory.alignment)
    t0 = time.perf_counter()
    prepared = [_prepare(graph, options, layout, False, say)]
    tg = None
    if train is not None:
        from nncompile.autodiff import training_graph

        say("differentiating")
        tg = training_graph(graph, train.loss)
        prepared.append(_prepare(tg.graph, options, layout, True, say))
    say("compiling (nvcc)")
    # nvcc is one process per module: the inference and training modules compile side by side
    with ThreadPoolExecutor(len(prepared)) as pool:
        built = list(pool.map(lambda item: _compile(item, options), prepared))
    inference = built[0]
    timings = {"build_s": time.perf_counter() - t0, "cache_hit": inference.cache_hit, "nvcc_s": inference.seconds}
    manifest = {"format": 1, "model": graph.name, "target": "cuda", "weights_file": "weights.npz",
                **_module_manifest(inference), "param_bytes": layout[1],
                "cuda_arch": resolve_arch(getattr(options, "cuda_arch", None)),
                "params": params_manifest(graph, layout)}
    plan_json = {"passes": [r.to_json() for r in inference.reports], "memory": inference.plan.to_json()}
    modules = [(inference, "")]
    if tg is not None:
        training = built[1]
        timings["train_build_s"] = timings["build_s"]      # built together with the inference module
        timings["train_nvcc_s"] = training.seconds
        timings["train_cache_hit"] = training.cache_hit
        manifest["train"] = train_manifest(graph, tg, train, layout, _module_manifest(training))
        plan_json["train"] = {"passes": [r.to_json() for r in training.reports], "memory": training.plan.to_json()}
        modules.append((training, "_train"))
    manifest["timings"] = timings
    if weights is None:
        weights = materialize(graph, options.seed)
    weights = {p.name: weights[p.name] for p in graph.params}
    model = CudaCompiledModel(inference.path, manifest, weights, plan_json,
                              train_module_path=modules[1][0].path if len(modules) > 1 else None)
    if out_dir is not None:
        write_build_dir(Path(out_dir), manifest, modules, plan_json, weights, kernels_suffix=".cu")
    timings["total_s"] = time.perf_counter() - start
    return model
