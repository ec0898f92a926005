"""launcher=slurm: the launcher's side of the SLURM backend (slurm/). The backend imports
nothing from launch/; this module hands it what it needs (HANDS: the worker entry point,
the config loader, the run-state records, the sweep summary) and calls it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from launch import run_state, sweep
from launch.config import REPO_ROOT, load, world_size
from launch.run_lock import RunDirLock
from launch.worker import run, setup_logging
from slurm.hands import Hands

HANDS = Hands(
    entry=run, setup_logging=setup_logging, load_config=load, world_size=world_size, repo_root=str(REPO_ROOT),
    read_state=run_state.read_state, update_state=run_state.update_state,
    record_submission=run_state.record_submission, now=run_state.now, point_ended=sweep.refresh_sweep_summary,
    hold_run_dir=RunDirLock.acquire,
)


def run_slurm(cfg: DictConfig, config_path: Path) -> int:
    """launch.main's launcher for launcher=slurm."""
    from slurm.submit import submit_run

    if sweep.current() is not None:
        return 0  # registered in sweep.json: SweepCallback submits every point as one array
    return submit_run(cfg, config_path, HANDS)


def submit_sweep(points: list[sweep.Point], sweep_dir: Path) -> list[str]:
    """The launcher=slurm points of a sweep as job arrays; their job ids in point order."""
    from slurm.submit import submit_array

    return submit_array(points, sweep_dir, HANDS)


def wait_sweep(points: list[sweep.Point], ids: list[str]) -> None:
    from slurm.submit import wait_array

    wait_array(points, ids, HANDS)
