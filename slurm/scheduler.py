"""What SLURM says about a job (scontrol while slurmctld knows it, sacct after), and the
one thing we ask of it (requeue). Every query tolerates a missing or slow SLURM: status
readers run on machines without one, and a job must not die because scontrol timed out."""
from __future__ import annotations

import logging
import re
import subprocess
import time

log = logging.getLogger("slurm")

# States after which a job will not run again (PREEMPTED/REQUEUED may come back).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


def scontrol_state(job_id: str) -> str | None:
    """slurmctld's state of the job; None once it forgot the job (or without SLURM)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    # An array element may not be split off yet: the record then covers several ids.
    states = re.findall(r"\bJobState=(\S+)", out.stdout)
    return states[0] if states else None


def sacct(job_id: str) -> dict | None:
    """The latest accounting record of a job (None without accounting)."""
    fields = ["JobID", "State", "ExitCode", "Elapsed", "Start", "End", "NodeList"]
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|") for line in out.stdout.strip().splitlines() if line.strip()]
    rows = [r for r in rows if r[0] == job_id] or rows
    if out.returncode != 0 or not rows:
        return None
    rec = dict(zip(fields, rows[-1]))
    rec["State"] = rec["State"].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return rec


def job_state(job_id: str) -> str:
    """Current state: slurmctld's view while it knows the job, else accounting's."""
    state = scontrol_state(job_id)
    if state is None:
        rec = sacct(job_id)
        state = rec["State"] if rec else "UNKNOWN"
    return state


def wait_for(job_ids: list[str], poll_s: float = 2.0) -> dict[str, str]:
    """Block until every job is in a terminal state (following requeues)."""
    last: dict[str, str] = {}
    while True:
        states = {j: job_state(j) for j in job_ids}
        for j, s in states.items():
            if s != last.get(j):
                log.info("job %s: %s", j, s)
        last = states
        if all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(poll_s)


def requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB`; None when SLURM accepted it, else why not. SLURM signals
    (then kills) the job's tasks as soon as it accepts, so callers record first."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue failed: {(getattr(e, 'stderr', None) or str(e)).strip()}"
    return None
