"""Data-parallel training under ``torchrun``: process group set-up, rank queries and reductions.

``torchrun --nproc_per_node N -m diffusekit train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_distributed`` reads them. Without them training runs in one process. Backends: NCCL
on CUDA, gloo on CPU. Rank 0 alone writes checkpoints, logs and samples.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffusekit.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the process's CUDA device when CUDA is available, else CPU; or an explicit device name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name (examples: auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for but CUDA is not available")
    return device


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single-process env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        # a process that exits with the group still joined (a script calling Trainer.fit() without shutdown) can
        # abort in gloo's teardown ("terminate called without an active exception", SIGABRT): leave it at exit
        atexit.register(_leave_group)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (if one was joined)."""
    if env.distributed:
        _leave_group()


def _leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``value`` over all processes (identity in a single process)."""
    if not env.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (small, JSON-like objects only)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
