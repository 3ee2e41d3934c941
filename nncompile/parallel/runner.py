"""Run a plan on torch.distributed: TP, ZeRO-3 (FSDP2), DP, checkpointing and 1F1B pipelining.

Every rank builds the same full model (same seed), keeps its pipeline stage's part and applies the
plan layer by layer:

* a ``DeviceMesh`` per activation layout (``pp x dp x tp``, TP ranks consecutive or strided);
* ``parallelize_module`` with ``ColwiseParallel``/``RowwiseParallel`` on the block's ``TP_PLAN``;
* ``checkpoint_wrapper`` for checkpointed layers;
* ``fully_shard`` (FSDP2) over the DP mesh for sharded-DP layers; a gradient all-reduce over the DP
  group after the backward (DDP-style) for plain DP layers;
* ``torch.distributed.pipelining`` with ``Schedule1F1B`` when ``pp_deg > 1``.

Gradient semantics: every rank's loss is ``sum of its samples' losses / global batch``; a tensor a
rank holds carries the exact gradient of the global loss for the samples it holds. Between layers of
different layouts the activations are re-laid (all-gather forward; all-reduce of the scattered
gradient, divided by how many ranks hold each slice, backward). DP and FSDP gradients are then
*summed* over the DP group (FSDP2's divide factor set to 1), and pipeline gradients are not divided
by the micro-batch count (``scale_grads=False``), so no averaging needs undoing.

The embedding and head run replicated on their stage's ranks over the whole micro-batch.

    losses = run_plan(plan, model_factory, batches, lr)     # inside an initialized process group
    results = launch(worker, world_size=4, args=(...))      # gloo ranks via torch.multiprocessing
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from nncompile.errors import InputError
from nncompile.parallel.plan import Plan
from nncompile.parallel.runner_model import TP_PLAN, sample_loss_sum


class _Relayout(torch.autograd.Function):
    """Move a micro-batch from one DP slicing of the stage's ranks to another (see module doc)."""

    @staticmethod
    def forward(ctx, x, group, stage_size, src, dst):
        (src_dp, src_index, src_owners), (dst_dp, dst_index, dst_holders) = src, dst
        if src_dp == 1:
            full = x
        else:
            parts = [torch.empty_like(x) for _ in range(stage_size)]
            dist.all_gather(parts, x.contiguous(), group=group)
            full = torch.cat([parts[owner] for owner in src_owners], dim=0)
        ctx.group, ctx.full_shape = group, full.shape
        ctx.src, ctx.dst_index, ctx.dst_dp, ctx.dst_holders = (src_dp, src_index), dst_index, dst_dp, dst_holders
        rows = full.shape[0] // dst_dp
        return full[dst_index * rows:(dst_index + 1) * rows].clone()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.full_shape)
        rows = ctx.full_shape[0] // ctx.dst_dp
        full[ctx.dst_index * rows:(ctx.dst_index + 1) * rows] = grad
        dist.all_reduce(full, group=ctx.group)
        full /= ctx.dst_holders
        src_dp, src_index = ctx.src
        rows = ctx.full_shape[0] // src_dp
        return full[src_index * rows:(src_index + 1) * rows], None, None, None, None


class _Layout:
    """How a stage's ranks slice the micro-batch: ``dp`` slices, each held by ``tp`` ranks."""

    def __init__(self, tp: int, consec: bool, stage_size: int, local_rank: int):
        self.tp, self.dp, self.consec = tp, stage_size // tp, consec
        self.key = (tp, consec if tp > 1 and self.dp > 1 else True)
        if self.key[1]:
            self.dp_index = local_rank // tp
            self.owners = [j * tp for j in range(self.dp)]
        else:
            self.dp_index = local_rank % self.dp
            self.owners = list(range(self.dp))

    def source(self):
        return (self.dp, self.dp_index, self.owners)

    def target(self):
        return (self.dp, self.dp_index, self.tp)


class _StageModule(nn.Module):
    """Embedding (first stage) -> re-laid blocks -> full micro-batch -> head (last stage)."""

    def __init__(self, embed, blocks, layouts, head, group, stage_size, local_rank):
        super().__init__()
        self.embed, self.head = embed, head
        self.blocks = nn.ModuleList(blocks)
        self.layouts = layouts
        self.group, self.stage_size = group, stage_size
        self.full = _Layout(stage_size, True, stage_size, local_rank)

    def _move(self, x, src: _Layout, dst: _Layout):
        if src.key == dst.key:
            return x
        return _Relayout.apply(x, self.group, self.stage_size, src.source(), dst.target())

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        current = self.full
        for block, layout in zip(self.blocks, self.layouts):
            x = block(self._move(x, current, layout))
            current = layout
        x = self._move(x, current, self.full)
        if self.head is not None:
            x = self.head(x)
        return x


