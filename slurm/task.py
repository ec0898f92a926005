"""What every task of a launcher=slurm job runs (SlurmTask), and how an attempt's end is
recorded and requeued.

Every task takes RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM
(submitit's TorchDistributedEnvironment) and runs the entry point the launcher handed in
(slurm/hands.py; the same worker code as launcher=local, so every plan works unchanged).
Rank 0 keeps the record of each attempt in RUN_DIR/slurm/state.json.

Preemption and time limits
  SLURM sends USR2 `signal_lead_s` before the time limit (sbatch --signal); a
  preemption (or submitit's job._interrupt()) sends TERM then USR2. The training loop's
  StopRequest catches TERM/USR1/USR2: all ranks agree at the next step boundary, save
  a checkpoint and end with status `preempted`. Rank 0 then requeues the job
  (`scontrol requeue`, at most launcher.max_requeues times, counted by SLURM as
  SLURM_RESTART_COUNT) unless SLURM is already ending it (scancel, or a requeue or
  preemption SLURM performs itself). The requeued job runs the same script, the loop
  finds RUN_DIR/checkpoints/latest and resumes: no flag needed. A signal that arrives
  before the loop is running goes to submitit's own handler, which calls
  SlurmTask.checkpoint() and requeues (nothing to save yet).
  A plain `scontrol requeue`, a node failure (the job is --requeue) or a task killed
  without warning resume the same way, from the last committed checkpoint.

Hangs and dead ranks
  A hung rank (trainers/watchdog.py): the lowest live rank writes summary.json `hung`,
  then calls the callback this task handed down through the entry point
  (SlurmTask._requeue_after_hang), which requeues the job like a preemption, counted
  against launcher.max_requeues, before the ranks exit. A task that dies without warning
  is handled after srun by the batch script (slurm/after_srun.py).
"""
from __future__ import annotations

import logging
import os
import random
import sys
from functools import partial
from pathlib import Path

from omegaconf import DictConfig
from submitit.helpers import Checkpointable, DelayedSubmission

from slurm import scheduler
from slurm.hands import Hands
from trainers.secrets import secret_env
from trainers.files import read_json

log = logging.getLogger("slurm")

# The submitting shell's own torch variables (sbatch exports its environment) must not
# reach the workers: SLURM's are the truth in the job.
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def restart_count() -> int:
    """How many times SLURM requeued this job before this attempt."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def master_port(cfg: DictConfig, job_id: str, restart: int) -> int:
    if cfg.launcher.master_port:
        return int(cfg.launcher.master_port)
    # Like submitit's (seeded by the job id: every task agrees), plus the restart count
    # so a requeued attempt never meets the previous attempt's socket.
    return random.Random(f"{job_id}/{restart}").randint(20000, 60000)


def should_requeue(cfg: DictConfig, job_id: str, restart: int) -> tuple[bool, str]:
    """(requeue?, why not): within launcher.max_requeues, and only while the job is
    RUNNING: otherwise SLURM is ending it itself (scancel, its own requeue or preemption)
    and its decision stands."""
    limit = int(cfg.launcher.max_requeues)
    if restart >= limit:
        return False, f"launcher.max_requeues={limit} reached"
    state = scheduler.scontrol_state(job_id)
    if state != "RUNNING":
        return False, f"the job is {state} (cancelled, or requeued by SLURM itself)"
    return True, ""


def update_last_attempt(state: dict, ended: dict) -> None:
    if state.get("attempts"):
        state["attempts"][-1].update(ended)


def end_attempt(hands: Hands, run_dir: Path, job_id: str, ended: dict, record=update_last_attempt) -> bool:
    """Record how this attempt ended (`record(state, ended)`) and requeue the job when
    ended["requeued"]; returns whether SLURM accepted the requeue. The record comes first:
    SLURM signals (then kills) the tasks as soon as it accepts. A refused requeue is
    recorded as such, with SLURM's reason added to the note."""
    def apply(s: dict, count: int) -> None:
        record(s, ended)
        s["requeues"] = s.get("requeues", 0) + count

    requeue = bool(ended.get("requeued"))
    hands.update_state(run_dir, lambda s: apply(s, 1 if requeue else 0))
    if not requeue:
        return False
    refused = scheduler.requeue(job_id)
    if refused is None:
        return True
    ended.update(requeued=False, note="; ".join(filter(None, [ended.get("note"), refused])))
    hands.update_state(run_dir, lambda s: apply(s, -1))
    return False


