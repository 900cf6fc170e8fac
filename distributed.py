"""Data-parallel training over the ranks torchrun starts: all that train.py asks of torch.distributed.

    torchrun --standalone --nproc-per-node 8 train.py --grad-accum 2 ...   # 8 GPUs, 16 micro-batches a step

Every rank holds the frozen base and the adapter. The order of examples is global (set by the seed);
each optimizer step takes --grad-accum x world-size micro-batches of it, and rank r runs micro-batches
r, r + N, ... of them. The loss is normalised by the answer tokens of the WHOLE step (every rank counts
them from the global order, no communication), so summing the adapter's gradients over the ranks gives
exactly the single-process step with N times the accumulation. That sum is one all_reduce of one flat
buffer per optimizer step, after the backward and before clipping: it works however the gradients were
made (autograd, or the CUDA-graph step writing p.grad itself), which DDP's backward hooks would not.

Without torchrun's environment (RANK and WORLD_SIZE unset) the World is one rank and nothing here
communicates: a single-process run does exactly what it did before.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train_config import UsageError

# A rank that waits longer than this for the others (one crashed, or hangs) fails with an error
# instead of hanging; torchrun then stops every rank. Long enough for rank 0's evaluation and saves.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: rank 0 of 1 without torchrun."""
    rank: int = 0
    size: int = 1
    device: str = "cpu"   # where the tensors of collectives live: cuda with NCCL, cpu with gloo

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs metrics.jsonl, holds the folder's lock and writes checkpoints."""
        return self.rank == 0

    def share(self, micro_batches: list) -> list:
        """This rank's micro-batches of one optimizer step: r, r + N, ... (all of them on one rank)."""
        return micro_batches[self.rank::self.size]

    def sum_step(self, params: list[torch.Tensor], loss):
        """Sum every param's .grad and the loss over the ranks, in place; return the summed loss.

        One all_reduce of one flat float32 buffer (the grads in the params' order, then the loss): the same
        bits on every rank, so every rank clips and steps its copy of the adapter identically. A rank whose
        share of the step was empty adds zeros.
        """
        if self.size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] +
                         [torch.as_tensor(loss, dtype=torch.float32, device=grads[0].device).reshape(1)])
        dist.all_reduce(flat)
        at = 0
        for p, g in zip(params, grads):
            p.grad = g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()
        return flat[at]

    def max(self, value: int) -> int:
        """The largest of the ranks' values (a stop signal's number, 0 for none): one decision for all."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def from_rank0(self, value):
        """Rank 0's value (picklable, small) on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: list) -> list[list]:
        """Every rank's `items` (picklable), in rank order, on every rank: [items] on one rank."""
        if self.size == 1:
            return [items]
        parts = [None] * self.size
        dist.all_gather_object(parts, items)
        return parts

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the block before the others do (it writes what they then read: data, a damaged
        checkpoint set aside). If it fails there, it says why and the others stop with one line too."""
        if self.size == 1:
            yield
        elif self.main:
            try:
                yield
            except BaseException:
                self.from_rank0(False)
                raise
            self.from_rank0(True)
        elif not self.from_rank0(None):
            raise UsageError(f"rank {self.rank}: rank 0 stopped while starting (its message says why); "
                             "every rank stops")
        else:
            yield


def start() -> World:
    """The World torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK), its process group
    started: NCCL with one GPU a rank (LOCAL_RANK's), gloo on the CPU. Without it, one rank, no group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)   # before anything touches CUDA: each rank on its own GPU
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local))
        return World(rank, size, f"cuda:{local}")
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return World(rank, size, "cpu")


def finish(world: World):
    """Close the process group (nothing to do on one rank)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def global_config(config: dict, world: World) -> dict:
    """The settings that define the computation, with --grad-accum as micro-batches per optimizer step over
    ALL ranks: a checkpoint of 2 ranks x 2 resumes on 1 rank x 4 (the same steps), never on 1 x 2."""
    return {**config, "grad_accum": config["grad_accum"] * world.size}
