"""Hybrid-parallelism search (Galvatron-BMW style) and its execution on torch.distributed.

    from nncompile.parallel import load_galvatron_profile, load_cluster, search, SearchOptions
    model = load_galvatron_profile("../shared/datasets/galvatron/gpt", "gpt-1.5b")
    result = search(model, load_cluster("2x8-40gb"), SearchOptions(global_bsz=144))
    result.plan, result.cost.step_ms

Command line: ``nncompile parallel --profile DIR --cluster 2x8-40gb [--global-bsz N] [-o PLAN.json]``
searches; ``--evaluate PLAN.json`` prices a plan (ours or Galvatron's ``galvatron_config_*.json``).
Running a plan on torch.distributed (gloo on CPU, NCCL on GPUs), here for the bundled TinyGPT::

    torchrun --nproc-per-node 4 -m nncompile.parallel.runner PLAN.json --steps 5

or from Python, ``runner.launch(runner.plans_worker, 4, (plans, model_kwargs, steps, batch, lr, out))``;
``runner.run_plan(plan, model, batches, lr)`` inside an initialized process group for any model
with ``embed``/``blocks``/``head`` whose blocks follow ``runner_model.TP_PLAN``.

Modules, in the order data flows: ``model`` (per-layer cost input), ``profile`` (Galvatron's JSON
profiles), ``cluster`` (devices and bandwidth tables), ``strategy`` (per-layer strategies and the
decision tree), ``cost`` (time and memory model), ``dp`` (numba DP over layers x memory),
``search`` (settings, stage DPs, pipeline partitions), ``plan`` (plan JSON and table), ``runner``
(applies a plan to a torch model on torch.distributed), ``runner_model`` (TinyGPT), ``calibrate``
(per-layer costs of a torch chain model and measured bandwidth tables for the ranks at hand).
"""
from nncompile.parallel.cluster import Cluster, load_cluster
from nncompile.parallel.cost import CostModel, PlanCost, Setting
from nncompile.parallel.model import LayerCost, ModelCost, VocabCost
from nncompile.parallel.plan import Plan, plan_from_json, plan_table, plan_to_json
from nncompile.parallel.profile import load_galvatron_profile
from nncompile.parallel.search import SearchOptions, SearchResult, search
from nncompile.parallel.strategy import Strategy

__all__ = [
    "Cluster", "CostModel", "LayerCost", "ModelCost", "Plan", "PlanCost", "SearchOptions", "SearchResult",
    "Setting", "Strategy", "VocabCost", "load_cluster", "load_galvatron_profile", "plan_from_json",
    "plan_table", "plan_to_json", "search",
]
