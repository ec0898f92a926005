"""What the hardware actually did in a run, per rank: RUN_DIR/device/rank-<r>.json.

The launcher decides precision and backend from what the worker finds (`train.precision=auto`,
NCCL on a GPU, gloo on CPU), so only the worker can say what was picked; and the memory
estimate is only worth what a measured peak confirms. Nothing here has been observed on a
GPU by the CPU test suite, so scripts/gpu_check.py reads these files to hold the launcher
to its promises on a GPU machine: the compute dtype, the process group's backend and
torch.cuda.max_memory_allocated of every rank (the estimate is per GPU, so the largest rank
counts). Each rank writes its own file, with no collective, so a failing run still leaves
what its ranks saw.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.files import write_json


def device_record(env, compute_dtype: torch.dtype) -> dict:
    cuda = env.device.type == "cuda"
    return {
        "rank": env.rank, "world_size": env.world_size, "device": str(env.device),
        "device_name": torch.cuda.get_device_name(env.device) if cuda else "cpu",
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        # whole run: loading, training, evals and export (the estimate is the larger of loading and training)
        "cuda_max_memory_allocated": torch.cuda.max_memory_allocated(env.device) if cuda else None,
        "cuda_max_memory_reserved": torch.cuda.max_memory_reserved(env.device) if cuda else None,
    }


def record_device(run_dir: Path, env, compute_dtype: torch.dtype) -> None:
    """At the end of a run (completed or not): this rank's record. A record that cannot be
    written (a full disk) must not turn a finished run into a failed one."""
    out = Path(run_dir) / "device"
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"rank-{env.rank}.json", device_record(env, compute_dtype))
