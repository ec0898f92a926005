"""launcher=local: do the workers fit this machine's free memory? Checked before spawning.

Each worker is a whole Python process: the interpreter, torch, transformers, PEFT and gloo
take a fixed HOST_PROCESS_MIB before any model state, DeepSpeed another DEEPSPEED_MIB under
the zero plans, and a launch of several workers keeps the launcher itself (torch's elastic
agent, which has imported torch and transformers to prepare the data) alive beside them:
LAUNCHER_MIB (each measured by bench/rank_fixed.py, docs/plans-and-memory.md "The fixed part
of a rank"). On CPU the model state itself (launch/estimate.py, device="cpu": parameters,
gradients, optimizer, activations, load peak) lives in the same RAM. On a GPU only the
offloaded state does. N workers that cannot fit would otherwise start, swap and get
killed one by one (64 workers of the tiny model held 23 GB of a 24 GiB machine).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from trainers.errors import UserError

MIB = 2**20
HOST_PROCESS_MIB = 470
DEEPSPEED_MIB = 150
LAUNCHER_MIB = 360


@dataclass
class HostNeed:
    per_rank: float  # bytes
    ranks: int
    available: float  # bytes
    model_state: float | None  # bytes per rank from the estimate (None: no architecture known)
    fixed_mib: int = HOST_PROCESS_MIB  # per process, before any model state
    launcher: float = 0.0  # bytes: the launcher process beside several workers

    @property
    def total(self) -> float:
        return self.per_rank * self.ranks + self.launcher

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def line(self) -> str:
        state = ("model state not estimated (no architecture)" if self.model_state is None
                 else f"{self.model_state / MIB:,.0f} MiB of model state")
        return (f"host memory: {self.ranks} local process(es) x {self.per_rank / MIB:,.0f} MiB "
                f"({self.fixed_mib} MiB per process for Python and the libraries + {state})"
                + (f" + {self.launcher / MIB:,.0f} MiB launcher" if self.launcher else "") + " = "
                f"{self.total / MIB:,.0f} MiB, of {self.available / MIB:,.0f} MiB available -> "
                + ("fits" if self.fits else "does NOT fit"))


def uses_gpu() -> bool:
    """Whether the workers will train on GPUs, read from the drivers rather than by importing
    torch (the launcher's checks stay light): NVIDIA's lists its GPUs under /proc, ROCm's
    exposes /dev/kfd."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def host_need(cfg: DictConfig) -> HostNeed:
    import psutil

    from launch.estimate import for_config

    est = for_config(cfg, "cpu")
    state = None
    if est is not None:
        if uses_gpu():  # only what the plan offloads to host RAM
            offload = est.setup.layout.offload
            state = sum(v for k, v in (("params", est.params), ("grads", est.grads), ("optim", est.optim))
                        if k in offload)
        else:
            state = est.total
    from parallel import plan_spec
    from parallel.specs import DeepSpeedZeroSpec

    ranks = int(cfg.launcher.nproc_per_node)
    fixed = HOST_PROCESS_MIB + (DEEPSPEED_MIB if isinstance(plan_spec(cfg.parallel.name), DeepSpeedZeroSpec) else 0)
    return HostNeed(fixed * MIB + (state or 0.0), ranks, float(psutil.virtual_memory().available), state, fixed,
                    LAUNCHER_MIB * MIB if ranks > 1 else 0.0)


def check_host_memory(cfg: DictConfig) -> HostNeed | None:
    """Refuse (UserError) local workers that cannot fit the free memory; None for SLURM."""
    if cfg.launcher.name != "local":
        return None
    need = host_need(cfg)
    if need.fits or not cfg.launcher.check_memory:
        return need
    most = int((need.available - need.launcher) // need.per_rank)
    raise UserError(
        f"launcher.nproc_per_node={need.ranks} would start {need.ranks} processes needing about "
        f"{need.total / 2**30:.1f} GiB of host memory, but this machine has {need.available / 2**30:.1f} GiB "
        f"available; nothing was started. {need.line()}. Use launcher.nproc_per_node={max(1, most)} or fewer"
        + (" (not even one fits: free memory or use a smaller model)" if most < 1 else "")
        + ", or override the check with launcher.check_memory=false."
    )
