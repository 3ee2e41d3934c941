"""Measure what the cost model needs on the machine at hand: a torch chain model's per-layer costs
and the process group's collective bandwidths (a cluster file for the gloo/NCCL ranks in use).

``profile_chain`` times one block's forward at a few batch sizes, counts its parameters and the
bytes autograd saves for backward (``saved_tensors_hooks``), and times the head + loss, giving a
``ModelCost`` in the same units as Galvatron's profiles. ``calibrate_worker`` (run on every rank)
times all-reduces over consecutive and strided rank groups, point-to-point sends, and how much
slower a rank computes while all ranks compute (shared cores), and writes a cluster file in
Galvatron's table format (overlap coefficient 2: the runner's DP all-reduce follows the backward).

    model_cost = profile_chain(TinyGPT(...), batch_sizes=(1, 4, 16))
    launch(calibrate_worker, 4, (out_dir,))           # -> out_dir/cluster.json
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nncompile.parallel.model import LayerCost, ModelCost, VocabCost
from nncompile.parallel.runner_model import sample_loss_sum

MB = 2.0**20


def _time_ms(fn, repeats: int = 7) -> float:
    """Fastest of ``repeats`` runs: on a shared machine the minimum is the least disturbed figure."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return min(samples)


def _saved_mb(fn, module=None) -> float:
    """MiB autograd keeps for backward while running ``fn`` (the module's own weights excluded)."""
    weights = {p.data_ptr() for p in module.parameters()} if module is not None else set()
    total = [0]

    def pack(t):
        if t.data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / MB


def profile_chain(model, batch_sizes=(1, 4, 16), replicas: int = 1) -> ModelCost:
    """Per-layer costs of a model with ``embed``/``blocks``/``head`` (blocks assumed identical).

    ``replicas``: how many ranks compute the head redundantly over the whole micro-batch (the plan
    runner does so over a stage's ranks), so its time is scaled to the cost model's data-parallel view.
    """
    cfg = model.config
    dtype = next(model.parameters()).dtype
    block, head = model.blocks[0], model.head
    points, head_points = [], []
    for b in batch_sizes:
        x = torch.randn(b, cfg["seq"], cfg["d_model"], dtype=dtype)
        y = torch.randint(0, cfg["vocab"], (b, cfg["seq"]))
        with torch.no_grad():
            points.append((b, _time_ms(lambda: block(x)) / b))
            head_points.append((b, _time_ms(lambda: sample_loss_sum(head(x), y)) * replicas / b))
    x = torch.randn(1, cfg["seq"], cfg["d_model"], dtype=dtype, requires_grad=True)
    act = _saved_mb(lambda: block(x), block)
    param_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    boundary = cfg["seq"] * cfg["d_model"] * torch.finfo(dtype).bits / 8 / MB
    layer = LayerCost("block", fwd_ms_points=tuple(points), param_mb=param_bytes / MB,
                      act_mb_per_sample={1: act}, ckpt_act_mb_per_sample=boundary,
                      boundary_mb_per_sample=boundary, tp_allreduces=2)
    vocab_states = 4 * sum(p.numel() * p.element_size() for p in head.parameters()) / MB
    embed_states = 4 * sum(p.numel() * p.element_size() for p in model.embed.parameters()) / MB
    head_act = _saved_mb(lambda: sample_loss_sum(head(x), torch.zeros(1, cfg["seq"], dtype=torch.long)), head)
    vocab = VocabCost({1: embed_states + vocab_states}, {1: head_act}, {1: embed_states}, {1: 0.0},
                      {1: vocab_states}, {1: head_act}, fwd_ms_points_last=tuple(head_points))
    # wire bytes per element = the parameters' own size: mixed_precision=False sends 4 bytes per
    # "fp32 MB", and param_mb above counts the parameters' real bytes
    return ModelCost("torch-chain", (layer,) * len(model.blocks), vocab, mixed_precision=False,
                     info={"config": cfg, "dtype": str(dtype)})


def _bus_bandwidth_gbps(ranks: list[int], nbytes: int, repeats: int) -> float:
    group = dist.new_group(ranks)
    if dist.get_rank() not in ranks:
        return 0.0
    buf = torch.zeros(nbytes // 4, dtype=torch.float32)
    dist.all_reduce(buf, group=group)
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        dist.all_reduce(buf, group=group)
        times.append(time.perf_counter() - start)
    n = len(ranks)
    return 2 * (n - 1) / n * nbytes / statistics.median(times) / 2**30


def _concurrent_compute_speed(rank: int, matmuls: int = 20, repeats: int = 7) -> float:
    """Compute speed of a rank while all ranks compute, relative to one rank computing alone
    (below 1 when ranks share cores)."""
    a = torch.randn(256, 256, dtype=torch.float64)
    work = lambda: [a @ a for _ in range(matmuls)]  # noqa: E731
    dist.barrier()
    alone = _time_ms(work, repeats) if rank == 0 else 0.0
    dist.barrier()
    together = torch.tensor([_time_ms(work, repeats)])
    dist.all_reduce(together, op=dist.ReduceOp.MAX)
    alone_t = torch.tensor([alone])
    dist.broadcast(alone_t, src=0)
    return min(1.0, alone_t.item() / together.item())


def calibrate_worker(rank: int, world: int, out_dir: str, nbytes: int = 4 * 2**20, repeats: int = 5,
                     matmuls: int = 20) -> None:
    """Measure all-reduce (consecutive / strided groups) and p2p bandwidth, latency and the compute
    speed with all ranks busy (``matmuls`` 256x256 products per timing); rank 0 writes cluster.json."""
    table = {}
    size = 2
    while size <= world:
        for consec in (1, 0):
            if consec == 0 and size == world:
                continue
            stride = 1 if consec else world // size
            groups = ([list(range(start, start + size)) for start in range(0, world, size)] if consec
                      else [list(range(start, world, stride)) for start in range(stride)])
            mine = 0.0
            for ranks in groups:       # every group is created on every rank (collective)
                value = _bus_bandwidth_gbps(ranks, nbytes, repeats)
                mine = value if rank in ranks else mine
            measured = torch.tensor([mine])
            dist.all_reduce(measured, op=dist.ReduceOp.MIN)
            table[f"allreduce_size_{size}_consec_{consec}"] = measured.item()
        size *= 2
    speed = _concurrent_compute_speed(rank, matmuls, max(3, repeats))
    tiny = torch.zeros(1)
    lat = []
    for _ in range(repeats * 4):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tiny)
        lat.append((time.perf_counter() - start) * 1000.0)
    latency = torch.tensor([statistics.median(lat)])
    dist.all_reduce(latency, op=dist.ReduceOp.MAX)
    buf = torch.zeros(nbytes // 4)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append(time.perf_counter() - start)
    p2p = torch.tensor([2 * nbytes / statistics.median(times) / 2**30 if rank == 0 else 0.0])
    dist.broadcast(p2p, src=0)
    if rank == 0:
        cluster = {"name": f"measured-{world}-ranks", "nodes": 1, "devices_per_node": world, "memory_mb": 1e6,
                   "allreduce_bandwidth": table,
                   "p2p_bandwidth": {f"pp_size_{p}": p2p.item() for p in (2, 4, 8) if p <= world},
                   "overlap_coefficient": 2.0, "context_memory_mb": 0, "compute_speed": speed,
                   "latency_ms": latency.item()}
        (Path(out_dir) / "cluster.json").write_text(json.dumps(cluster, indent=2))
