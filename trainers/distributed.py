"""Process-group and device set-up shared by every launcher and plan.

Workers learn their place from the standard torch variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), set by torch's elastic launcher locally and by our
SLURM entry point on clusters, so the trainer never knows how it was started.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def free_port() -> int:
    """A port nothing listens on now, for a rendezvous on this machine (another process
    may still take it before the rendezvous binds it: good enough for local launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None, trace_dir: Path | None = None) -> DistEnv:
    """Join the process group if the environment says there is one.

    `timeout_s` bounds every collective (30 minutes when None); the loop passes a little
    more than its hang watchdog's longest allowance, so the watchdog, which leaves stacks
    behind, fires first. NCCL's own flight recorder dump on a timeout goes to `trace_dir`."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local_rank)
    if world > 1 and not dist.is_initialized():
        backend = backend_for(device)
        hang_settings(backend, trace_dir)
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=30),
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def hang_settings(backend: str, trace_dir: Path | None) -> None:
    """Evidence and behaviour for a collective that never completes (values the user
    exported win). Every backend keeps PyTorch's flight recorder, a ring of the last
    collectives each rank issued, which the hang watchdog dumps next to its stacks (a
    few hundred bytes per collective). NCCL also tears the process down on a timeout
    rather than leave it blocked on the GPU, and dumps the recorder itself."""
    defaults = {"TORCH_FR_BUFFER_SIZE": "2000"}
    if backend == "nccl":
        defaults.update({
            "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the name before torch 2.7
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        })
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            defaults["TORCH_FR_DUMP_TEMP_FILE"] = str(Path(trace_dir) / "nccl-flight-recorder-rank-")
            defaults["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = defaults["TORCH_FR_DUMP_TEMP_FILE"]
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def agree(value):
    """Rank 0's `value` on every rank (e.g. a name all ranks must share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
