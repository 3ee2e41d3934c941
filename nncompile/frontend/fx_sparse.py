"""Sparsity from torch: weights pruned with ``torch.nn.utils.prune`` or holding exact zeros.

    graph = from_torch(module, x, sparsity="auto")      # nncompile.frontend.fx.from_torch

* Pruned modules (a ``weight_orig`` parameter, a ``weight_mask`` buffer and a forward pre-hook): a copy
  of the module is made permanent (``prune.remove``) before capture, and the mask becomes the weight's
  fixed sparsity pattern (exactly the kept entries, even a kept weight that happens to be zero).
* ``sparsity="auto"``: any other float weight of rank >= 2 with at least ``min_sparsity`` of its entries
  at most ``threshold`` in magnitude gets the pattern of its larger entries (the small ones are zeroed).

The pattern becomes a ``Sparsity(kind="mask")`` on the parameter's type; the mask is stored as a
content-addressed ``.npy`` in the build cache (``<cache>/sparse_masks``), so the compiled code and the
build cache key follow it. Training keeps the pattern (``autodiff`` masks those gradients).
"""
from __future__ import annotations

import copy
import hashlib

import numpy as np

from nncompile.errors import InputError
from nncompile.ir.builder import GraphBuilder
from nncompile.ir.graph import Graph
from nncompile.ir.types import Sparsity, TensorType

STATE_KEY = "torch_name"


def pruned_copy(module):
    """(module, {state_dict name of a pruned tensor: bool mask}); the module copied and made
    permanent when it has prune hooks, else returned as is."""
    import torch.nn.utils.prune as prune

    masks = {}
    found = []
    for prefix, sub in module.named_modules():
        for hook in sub._forward_pre_hooks.values():
            methods = getattr(hook, "_pruning_methods", None) or ((hook,) if isinstance(hook, prune.BasePruningMethod) else ())
            for method in methods:
                name = method._tensor_name
                mask = getattr(sub, f"{name}_mask", None)
                if mask is not None:
                    masks[f"{prefix}.{name}" if prefix else name] = mask.detach().cpu().numpy() != 0
                    found.append((prefix, name))
    if not found:
        return module, masks
    found = list(dict.fromkeys(found))
    subs = dict(module.named_modules())
    stashed = [(subs[prefix], name, subs[prefix].__dict__.pop(name, None)) for prefix, name in found]
    try:  # the computed (non-leaf) weight attribute cannot be deep-copied: copy without it
        module = copy.deepcopy(module)
    finally:
        for sub, name, value in stashed:
            if value is not None:
                sub.__dict__[name] = value
    subs = dict(module.named_modules())
    for prefix, name in found:
        sub = subs[prefix]
        sub.__dict__[name] = getattr(sub, f"{name}_orig") * getattr(sub, f"{name}_mask")
        prune.remove(sub, name)
    return module, masks


def mask_file(mask: np.ndarray) -> str:
    """A content-addressed .npy of ``mask`` in the build cache; returns its path."""
    from nncompile.codegen.build import cache_root

    mask = np.ascontiguousarray(mask, dtype=bool)
    digest = hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask).tobytes()).hexdigest()[:20]
    folder = cache_root() / "sparse_masks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.npy"
    if not path.exists():
        tmp = folder / f"{digest}.{id(mask)}.tmp.npy"
        np.save(tmp, mask)
        tmp.replace(path)
    return str(path)


def apply_sparsity(graph: Graph, sparsity=None, masks: dict | None = None, *, threshold: float = 0.0,
                   min_sparsity: float = 0.5) -> Graph:
    """``graph`` with fixed sparsity patterns on its given weights (see the module docstring)."""
    if sparsity not in (None, "auto"):
        raise InputError(f"sparsity= must be None or 'auto', got {sparsity!r}")
    if not 0.0 <= min_sparsity <= 1.0 or threshold < 0:
        raise InputError(f"sparsity: need 0 <= min_sparsity <= 1 and threshold >= 0, got {min_sparsity}, {threshold}")
    masks = dict(masks or {})
    new_types: dict[str, TensorType] = {}
    values: dict[str, np.ndarray] = {}
    for p in graph.params:
        value = graph.weights.get(p.name)
        if value is None or p.type.sparsity is not None or not p.type.is_float or p.type.rank < 2:
            continue
        source = p.init.args.get(STATE_KEY, p.name) if p.init is not None else p.name
        mask = masks.get(source)
        if mask is None and sparsity == "auto" and p.trainable:
            keep = np.abs(value) > threshold
            if keep.size and 1.0 - keep.mean() >= min_sparsity:
                mask = keep
        if mask is None or mask.shape != p.type.shape:
            continue
        new_types[p.name] = TensorType(p.type.shape, p.type.dtype, Sparsity("mask", path=mask_file(mask)))
        values[p.name] = np.where(mask, value, 0).astype(value.dtype)
    if not new_types:
        return graph
    b = GraphBuilder(graph.name)
    for item in graph.inputs:
        b.input(item.name, item.type, item.loc)
    for p in graph.params:
        b.param(p.name, new_types.get(p.name, p.type), p.init, trainable=p.trainable, loc=p.loc,
                value=values.get(p.name, graph.weights.get(p.name)))
    for node in graph.nodes:
        b.add_node(node)
    b.outputs = list(graph.outputs)
    b.train = graph.train
    return b.build()
