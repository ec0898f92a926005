"""One launch per run dir: RUN_DIR/launch.lock, held while a launch owns the directory.

Two launches writing one run dir at once interleave their checkpoints, metrics and
exports, and a resume then takes whichever commit came last. The lock is a POSIX record
lock (fcntl F_SETLK through `fcntl.lockf`) on RUN_DIR/launch.lock:

- it dies with its holder: the kernel drops it when the process exits, however it exits
  (SIGKILL, OOM, a crash), so there is never a stale lock to remove by hand;
- it works across machines on the shared file systems clusters use: NFSv4 (locks are
  part of the protocol; a holder on a node that died is released when its lease expires,
  90 s by default), NFSv3 with lockd, Lustre mounted with `-o flock` (not `localflock`,
  which is node-local), GPFS / Spectrum Scale and BeeGFS (with its global locks on).
  flock() is not used: on some of these it is node-local or emulated.

POSIX locks belong to a process, and closing ANY descriptor of the file in that process
releases them: the holder never opens the file a second time (its details are written
through the locked descriptor), and only other processes read them.

Who holds it: a local launch (the launcher process, for the whole run: its workers die
with it), and in a SLURM job the rank-0 task for its attempt. A requeued attempt of the
same job takes it once the previous attempt's holder is gone; if the previous holder's
node died, the file system releases its lock after the lease, so an attempt that finds
its own job id as the holder waits up to SAME_JOB_WAIT_S for that.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from trainers.errors import UserError

LOCK_NAME = "launch.lock"
SAME_JOB_WAIT_S = 120.0  # > NFSv4's default 90 s lease


def holder_of(run_dir: Path) -> dict:
    """What the current (or last) holder wrote: host, pid, SLURM job id, since, command."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    who = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("slurm_job_id"):
        who = f"SLURM job {holder['slurm_job_id']} ({who})"
    return f"{who}, since {holder.get('since')} (`{holder.get('command', '?')}`)"


class RunDirLock:
    """Held from `acquire` until `release` (or the process's end)."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir = Path(run_dir)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path, same_job_wait_s: float = SAME_JOB_WAIT_S) -> "RunDirLock":
        """Take the lock or raise UserError naming its holder. Never blocks, except for a
        SLURM attempt that finds its own job as the holder (a requeue whose previous
        attempt's lock the file system has not released yet)."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"hydra.run.dir={run_dir} is a file, not a directory: name a directory (new or "
                            f"an earlier run's, to resume it).")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"hydra.run.dir={run_dir} cannot be written ({e.strerror}): point it at a "
                            f"directory you can write.") from None
        job = os.environ.get("SLURM_JOB_ID")
        deadline = time.monotonic() + same_job_wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise UserError(
                        f"Cannot lock {run_dir / LOCK_NAME} ({e.strerror}): the file system does not "
                        f"support POSIX locks (Lustre needs the `flock` mount option). See "
                        f"docs/run-dir-lock.md.") from None
                holder = holder_of(run_dir)
                if job and holder.get("slurm_job_id") == job and time.monotonic() < deadline:
                    time.sleep(2)  # our own job's previous attempt: its lock is about to go
                    continue
                os.close(fd)
                raise UserError(
                    f"hydra.run.dir={run_dir} is in use by another launch: {describe(holder)}. One launch "
                    f"at a time writes a run dir (two would mix their checkpoints and metrics). Wait for "
                    f"it to end or stop it, then relaunch here to resume; or start a fresh run in another "
                    f"hydra.run.dir."
                ) from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
              "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}
        data = (json.dumps(me) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # drops the lock; the holder's details stay as a record of the last one

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_active_job(run_dir: Path) -> None:
    """launcher=slurm, before submitting: the lock is taken by the job once it starts, so a
    job of this run dir that SLURM still has pending or running is checked by its id."""
    from launch.run_state import read_state
    from slurm.scheduler import TERMINAL, scontrol_state

    job = read_state(run_dir).get("job_id")
    if not job:
        return
    state = scontrol_state(job)
    if state is not None and state not in TERMINAL:
        raise UserError(
            f"hydra.run.dir={run_dir} belongs to SLURM job {job}, which is {state}: a second job would "
            f"write the same run dir. Wait for it to end (python -m launch.status {run_dir}) or "
            f"scancel {job}, then relaunch here to resume; or start a fresh run in another hydra.run.dir."
        )
