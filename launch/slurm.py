"""launcher=slurm: submit one SLURM job of nodes x gpus_per_node tasks (or a sweep's
points as job arrays) with submitit.

On the submitting machine (`python launch.py launcher=slurm ...`)
  validate + memory estimate (launch/estimate.py) -> RUN_DIR/config.yaml (resolved) ->
  sbatch script rendered by submitit (launch/sbatch.py) into a fresh
  RUN_DIR/slurm/submission-N/ -> RUN_DIR/slurm/state.json records the job id and logs
  (launch/run_state.py).

In the job: launch/slurm_task.py (every task, preemption and hang requeues) and
launch/after_srun.py (the batch script's teardown: a task that died).

Secrets (HF_TOKEN, ...) reach the job through the environment only; a script or config
that contains one is refused (launch/secrets.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from submitit.core.utils import FailedJobError, FailedSubmissionError

from launch import sweep
from launch.config import world_size
from launch.run_state import record_submission
from launch.sbatch import log_paths, make_executor, new_folder, render_script, sbatch_parameters
from launch.scheduler import wait_for
from launch.secrets import refuse_secrets
from launch.slurm_task import SlurmTask
from trainers.errors import TrainingError, UserError
from trainers.files import read_json

# What sbatch's refusal looks like through submitit: sbatch exits non-zero (FailedJobError,
# with sbatch's message), prints no job id (FailedSubmissionError), or cannot be started.
SBATCH_REFUSED = (FailedJobError, FailedSubmissionError, OSError)


def _record(cfg: DictConfig, run_dir: Path, job_id: str, folder: Path) -> None:
    record_submission(run_dir, job_id, folder, log_paths(folder, job_id, world_size(cfg)),
                      int(cfg.launcher.max_requeues))


def run_slurm(cfg: DictConfig, config_path: Path) -> int:
    if sweep.current() is not None:
        return 0  # registered in sweep.json: SweepCallback submits every point as one array
    run_dir = Path(cfg.run_dir)
    folder = new_folder(run_dir)
    executor = make_executor(cfg, folder)
    refuse_secrets({"sbatch script": render_script(cfg, folder), "saved config": config_path.read_text()})
    try:
        job = executor.submit(SlurmTask(str(config_path)))
    except SBATCH_REFUSED as e:  # bad partition, account, ...
        raise UserError(f"sbatch refused the job: {e}") from None
    _record(cfg, run_dir, job.job_id, folder)
    logs = log_paths(folder, job.job_id, 1)["rank0"]
    print(f"submitted job {job.job_id}: {cfg.launcher.nodes} node(s) x {cfg.launcher.gpus_per_node} task(s)\n"
          f"  run dir  {run_dir}\n  log      {logs['stderr']}\n"
          f"  status   python -m launch.status {run_dir}", flush=True)
    if not cfg.launcher.wait:
        return 0
    try:
        wait_for([job.job_id])
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.job_id} keeps running (scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    summary = read_json(run_dir / "summary.json")
    print(f"job {job.job_id} ended: {summary.get('status', 'no summary')} at step {summary.get('final_step')}")
    if summary.get("status") != "completed":
        raise TrainingError(
            f"run {run_dir} ended {summary.get('status', 'without a summary')}; see {logs['stderr']}. "
            f"Relaunch with the same overrides and hydra.run.dir={run_dir} to resume from its last "
            f"committed checkpoint.")
    return 0


def submit_array(points: list[sweep.Point], sweep_dir: Path) -> list[str]:
    """Submit sweep points as job arrays: one per distinct set of sbatch parameters
    (normally exactly one). Returns the job ids, in point order."""
    groups: dict[str, list[sweep.Point]] = {}
    for p in points:
        key = json.dumps(sbatch_parameters(p.cfg, job_name="llm-sweep"), sort_keys=True, default=str)
        groups.setdefault(key, []).append(p)
    ids: dict[int, str] = {}
    for group in groups.values():
        first = group[0].cfg
        folder = new_folder(sweep_dir)
        executor = make_executor(first, folder, job_name="llm-sweep")
        script = render_script(first, folder, job_name="llm-sweep", array=len(group) if len(group) > 1 else None)
        refuse_secrets({"sbatch script": script, **{f"config of point {p.num}": Path(p.config_path).read_text() for p in group}})
        try:
            with executor.batch():
                jobs = [executor.submit(SlurmTask(p.config_path, str(sweep_dir))) for p in group]
        except SBATCH_REFUSED as e:
            raise UserError(f"sbatch refused the sweep: {e}") from None
        for p, job in zip(group, jobs):
            _record(p.cfg, Path(p.run_dir), job.job_id, folder)
            ids[p.num] = job.job_id
    return [ids[p.num] for p in points]
