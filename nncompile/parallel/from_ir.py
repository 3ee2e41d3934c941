"""Per-layer costs of a ``.nn`` / IR model for the parallelism search, from the op table's cost rules.

The chain is the model's repeated block: nodes named ``PREFIX.<i>.*`` (what ``repeat N Block(...) as
PREFIX`` produces), the prefix with the most repetitions. Nodes before the first block are the
embedding (first pipeline stage), nodes after the last one the head and loss (last stage). Per block:

* forward time = FLOPs (the ops' ``cost`` rules) at ``device_tflops`` sustained;
* ``param_mb`` = bytes of the parameters its nodes read;
* activations kept for backward = bytes of every node output in the block (no reuse: an upper
  bound); under TP of degree ``t`` outputs shaped like the block's output (layer norms, residual
  adds, row-parallel outputs: replicated under Megatron TP) stay whole, the others are split ``t``
  ways;
* boundary = the block's output; checkpointing keeps the block's input (the same size).

Figures are per sample: the graph's batch is its inputs' leading dimension, ``B``.

    graph = nnc.parse("examples/gpt.nn", set={"B": 8})
    model = model_cost_from_graph(graph, device_tflops=100.0)
"""
from __future__ import annotations

import re
from collections import defaultdict

from nncompile.errors import InputError, MissingRuleError
from nncompile.parallel.model import LayerCost, ModelCost, VocabCost

MB = 2.0**20
_BLOCK = re.compile(r"^([A-Za-z_][\w.]*?)\.(\d+)\.")


def _chain_prefix(names: list[str]) -> str:
    indices = defaultdict(set)
    for name in names:
        match = _BLOCK.match(name)
        if match:
            indices[match.group(1)].add(int(match.group(2)))
    if not indices:
        raise InputError("the model has no repeated block (nodes named PREFIX.0.*, PREFIX.1.*, ...: "
                         "write the layers with 'repeat N Block(...) as PREFIX')")
    return max(indices, key=lambda prefix: (len(indices[prefix]), prefix))


def _node_flops(graph, node) -> float:
    from nncompile.ops.base import get_op

    opdef = get_op(node.op)
    in_types = [graph.type_of(name) for name in node.inputs]
    try:
        return float(opdef.rule("cost")(node.type, *opdef.split_inputs(in_types), **node.attrs).flops)
    except MissingRuleError:
        return 0.0


def model_cost_from_graph(graph, device_tflops: float, tp_allreduces: int = 2) -> ModelCost:
    """A ``ModelCost`` for ``graph`` (an IR Graph): one ``LayerCost`` per repeated block."""
    if device_tflops <= 0:
        raise InputError(f"device TFLOP/s must be positive, got {device_tflops}")
    if not graph.inputs or not graph.inputs[0].type.shape:
        raise InputError(f"model {graph.name}: no batched input to read the batch size from")
    batch = int(graph.inputs[0].type.shape[0])
    prefix = _chain_prefix([node.name for node in graph.nodes])
    param_bytes = {p.name: p.type.nbytes for p in graph.params}
    groups: dict[object, list] = defaultdict(list)      # block index, "first" or "last" -> nodes
    seen_block = False
    for node in graph.nodes:
        match = _BLOCK.match(node.name)
        if match and match.group(1) == prefix:
            groups[int(match.group(2))].append(node)
            seen_block = True
        else:
            groups["last" if seen_block else "first"].append(node)
    owner = {}
    for key, nodes in groups.items():
        for node in nodes:
            for name in node.inputs:
                if name in param_bytes and name not in owner:
                    owner[name] = key
    blocks = sorted(k for k in groups if isinstance(k, int))
    if blocks != list(range(len(blocks))):
        raise InputError(f"model {graph.name}: blocks {prefix}.* are not numbered 0..{len(blocks) - 1} in order")

    def group_params(key) -> float:
        return sum(size for name, size in param_bytes.items() if owner.get(name) == key)

    layers = []
    for index in blocks:
        nodes = groups[index]
        out_type = nodes[-1].type
        flops = sum(_node_flops(graph, node) for node in nodes)
        whole = sum(n.type.nbytes for n in nodes if n.type.shape == out_type.shape)
        split = sum(n.type.nbytes for n in nodes if n.type.shape != out_type.shape)
        acts = {t: (whole + split / t) / batch for t in (1, 2, 4, 8)}
        layers.append(LayerCost.from_counts(
            f"{prefix}.{index}", flops / batch, device_tflops, group_params(index), acts,
            out_type.nbytes / batch, tp_allreduces=tp_allreduces))

    def vocab_ms(key) -> tuple:
        flops = sum(_node_flops(graph, node) for node in groups.get(key, []))
        return ((1, flops / batch / (device_tflops * 1e12) * 1e3),)

    def vocab_act(key) -> float:
        return sum(n.type.nbytes for n in groups.get(key, []) if n.type.shape and n.type.shape[0] == batch) / batch / MB

    first_states, last_states = 4 * group_params("first") / MB, 4 * group_params("last") / MB
    vocab = VocabCost({1: first_states + last_states}, {1: vocab_act("first") + vocab_act("last")},
                      {1: first_states}, {1: vocab_act("first")}, {1: last_states}, {1: vocab_act("last")},
                      fwd_ms_points_first=vocab_ms("first"), fwd_ms_points_last=vocab_ms("last"))
    # f32 models: the wire carries 4 bytes per element; model states stay 16 bytes per parameter
    return ModelCost(graph.name, tuple(layers), vocab, mixed_precision=False,
                     info={"source": "ir", "batch": batch, "chain": prefix, "device_tflops": device_tflops})