class SlurmTask(Checkpointable):
    """What every task of the job runs. Checkpointable for submitit (see module doc).
    `sweep_dir`: the sweep this run is a point of (hands.point_ended is called when it ends)."""

    def __init__(self, config_path: str, hands: Hands, sweep_dir: str | None = None):
        self.config_path = str(config_path)
        self.hands = hands
        self.sweep_dir = sweep_dir

    def __call__(self) -> dict:
        from submitit import JobEnvironment

        hands = self.hands
        cfg = hands.load_config(self.config_path)
        job = JobEnvironment()
        restart = restart_count()
        dist_env = self._export_torch_env(cfg, job.job_id, restart)
        hands.setup_logging()
        job.paths.result_pickle.unlink(missing_ok=True)  # a requeued attempt's old result
        rank0 = dist_env.rank == 0
        if rank0:
            self._hold_run_dir(cfg)
            self._record_start(cfg, job, dist_env, restart)
        try:
            code = hands.entry(cfg, on_hang=partial(self._requeue_after_hang, cfg, job.job_id, restart))
        except BaseException as e:  # not an expected failure (those return a code): record, re-raise
            if rank0:
                self._record_crash(cfg, f"{type(e).__name__}: {e}")
            raise
        if not rank0:
            if code:
                sys.exit(code)
            return {"rank": dist_env.rank, "code": code}
        summary = self._record_end(cfg, job.job_id, restart, code)
        if code:
            sys.exit(code)
        return summary

    def _hold_run_dir(self, cfg: DictConfig) -> None:
        """Rank 0 holds RUN_DIR/launch.lock for this attempt (until its process ends); a
        requeued attempt of this job takes it once the previous attempt's holder is gone
        (the launcher's lock, handed in). Another launch holding it ends this job before it
        writes."""
        from trainers.errors import UserError

        try:
            self.hands.hold_run_dir(Path(cfg.run_dir))  # held until this process ends
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    @staticmethod
    def _export_torch_env(cfg: DictConfig, job_id: str, restart: int):
        from submitit.helpers import TorchDistributedEnvironment

        for key in TORCH_ENV:
            os.environ.pop(key, None)
        os.environ["MASTER_PORT"] = str(master_port(cfg, job_id, restart))
        return TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

    def _record_start(self, cfg: DictConfig, job, dist_env, restart: int) -> None:
        attempt = {"job_id": job.job_id, "restart": restart, "started": self.hands.now(),
                   "nodes": list(job.hostnames), "world_size": dist_env.world_size,
                   "master": f"{dist_env.master_addr}:{dist_env.master_port}",
                   "secrets_in_env": sorted(secret_env())}  # names only
        self.hands.update_state(Path(cfg.run_dir), lambda s: s.setdefault("attempts", []).append(attempt))

    def _record_crash(self, cfg: DictConfig, note: str) -> None:
        now = self.hands.now()

        def failed(s: dict) -> None:
            if "ended" not in s["attempts"][-1]:  # (checkpoint() may have recorded a requeue)
                s["attempts"][-1].update(ended=now, status="failed", requeued=False, note=note)

        self.hands.update_state(Path(cfg.run_dir), failed)
        self._point_ended()

    def _record_end(self, cfg: DictConfig, job_id: str, restart: int, code: int) -> dict:
        """Rank 0, once the worker returned: record the attempt from summary.json and, for
        a preemption, requeue. A requeued job ends here with no result file, as submitit's
        own requeue does, and comes back."""
        summary = read_json(Path(cfg.run_dir) / "summary.json")
        status = summary.get("status", "failed" if code else "unknown")
        requeue, note = should_requeue(cfg, job_id, restart) if status == "preempted" else (False, "")
        ended = {"ended": self.hands.now(), "status": status, "step": summary.get("final_step"),
                 "requeued": requeue, "note": note}
        if end_attempt(self.hands, Path(cfg.run_dir), job_id, ended):
            log.info("preempted at step %s: requeued job %s", summary.get("final_step"), job_id)
            sys.exit(-1)
        if ended["note"]:
            log.warning("preempted at step %s, not requeued: %s", summary.get("final_step"), ended["note"])
        self._point_ended()
        return summary

    def _point_ended(self) -> None:
        if self.sweep_dir:
            self.hands.point_ended(Path(self.sweep_dir))

    def _requeue_after_hang(self, cfg: DictConfig, job_id: str, restart: int, summary: dict) -> None:
        """The watchdog's on_hang: runs on the rank that reported a hang (any rank: rank 0
        may be the one that hung), just before every live rank exits: record the attempt
        and requeue like a preemption."""
        requeue, note = should_requeue(cfg, job_id, restart)
        ended = {"ended": self.hands.now(), "status": "hung", "step": summary.get("final_step"), "requeued": requeue,
                 "note": note or f"hang watchdog: stopped ranks {summary['hang']['stopped_ranks']}"}
        end_attempt(self.hands, Path(cfg.run_dir), job_id, ended)

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler (rank 0) calls this when the signal comes before the
        training loop took over the signals: nothing to save yet, requeue as is."""
        from submitit import JobEnvironment

        cfg = self.hands.load_config(self.config_path)
        if restart_count() >= int(cfg.launcher.max_requeues):
            return None  # submitit then ends the job ("checkpoint function returned None")
        now = self.hands.now()

        def change(s: dict) -> None:
            s["requeues"] = s.get("requeues", 0) + 1
            update_last_attempt(s, {"ended": now, "status": "preempted", "requeued": True,
                                    "note": "signal before training started"})

        self.hands.update_state(Path(cfg.run_dir), change)
        log.info("signal before training started: requeue %s", JobEnvironment().job_id)
        return DelayedSubmission(self, *args, **kwargs)
