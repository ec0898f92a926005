"""What SLURM says about a job (scontrol while slurmctld knows it, sacct after), its
partition and nodes, and the two things we ask of it (requeue, cancel). Every query tolerates a missing or slow SLURM: status
readers run on machines without one, and a job must not die because scontrol timed out."""
from __future__ import annotations

import re
import subprocess

# States after which a job will not run again (PREEMPTED/REQUEUED may come back).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


# `scontrol show -o` prints one record per line as Key=Value pairs separated by spaces;
# a value may itself hold spaces ("Reason=ReqNodeNotAvail, UnavailableNodes:n1") or "="
# ("TRES=cpu=2,mem=1G"), so a key is a word that starts after a space and ends at "=".
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/.]*)=")


def parse_record(line: str) -> dict[str, str]:
    keys = list(_KEY.finditer(line))
    return {m[1]: line[m.end():(nxt.start() if nxt else len(line))].strip()
            for m, nxt in zip(keys, keys[1:] + [None])}


def show(kind: str, name: str | None = None) -> list[dict[str, str]]:
    """`scontrol show KIND [NAME] -o` (job, partition, node) as records; [] when SLURM does
    not know it (or is not there)."""
    try:
        out = subprocess.run(["scontrol", "show", kind, "-o", *([name] if name else [])],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [parse_record(line) for line in out.stdout.splitlines() if "=" in line]


def scontrol_state(job_id: str) -> str | None:
    """slurmctld's state of the job; None once it forgot the job (or without SLURM)."""
    # An array element may not be split off yet: the record then covers several ids.
    states = [r["JobState"] for r in show("job", job_id) if "JobState" in r]
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


def requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB`; None when SLURM accepted it, else why not. SLURM signals
    (then kills) the job's tasks as soon as it accepts, so callers record first."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue failed: {(getattr(e, 'stderr', None) or str(e)).strip()}"
    return None


def cancel(job_id: str) -> None:
    """`scancel JOB` (a whole array when given the array's id); best effort."""
    try:
        subprocess.run(["scancel", job_id], timeout=60, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pass