def _tensor_parallel(block: nn.Module, mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(block, mesh, {name: styles[kind]() for name, kind in TP_PLAN.items()})


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PlanRunner:
    """Builds this rank's part of ``model`` under ``plan``; ``step`` trains one global batch."""

    def __init__(self, plan: Plan, model: nn.Module, lr: float):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world, rank = dist.get_world_size(), dist.get_rank()
        setting = plan.setting
        P = setting.pp_deg
        if world % P or len(plan.strategies) != len(model.blocks) or sum(plan.division) != len(model.blocks):
            raise InputError(f"plan for {len(plan.strategies)} layers in {P} stages does not fit "
                             f"{len(model.blocks)} blocks on {world} ranks")
        D = world // P
        self.plan, self.rank, self.stage, self.D = plan, rank, rank // D, D
        local = rank % D
        # every group is created on every rank, in the same order (a collective)
        stage_groups = [dist.new_group(list(range(k * D, (k + 1) * D))) for k in range(P)]
        self.pp_groups = [dist.new_group([j + k * D for k in range(P)]) for j in range(D)] if P > 1 else None
        meshes = {}
        for s in sorted({s.layout for s in plan.strategies}):
            tp, consec = s
            shape, names = ((P, D // tp, tp), ("pp", "dp", "tp")) if consec else ((P, tp, D // tp), ("pp", "tp", "dp"))
            meshes[s] = init_device_mesh("cpu", shape, mesh_dim_names=names)
        lo = sum(plan.division[:self.stage])
        hi = lo + plan.division[self.stage]
        blocks, layouts, self.dp_synced = [], [], []
        for i in range(lo, hi):
            s, block = plan.strategies[i], model.blocks[i]
            mesh = meshes[s.layout]
            if s.tp > 1:
                _tensor_parallel(block, mesh["tp"])
            if s.ckpt:
                block = checkpoint_wrapper(block)
            if s.dp > 1 and s.sdp:
                fsdp = fully_shard(block, mesh=mesh["dp"])
                fsdp.set_gradient_divide_factor(1.0)
            elif s.dp > 1:
                self.dp_synced.append((block, mesh["dp"].get_group()))
            blocks.append(block)
            layouts.append(_Layout(s.tp, s.tp_consec, D, local))
        embed = model.embed if self.stage == 0 else None
        head = model.head if self.stage == P - 1 else None
        self.module = _StageModule(embed, blocks, layouts, head, stage_groups[self.stage], D, local)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr)
        self.schedule = None
        if P > 1:
            self.schedule_args = (model, setting)
        self.first, self.last = self.stage == 0, self.stage == P - 1

    def _pipeline(self, tokens: torch.Tensor):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        model, setting = self.schedule_args
        micro = tokens.shape[0] // setting.chunks
        seq, width = tokens.shape[1], model.config["d_model"]
        dtype = next(model.parameters()).dtype
        # example tensors give the static p2p shapes; requires_grad marks which gradients flow back
        hidden = torch.zeros(micro, seq, width, dtype=dtype, requires_grad=True)
        example_in = tokens[:micro] if self.first else hidden
        logits = torch.zeros(micro, seq, model.config["vocab"], dtype=dtype, requires_grad=True)
        example_out = logits if self.last else hidden
        stage = PipelineStage(self.module, self.stage, setting.pp_deg, torch.device("cpu"),
                              input_args=(example_in,), output_args=(example_out,),
                              group=self.pp_groups[self.rank % self.D])
        batch = tokens.shape[0]
        self.schedule = Schedule1F1B(stage, setting.chunks, loss_fn=lambda out, y: sample_loss_sum(out, y) / batch,
                                     scale_grads=False)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float | None:
        """Train on one global batch (every rank passes the whole batch); the loss on last-stage ranks."""
        self.optimizer.zero_grad()
        batch, chunks = tokens.shape[0], self.plan.setting.chunks
        loss = None
        if self.plan.setting.pp_deg == 1:
            loss = 0.0
            for x, y in zip(tokens.chunk(chunks), targets.chunk(chunks)):
                part = sample_loss_sum(self.module(x), y) / batch
                part.backward()
                loss += part.item()
        else:
            if self.schedule is None:
                self._pipeline(tokens)
            losses = []
            if self.first:
                self.schedule.step(tokens)
            elif self.last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
            if self.last:
                loss = float(sum(part.item() for part in losses))
        for block, group in self.dp_synced:       # one bucket per block, like DDP's buckets
            grads = [_local(p.grad) for p in block.parameters() if p.grad is not None]
            if grads:
                bucket = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(bucket, group=group)
                offset = 0
                for g in grads:
                    g.copy_(bucket[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        self.optimizer.step()
        return loss

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """This stage's parameters, unsharded (collective within the stage)."""
        out = {}
        for name, p in self.module.named_parameters():
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("_checkpoint_wrapped_module.", "")] = value.detach().clone()
        return out


def run_plan(plan: Plan, model: nn.Module, batches, lr: float) -> dict:
    """Train ``model`` on ``batches`` under ``plan`` in the current process group.

    Returns, on every rank: ``losses`` (per step, from the last stage, broadcast), ``step_ms``
    (wall time per step after the first, max over ranks) and ``params`` (this rank's stage, full).
    """
    runner = PlanRunner(plan, model, lr)
    losses, times = [], []
    for tokens, targets in batches:
        dist.barrier()
        start = time.perf_counter()
        loss = runner.step(tokens, targets)
        times.append(time.perf_counter() - start)
        value = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64)
        last = dist.get_world_size() - 1
        dist.broadcast(value, src=last)
        losses.append(value.item())
    timing = torch.tensor([sum(times[1:]) / max(len(times) - 1, 1) * 1000.0])
    dist.all_reduce(timing, op=dist.ReduceOp.MAX)
    return {"losses": losses, "step_ms": timing.item(), "stage": runner.stage, "params": runner.full_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, args: tuple = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (torch.multiprocessing spawn)."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def plans_worker(rank: int, world: int, plans: list[dict], model_kwargs: dict, steps: int, batch: int,
                 lr: float, out_dir: str) -> None:
    """Train a fresh ``TinyGPT(**model_kwargs)`` under each plan (Galvatron JSON dicts) in turn.

    Writes ``out_dir/plan{i}.json`` (losses, step ms; rank 0) and ``out_dir/plan{i}_stage{k}.pt`` (full
    parameters of stage k after training; first rank of each stage).
    """
    import json

    from nncompile.parallel.plan import plan_from_json
    from nncompile.parallel.runner_model import TinyGPT, make_batches

    out = Path(out_dir)
    for index, raw in enumerate(plans):
        model = TinyGPT(**model_kwargs)
        plan = plan_from_json(raw, world, len(model.blocks))
        batches = make_batches(steps, batch, model.config["seq"], model.config["vocab"])
        result = run_plan(plan, model, batches, lr)
        D = world // plan.setting.pp_deg
        if rank % D == 0:
            torch.save(result["params"], out / f"plan{index}_stage{result['stage']}.pt")
        if rank == 0:
            (out / f"plan{index}.json").write_text(json.dumps({"losses": result["losses"], "step_ms": result["step_ms"]}))
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node 4 -m nncompile.parallel.runner PLAN.json [--steps N] [--check]``: train
    a TinyGPT under a plan (Galvatron's JSON format) and print the losses on rank 0; ``--check`` also
    trains it in one process and prints the largest loss difference."""
    import argparse
    import json

    from nncompile.parallel.plan import plan_from_json
    from nncompile.parallel.runner_model import TinyGPT, make_batches

    parser = argparse.ArgumentParser(prog="python -m nncompile.parallel.runner", description=main.__doc__)
    parser.add_argument("plan")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--check", action="store_true", help="compare the losses with single-process training")
    args = parser.parse_args(argv)
    from nncompile.errors import NNError
    from nncompile.parallel.profile import read_json

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world < 1:
        print("error: launch with torchrun (WORLD_SIZE is not set), e.g. "
              "torchrun --nproc-per-node 4 -m nncompile.parallel.runner PLAN.json", file=sys.stderr)
        return 2
    try:
        plan = plan_from_json(read_json(Path(args.plan), "plan"), world, args.layers)
    except NNError as err:
        print(err if str(err).startswith("error") else f"error: {err}", file=sys.stderr)
        return 2
    dist.init_process_group(args.backend)
    try:
        model = TinyGPT(n_layer=args.layers)
        batches = make_batches(args.steps, plan.setting.global_bsz, model.config["seq"], model.config["vocab"])
        result = run_plan(plan, model, batches, args.lr)
        if dist.get_rank() == 0:
            figures = {"losses": result["losses"], "step_ms": round(result["step_ms"], 3)}
            if args.check:
                from nncompile.parallel.runner_model import train_single_process

                reference = train_single_process(TinyGPT(n_layer=args.layers), batches, args.lr)
                figures["max_loss_diff_vs_single_process"] = max(abs(a - b) for a, b in zip(result["losses"], reference))
            print(json.dumps(figures))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
