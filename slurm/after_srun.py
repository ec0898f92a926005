"""The batch script's teardown: `python -m slurm.after_srun SUBMITIT_FOLDER SRUN_EXIT`.

A task that dies (SIGKILL, the OOM killer, a segfault) cannot record anything itself, and
its peers may be killed before they notice, so the decision is taken after srun:
--kill-on-bad-exit=1 makes srun end the step within seconds (TERM, then KILL after
KillWait) and print its verdict on each task ("srun: error: n2: task 1: Killed") into the
batch log. If the first verdict of this attempt is a signal, the attempt is recorded as
`task died` and the job requeued like a preemption (same limit). A task that exited with
an error code (a bad config, a NaN loss, a bug) is not requeued: it would fail again.

What it needs of the launcher (the config loader, the run-state records) comes with the
job's own pickled SlurmTask (its hands), read back from the submitit folder.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from slurm import scheduler
from slurm.hands import Hands
from slurm.sbatch import ATTEMPT_MARK
from slurm.task import end_attempt, restart_count, should_requeue

# srun's verdict on a task that ended badly (src/srun: "<node>: task[s] <ids>: <how>"),
# e.g. "srun: error: n2: task 1: Killed", "...: task 0: Exited with exit code 1",
# "...: task 1: Segmentation fault (core dumped)".
SRUN_VERDICT = re.compile(r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[0-9,\-]+): (?P<how>.+?)\s*$")


def first_task_failure(batch_log: str) -> dict | None:
    """The first task srun reported as ended badly in the latest attempt of `batch_log`
    (after the last ATTEMPT_MARK): the task that failed first; the ones srun then ended
    itself come after it. None when srun reported none. `signal` is False for a task that
    exited with an error code (its own error, printed above it in the log)."""
    text = batch_log.rsplit(ATTEMPT_MARK, 1)[-1]
    for line in text.splitlines():
        m = SRUN_VERDICT.match(line.strip())
        if m:
            how = m["how"]
            return {"node": m["node"], "tasks": m["tasks"], "how": how,
                    "signal": not how.startswith("Exited with exit code")}
    return None


def last_logged_step(run_dir: Path) -> int | None:
    """The last training step in metrics.jsonl (its tail only: the file grows with the run)."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            return record["step"]
    return None


def _say(message: str) -> None:
    print(f"llm-launcher: {message}", file=sys.stderr, flush=True)


def after_srun(folder: Path, srun_exit: int) -> None:
    """Record and requeue a task's death by signal (see module doc), unless somebody
    requeued the job already (a preemption or a hang) or SLURM itself ended the tasks.
    Errors are printed, never raised: the script still exits with srun's code."""
    from submitit import JobEnvironment
    from submitit.core.utils import DelayedSubmission, JobPaths

    if srun_exit == 0:
        return
    job_id = JobEnvironment().job_id  # "<array>_<index>" for an array element
    restart = restart_count()
    paths = JobPaths(Path(folder), job_id=job_id, task_id=0)
    try:
        task = DelayedSubmission.load(paths.submitted_pickle).function
        hands: Hands = task.hands
        cfg = hands.load_config(task.config_path)
        failure = first_task_failure(paths.stderr.read_text(errors="replace"))
    except (OSError, ValueError, EOFError, AttributeError) as e:
        _say(f"cannot tell why srun ended with {srun_exit} ({e}); not requeued")
        return
    run_dir = Path(cfg.run_dir)
    attempts = hands.read_state(run_dir).get("attempts") or []
    mine = attempts[-1] if attempts and attempts[-1].get("restart") == restart else {}  # this attempt's record
    if mine.get("requeued"):
        return  # preempted or hung: already requeued by rank 0 / the watchdog
    if failure is None or not failure["signal"]:  # a task's own error: requeuing would fail again
        if failure is not None and mine.get("status") != "hung":  # (a hang past the limit says so itself)
            _say(f"task {failure['tasks']} on {failure['node']}: {failure['how']} (its error is above); "
                 f"not requeued: a relaunch would fail the same way")
        return
    if scheduler.scontrol_state(job_id) != "RUNNING":
        # SLURM itself ended the tasks (scancel, scontrol requeue, time limit): its decision
        # stands, and rank 0's record of the attempt with it.
        return
    _requeue_dead_task(hands, cfg, job_id, restart, failure)


def _requeue_dead_task(hands: Hands, cfg, job_id: str, restart: int, failure: dict) -> None:
    from trainers.checkpoint_files import latest_checkpoint

    run_dir = Path(cfg.run_dir)
    resume = latest_checkpoint(run_dir / "checkpoints")
    what = (f"task {failure['tasks']} on {failure['node']}: {failure['how']}; the last committed checkpoint is "
            f"{resume.name if resume else 'none'}")
    requeue, why_not = should_requeue(cfg, job_id, restart)
    ended = {"status": "task died", "step": last_logged_step(run_dir),
             "task_died": {k: failure[k] for k in ("node", "tasks", "how")},
             "requeued": requeue, "note": what + (f"; not requeued: {why_not}" if why_not else "")}
    now = hands.now()

    def record(s: dict, ended: dict) -> None:
        tries = s.setdefault("attempts", [])
        if not tries or tries[-1].get("restart") != restart:  # died before rank 0 recorded it
            tries.append({"job_id": job_id, "restart": restart})
        mine = tries[-1]
        if mine.get("note") and "task_died" not in mine:  # rank 0's own error (a lost peer, usually)
            mine["error"] = mine["note"]
        mine.update(ended, ended=mine.get("ended") or now)

    if requeue:
        _say(f"{what}; requeuing job {job_id} like a preemption (restart {restart + 1} of at most "
             f"{cfg.launcher.max_requeues}); it resumes from the last committed checkpoint")
    else:
        _say(f"{what}; not requeued: {why_not}")
    end_attempt(hands, run_dir, job_id, ended, record)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m slurm.after_srun SUBMITIT_FOLDER SRUN_EXIT_CODE "
              "(run by the sbatch script after srun)", file=sys.stderr)
        return 2
    after_srun(Path(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
