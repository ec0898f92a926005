"""Submit one SLURM job of nodes x gpus_per_node tasks (or a sweep's points as job arrays)
with submitit, and wait for it when asked.

On the submitting machine (`python launch.py launcher=slurm ...`), after the launcher
validated the config and saved it as RUN_DIR/config.yaml: the sbatch script rendered by
submitit (slurm/sbatch.py) into a fresh RUN_DIR/slurm/submission-N/, then
RUN_DIR/slurm/state.json records the job id and logs (through the launcher's hands).

In the job: slurm/task.py (every task, preemption and hang requeues) and
slurm/after_srun.py (the batch script's teardown: a task that died).

Secrets (HF_TOKEN, ...) reach the job through the environment only; a script or config
that contains one is refused (slurm/secrets.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from submitit.core.utils import FailedJobError, FailedSubmissionError

from slurm.hands import Hands
from slurm.sbatch import log_paths, make_executor, new_folder, render_script, sbatch_parameters
from slurm.wait import NeverStarts, refuse_if_never, wait_for
from slurm.secrets import refuse_secrets
from slurm.task import SlurmTask
from trainers.errors import TrainingError, UserError
from trainers.files import read_json

# What sbatch's refusal looks like through submitit: sbatch exits non-zero (FailedJobError,
# with sbatch's message), prints no job id (FailedSubmissionError), or cannot be started.
SBATCH_REFUSED = (FailedJobError, FailedSubmissionError, OSError)


def _record(hands: Hands, cfg: DictConfig, run_dir: Path, job_id: str, folder: Path) -> None:
    hands.record_submission(run_dir, job_id, folder, log_paths(folder, job_id, hands.world_size(cfg)),
                            int(cfg.launcher.max_requeues))


def _record_never(hands: Hands, run_dirs: list[Path], error: NeverStarts) -> None:
    """state.json of each run remembers the verdict (`python -m launch.status` shows it)."""
    for run_dir in run_dirs:
        hands.update_state(run_dir, lambda s: s.update(
            never_starts={"job_id": s.get("job_id"), "at": hands.now(), "message": str(error)}))


def submit_run(cfg: DictConfig, config_path: Path, hands: Hands) -> int:
    """Submit the run whose resolved config is `config_path`; with launcher.wait, wait for
    it (following requeues) and return its exit code. A job that can never start (see
    slurm/wait.py) is cancelled and refused at submission or while waiting."""
    run_dir = Path(cfg.run_dir)
    folder = new_folder(run_dir)
    executor = make_executor(cfg, folder, hands.repo_root)
    refuse_secrets({"sbatch script": render_script(cfg, folder, hands.repo_root),
                    "saved config": config_path.read_text()})
    try:
        job = executor.submit(SlurmTask(str(config_path), hands))
    except SBATCH_REFUSED as e:  # bad partition, account, ...
        raise UserError(f"sbatch refused the job: {e}") from None
    _record(hands, cfg, run_dir, job.job_id, folder)
    try:
        refuse_if_never(job.job_id)
    except NeverStarts as e:
        _record_never(hands, [run_dir], e)
        raise
    logs = log_paths(folder, job.job_id, 1)["rank0"]
    print(f"submitted job {job.job_id}: {cfg.launcher.nodes} node(s) x {cfg.launcher.gpus_per_node} task(s)\n"
          f"  run dir  {run_dir}\n  log      {logs['stderr']}\n"
          f"  status   python -m launch.status {run_dir}", flush=True)
    if not cfg.launcher.get("wait"):
        return 0
    try:
        wait_for([job.job_id])
    except NeverStarts as e:
        _record_never(hands, [run_dir], e)
        raise
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


def submit_array(points: list, sweep_dir: Path, hands: Hands) -> list[str]:
    """Submit sweep points (each with .num, .cfg, .config_path, .run_dir) as job arrays:
    one per distinct set of sbatch parameters (normally exactly one). Returns the job ids,
    in point order."""
    groups: dict[str, list] = {}
    for p in points:
        key = json.dumps(sbatch_parameters(p.cfg, hands.repo_root, job_name="llm-sweep"), sort_keys=True,
                         default=str)
        groups.setdefault(key, []).append(p)
    ids: dict[int, str] = {}
    for group in groups.values():
        first = group[0].cfg
        folder = new_folder(sweep_dir)
        executor = make_executor(first, folder, hands.repo_root, job_name="llm-sweep")
        script = render_script(first, folder, hands.repo_root, job_name="llm-sweep",
                               array=len(group) if len(group) > 1 else None)
        refuse_secrets({"sbatch script": script, **{f"config of point {p.num}": Path(p.config_path).read_text() for p in group}})
        try:
            with executor.batch():
                jobs = [executor.submit(SlurmTask(p.config_path, hands, str(sweep_dir))) for p in group]
        except SBATCH_REFUSED as e:
            raise UserError(f"sbatch refused the sweep: {e}") from None
        for p, job in zip(group, jobs):
            _record(hands, p.cfg, Path(p.run_dir), job.job_id, folder)
            ids[p.num] = job.job_id
        try:
            refuse_if_never(jobs[0].job_id)  # the elements of an array share one request
        except NeverStarts as e:
            _record_never(hands, [Path(p.run_dir) for p in points], e)
            raise
    return [ids[p.num] for p in points]


def wait_array(points: list, ids: list[str], hands: Hands) -> dict[str, str]:
    """Wait for a sweep's jobs (submit_array's ids, in point order) like submit_run waits."""
    try:
        return wait_for(ids)
    except NeverStarts as e:
        array = e.job_id.split("_")[0]
        _record_never(hands, [Path(p.run_dir) for p, i in zip(points, ids) if i.split("_")[0] == array], e)
        raise
