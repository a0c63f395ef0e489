"""Data parallel training under torchrun: this process's rank, joining the process group, the
mean of a value over the processes, and the command that starts a stage as torchrun workers."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_distributed(device: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=world_size)


def torchrun_command(module: str, argv: list[str], processes: int) -> list[str]:
    """The command that runs `python -m <module> <argv>` as `processes` torchrun workers on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", module, *argv]


def mean_over_processes(value, where: Distributed):
    """The mean of a scalar tensor over all processes (itself when alone)."""
    if where.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / where.world_size
    return value
