"""RUN_DIR/slurm/state.json, and the one derivation of a run's status every reader uses
(`python -m launch.status`, the sweep summary, the launcher's exit code).

state.json is written by the submitter (submissions, job id, log paths) and by the job
(one record per attempt: started, ended, status, requeued, note), always under its file
lock: rank 0, the watchdog of a hung rank and the batch script's teardown may all write it.

A run's status needs three witnesses, each of which can be missing or stale:
summary.json (written by the training loop at its end: absent while running, and a
requeued attempt leaves the previous attempt's file in place), the attempt records in
state.json (absent for a run that never started, and unfinished when a task was killed
without warning), and the scheduler's state (the only witness of a job SLURM ended
without the job noticing).
"""
from __future__ import annotations

import time
from pathlib import Path

from slurm.scheduler import TERMINAL
from trainers.files import read_json, update_json

STATE = Path("slurm") / "state.json"  # relative to a run dir

# Statuses after which nothing more happens to a run unless someone relaunches it are
# all the others: completed, failed, preempted (not requeued), hung, task died, killed (...).
IN_PROGRESS = {"not started", "pending", "running", "requeued"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def read_state(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / STATE)


def update_state(run_dir: Path, change) -> dict:
    """Read-modify-write state.json under its file lock; `change(state)` edits in place."""
    return update_json(Path(run_dir) / STATE, change)


def record_submission(run_dir: Path, job_id: str, folder: Path, logs: dict, max_requeues: int) -> None:
    def change(s: dict) -> None:
        s.setdefault("submissions", []).append(
            {"job_id": job_id, "folder": str(folder), "submitted": now(), "logs": logs}
        )
        s.update(job_id=job_id, folder=str(folder), max_requeues=max_requeues, logs=logs)
        s.setdefault("requeues", 0)

    update_state(run_dir, change)


def needs_scheduler(summary: dict, state: dict) -> bool:
    """Whether derive_status could answer differently once it knows the scheduler's state:
    only for a submitted job that the records say is not over (a query per finished run
    would cost every sweep refresh one scontrol call per point)."""
    return bool(state.get("job_id")) and derive_status(summary, state) in IN_PROGRESS


def derive_status(summary: dict, state: dict, scheduler_state: str | None = None) -> str:
    """A run's status from its summary.json, its state.json (empty for launcher=local) and,
    when known, the scheduler's state of its job.

    The last attempt's own record wins over summary.json: a task killed outright cannot
    write a summary, and the file left in place is the previous attempt's. A record that
    says the job is still on its way (running, requeued, pending) is overruled by a
    scheduler that says it is over: SLURM ended it without the job noticing (scancel while
    pending, a node failure past the requeue limit, a kill that left no record)."""
    over = scheduler_state in TERMINAL
    attempts = state.get("attempts") or []
    last = attempts[-1] if attempts else None
    if last is not None and "ended" not in last:
        return f"killed ({scheduler_state})" if over else "running"
    if last is not None and last.get("requeued"):
        return f"killed ({scheduler_state})" if over else "requeued"
    if last is not None and last.get("status"):
        return last["status"]
    if state.get("job_id") and (state.get("never_starts") or {}).get("job_id") == state["job_id"]:
        return "cannot start"  # cancelled at once: slurm/wait.py
    if summary:
        return summary.get("status") or "unknown"
    if state.get("job_id"):
        return f"no summary ({scheduler_state})" if over else "pending"
    return "not started"
