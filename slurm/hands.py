"""What the launcher hands to the SLURM backend (see slurm/__init__.py for why).

A Hands travels inside every job: submitit pickles the task (cloudpickle), and the batch
script's teardown unpickles it again. So every field is plain data or a module-level
function, which pickles by name: the job imports it from the repo on its PYTHONPATH and
runs the launcher's own code, never a copy frozen at submission.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Hands:
    # entry(cfg, on_hang=callback) -> exit code: what every task runs (the training
    # worker); on_hang(summary) is called by the hang watchdog before the rank exits.
    entry: Callable[..., int]
    setup_logging: Callable[[], None]
    load_config: Callable[[str], Any]  # RUN_DIR/config.yaml -> the run's config
    world_size: Callable[[Any], int]  # processes of a run, from its config
    repo_root: str  # put on the job's PYTHONPATH
    # RUN_DIR/slurm/state.json: read(run_dir) -> dict; update(run_dir, change(state));
    # record_submission(run_dir, job_id, folder, logs, max_requeues); now() -> timestamp.
    read_state: Callable[[Path], dict]
    update_state: Callable[[Path, Callable[[dict], None]], dict]
    record_submission: Callable[..., None]
    now: Callable[[], str]
    # point_ended(sweep_dir): a sweep point's job ended (its summary table is refreshed).
    point_ended: Callable[[Path], Any]
    # hold_run_dir(run_dir): take the run dir's one-launch lock for this process's life, or
    # raise UserError naming its holder (launch/run_lock.py).
    hold_run_dir: Callable[[Path], Any]
