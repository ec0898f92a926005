"""Process-group and device set-up shared by every launcher and plan.

Workers learn their place from the standard torch variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), set by torch's elastic launcher locally and by our
SLURM entry point on clusters, so the trainer never knows how it was started.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed() -> DistEnv:
    """Join the process group if the environment says there is one."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device),
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=int(os.environ.get("LLM_LAUNCHER_PG_TIMEOUT_MIN", 30))),
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum a few scalars over all ranks of `group` (one collective); `device` must suit the
    group's backend (CPU for gloo)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (used to agree on stopping)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
