"""Multi-process training on one node: torchrun's environment, the process group and cross-rank means.

``torchrun --standalone --nproc-per-node N -m weakshot train ...`` (or ``python -m weakshot train --gpus N``,
which launches that) starts N copies of the training job. Each reads its place from the environment torchrun
sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), takes its share of every global batch (``train.batch_size``
is the global batch, as detectron2's IMS_PER_BATCH) and averages gradients with the others through
DistributedDataParallel: NCCL on GPUs, gloo on CPU (what the tests use). A plain ``python -m weakshot train``
is a world of one and none of this is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the model and the log; the others only train."""
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.size:
            raise ValueError(
                f"train.batch_size {global_batch} does not split evenly over {self.size} processes; "
                "use a multiple of the number of GPUs"
            )
        return global_batch // self.size

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over ranks (itself in a world of one). A collective: every rank must call it."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over ranks (a collective, as :meth:`sum`)."""
        return self.sum(value) / self.size

    def count_share(self, counts: Tensor, minimum: Tensor) -> Tensor:
        """What each rank divides its loss sums by (the criterion's ``count_share``): the global count,
        clamped to ``minimum``, over the number of ranks. With DDP's gradient mean, each loss is then the
        global batch's mean, as one process with the whole batch computes it."""
        return torch.maximum(self.sum(counts), minimum) / self.size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world_from_env() -> World:
    """This process's place as torchrun describes it (a world of one without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)


def init_world(device: torch.device) -> World:
    """Join the process group when torchrun started several processes; pick this rank's GPU."""
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        return world
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
