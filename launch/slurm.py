"""launcher=slurm: one SLURM job of nodes x gpus_per_node tasks, submitted with submitit.

On the submitting machine (`python launch.py launcher=slurm ...`)
  validate + memory estimate (launch/estimate.py) -> RUN_DIR/config.yaml (resolved) ->
  sbatch script rendered by submitit into RUN_DIR/slurm/submission-N/ (a fresh folder
  per submission: job ids restart at 1 on a new cluster and submitit would otherwise
  read stale result files) -> RUN_DIR/slurm/state.json records the job id and logs.

In the job, every task (SlurmTask.__call__)
  takes RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM
  (submitit's TorchDistributedEnvironment) and runs launch.worker.run(cfg): the same
  worker code as launcher=local, so every plan works unchanged.

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
  then (SlurmTask._requeue_after_hang) requeues the job like a preemption, counted
  against launcher.max_requeues, before the ranks exit. A task that dies (SIGKILL, the
  OOM killer, a segfault) cannot record anything itself, and its peers may be killed
  before they notice, so the decision is taken after srun: --kill-on-bad-exit=1 makes
  srun end the step within seconds (TERM, then KILL after KillWait) and print its verdict
  on each task ("srun: error: n2: task 1: Killed") into the batch log; the script's
  teardown (after_srun) reads the first verdict of this attempt and, if a task was
  ended by a signal, records it and requeues like a preemption (same limit). A task that
  exited with an error code (a bad config, a NaN loss, a bug) is not requeued: it would
  fail again.

Secrets (HF_TOKEN, ...) reach the job through the environment only (sbatch exports the
submitting environment): they are never written into the script, the saved config or
state files, and a script or config that contains one is refused. Every config value
that reaches the script is quoted (submitit quotes #SBATCH values; ours use
shlex.quote); `launcher.setup` lines are shell commands and are written verbatim.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from submitit.helpers import Checkpointable, DelayedSubmission

from launch.config import REPO_ROOT, load
from trainers.files import read_json, update_json
from trainers.errors import TrainingError, UserError

log = logging.getLogger("launch")

STATE = Path("slurm") / "state.json"  # relative to a run dir
# States after which a job will not run again (PREEMPTED/REQUEUED may come back).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
# sbatch options the launcher sets itself (or takes from a launcher.* key).
MANAGED = {
    "output": None, "error": None, "array": None, "signal": "launcher.signal_lead_s",
    "open-mode": None, "wrap": None, "nodes": "launcher.nodes", "ntasks-per-node": "launcher.gpus_per_node",
    "ntasks": "launcher.nodes x launcher.gpus_per_node", "time": "launcher.time_min",
    "partition": "launcher.partition", "account": "launcher.account", "qos": "launcher.qos",
    "mem": "launcher.mem_gb", "constraint": "launcher.constraint", "cpus-per-task": "launcher.cpus_per_task",
    "gpus-per-node": "launcher.gpus_per_node", "job-name": None,
}
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
_OPTION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ------------------------------------------------------------------------ secrets
def secret_env() -> dict[str, str]:
    """Environment variables that look like credentials (name -> value)."""
    return {k: v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}


def refuse_secrets(texts: dict[str, str]) -> None:
    for name, value in secret_env().items():
        for where, text in texts.items():
            if value in text:
                raise UserError(
                    f"The {where} would contain the value of ${name}. Secrets reach SLURM jobs "
                    f"through the environment only (sbatch exports it): remove the value from the "
                    f"config / launcher.setup and keep it in ${name}."
                )


# --------------------------------------------------------------------- the script
def _plain(key: str, value) -> str:
    text = str(value)
    if _CONTROL.search(text):
        raise UserError(f"{key}={text!r} contains a newline or control character; refusing to put it in an sbatch script.")
    return text


def sbatch_parameters(cfg: DictConfig, job_name: str | None = None) -> dict:
    """submitit SlurmExecutor parameters (its own names) for this config."""
    L = cfg.launcher
    tasks = int(L.gpus_per_node)
    params: dict = {
        "job_name": _plain("job name", job_name or f"llm-{cfg.run_name}"),
        "nodes": int(L.nodes),
        "ntasks_per_node": tasks,
        "cpus_per_task": int(L.cpus_per_task),
        "time": int(L.time_min),
        "signal_delay_s": int(L.signal_lead_s),
        "setup": setup_lines(cfg),
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if L.get("request_gpus", True):
        params["gpus_per_node"] = tasks
    for key in ("partition", "account", "qos", "constraint"):
        if L.get(key):
            params[key] = _plain(f"launcher.{key}", L[key])
    if L.get("mem_gb"):
        from submitit.slurm.slurm import _convert_mem

        params["mem"] = _convert_mem(float(L.mem_gb))
    extra: dict = {"requeue": True}  # node failures and `scontrol requeue` bring it back
    for key, value in (L.get("sbatch") or {}).items():
        key = str(key)
        if not _OPTION_KEY.match(key):
            raise UserError(f"launcher.sbatch key {key!r} is not an sbatch option name (letters, digits, - and _).")
        flag = key.replace("_", "-")
        if flag in MANAGED:
            use = MANAGED[flag]
            raise UserError(
                f"launcher.sbatch.{key} is set by the launcher" + (f"; use {use} instead." if use else ".")
            )
        if value is None or value is False:
            continue
        extra[flag] = True if value is True else _plain(f"launcher.sbatch.{key}", value)
    params["additional_parameters"] = extra
    return params


def setup_lines(cfg: DictConfig) -> list[str]:
    """Shell lines run before srun: ours (values quoted), then launcher.setup verbatim."""
    ours = [
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
    ]
    user = []
    for i, line in enumerate(cfg.launcher.get("setup") or []):
        if not isinstance(line, str):
            raise UserError(f"launcher.setup[{i}]={line!r} must be a shell line (a string).")
        user.append(line)
    return ours + user


ATTEMPT_MARK = "llm-launcher: srun starts, attempt"


def job_script_lines(folder: Path) -> dict[str, list[str]]:
    """What the batch script runs around srun (submitit's setup and teardown): a mark in
    the batch log where this attempt's srun output begins (requeued attempts append to the
    same log), and after srun, after_srun's decision about a task that died. The script
    then exits with srun's code, so a job that is not requeued still ends FAILED."""
    python = shlex.quote(sys.executable)
    return {
        "setup": [f'echo "{ATTEMPT_MARK} ${{SLURM_RESTART_COUNT:-0}} of job ${{SLURM_JOB_ID}}" >&2'],
        "teardown": ["srun_exit=$?",
                     f"{python} -m launch.slurm after-srun {shlex.quote(str(folder))} $srun_exit",
                     "exit $srun_exit"],
    }


def make_executor(cfg: DictConfig, folder: Path, job_name: str | None = None):
    from submitit import SlurmExecutor

    try:
        executor = SlurmExecutor(folder=folder, max_num_timeout=int(cfg.launcher.max_requeues))
    except RuntimeError as e:  # no srun on this machine
        raise UserError(f"launcher=slurm needs the SLURM client tools here ({e}).") from None
    params = sbatch_parameters(cfg, job_name)
    around = job_script_lines(folder)
    params.update(setup=params["setup"] + around["setup"], teardown=around["teardown"])
    try:
        executor.update_parameters(**params)
    except ValueError as e:
        raise UserError(f"SLURM parameters refused by submitit: {e}") from None
    return executor


def render_script(cfg: DictConfig, folder: Path, job_name: str | None = None, array: int | None = None) -> str:
    """The exact sbatch script submitit would submit (nothing is written or submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, job_name)
    around = job_script_lines(folder)
    params.update(setup=params["setup"] + around["setup"], teardown=around["teardown"])
    if array:
        params["map_count"] = array
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    # Same call as SlurmExecutor._make_submission_file_text (which needs srun to exist).
    return _make_sbatch_string(command=command, folder=folder, **params)


def new_folder(base: Path) -> Path:
    """BASE/slurm/submission-N: fresh for every submission from this directory."""
    root = Path(base) / "slurm"
    n = 1
    while (root / f"submission-{n}").exists():
        n += 1
    return root / f"submission-{n}"


# ------------------------------------------------------------------------- state
def update_state(run_dir: Path, change) -> dict:
    """Read-modify-write RUN_DIR/slurm/state.json under a file lock (submitter and job)."""
    return update_json(Path(run_dir) / STATE, change)


def read_state(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / STATE)


def log_paths(folder: Path, job_id: str, tasks: int) -> dict[str, dict[str, str]]:
    from submitit.core.utils import JobPaths

    out = {}
    for t in range(tasks):
        p = JobPaths(folder, job_id=job_id, task_id=t)
        out[f"rank{t}"] = {"stdout": str(p.stdout), "stderr": str(p.stderr)}
    return out


def record_submission(run_dir: Path, job_id: str, folder: Path, tasks: int, max_requeues: int) -> None:
    def change(s: dict) -> None:
        s.setdefault("submissions", []).append(
            {"job_id": job_id, "folder": str(folder), "submitted": _now(), "logs": log_paths(folder, job_id, tasks)}
        )
        s.update(job_id=job_id, folder=str(folder), max_requeues=max_requeues,
                 logs=log_paths(folder, job_id, tasks))
        s.setdefault("requeues", 0)

    update_state(run_dir, change)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# ------------------------------------------------------------------ job queries
def _scontrol_state(job_id: str) -> str | None:
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
    state = _scontrol_state(job_id)
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


# ------------------------------------------------------------------- in the job
def _master_port(cfg: DictConfig, job_id: str, restart: int) -> int:
    if cfg.launcher.get("master_port"):
        return int(cfg.launcher.master_port)
    # Like submitit's (seeded by the job id: every task agrees), plus the restart count
    # so a requeued attempt never meets the previous attempt's socket.
    return random.Random(f"{job_id}/{restart}").randint(20000, 60000)


class SlurmTask(Checkpointable):
    """What every task of the job runs. Checkpointable for submitit (see module doc)."""

    def __init__(self, config_path: str, sweep_dir: str | None = None):
        self.config_path = str(config_path)
        self.sweep_dir = sweep_dir

    def __call__(self) -> dict:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        from launch.worker import run, setup_logging

        cfg = load(self.config_path)
        job = JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        # The submitting shell's own torch variables (exported by sbatch) must not leak in.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ["MASTER_PORT"] = str(_master_port(cfg, job.job_id, restart))
        dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        setup_logging()
        # A requeued attempt runs under the same job id: drop this task's old result file.
        job.paths.result_pickle.unlink(missing_ok=True)
        run_dir = Path(cfg.run_dir)
        rank0 = dist_env.rank == 0
        if rank0:
            attempt = {"job_id": job.job_id, "restart": restart, "started": _now(),
                       "nodes": list(job.hostnames), "world_size": dist_env.world_size,
                       "master": f"{dist_env.master_addr}:{dist_env.master_port}",
                       "secrets_in_env": sorted(secret_env())}  # names only
            update_state(run_dir, lambda s: s.setdefault("attempts", []).append(attempt))

        from trainers.watchdog import HANG_HANDLERS

        HANG_HANDLERS.append(lambda summary: self._requeue_after_hang(cfg, job.job_id, restart, summary))
        try:
            code = run(cfg)
        except BaseException as e:  # not an expected failure (those return a code): record, re-raise
            if rank0:
                note = f"{type(e).__name__}: {e}"  # (`e` is unbound once the except block ends)

                def failed(s: dict) -> None:
                    if "ended" not in s["attempts"][-1]:  # (checkpoint() may have recorded a requeue)
                        s["attempts"][-1].update(ended=_now(), status="failed", requeued=False, note=note)

                update_state(run_dir, failed)
                self._update_sweep()
            raise

        if not rank0:
            if code:
                sys.exit(code)
            return {"rank": dist_env.rank, "code": code}
        summary = read_json(run_dir / "summary.json")
        status = summary.get("status", "failed" if code else "unknown")
        requeue, note = False, ""
        if status == "preempted":
            requeue, note = self._should_requeue(cfg, job.job_id, restart)
        ended = {"ended": _now(), "status": status, "step": summary.get("final_step"),
                 "requeued": requeue, "note": note}

        def finish(s: dict) -> None:
            s["attempts"][-1].update(ended)
            if requeue:
                s["requeues"] = s.get("requeues", 0) + 1

        logger = logging.getLogger("launch")
        if requeue:
            update_state(run_dir, finish)  # first: SLURM signals (then kills) the tasks right away
            try:
                subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60,
                               capture_output=True, text=True)
            except (OSError, subprocess.SubprocessError) as e:
                why = (getattr(e, "stderr", None) or str(e)).strip()
                ended.update(requeued=False, note=f"scontrol requeue failed: {why}")

                def undo(s: dict) -> None:
                    s["attempts"][-1].update(ended)
                    s["requeues"] = s.get("requeues", 1) - 1

                update_state(run_dir, undo)
            else:
                logger.info("preempted at step %s: requeued job %s", summary.get("final_step"), job.job_id)
                sys.exit(-1)  # like submitit: no result file, the job comes back
        else:
            update_state(run_dir, finish)
        if ended["note"]:
            logger.warning("preempted at step %s, not requeued: %s", summary.get("final_step"), ended["note"])
        self._update_sweep()
        if code:
            sys.exit(code)
        return summary

    def _update_sweep(self) -> None:
        if self.sweep_dir:
            from launch.sweep import refresh_sweep_summary

            refresh_sweep_summary(Path(self.sweep_dir))

    def _requeue_after_hang(self, cfg: DictConfig, job_id: str, restart: int, summary: dict) -> None:
        """Runs on the rank that reported a hang (any rank: rank 0 may be the one that hung),
        just before every live rank exits: record the attempt and requeue like a preemption."""
        run_dir = Path(cfg.run_dir)
        requeue, note = self._should_requeue(cfg, job_id, restart)
        ended = {"ended": _now(), "status": "hung", "step": summary.get("final_step"), "requeued": requeue,
                 "note": note or f"hang watchdog: stopped ranks {summary['hang']['stopped_ranks']}"}

        def record(s: dict, count: int) -> None:
            if s.get("attempts"):
                s["attempts"][-1].update(ended)
            s["requeues"] = s.get("requeues", 0) + count

        # First: SLURM signals (then kills) the tasks as soon as the requeue is accepted.
        update_state(run_dir, lambda s: record(s, 1 if requeue else 0))
        if not requeue:
            return
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as e:
            ended.update(requeued=False, note=f"scontrol requeue failed: {(getattr(e, 'stderr', None) or str(e)).strip()}")
            update_state(run_dir, lambda s: record(s, -1))

    @staticmethod
    def _should_requeue(cfg: DictConfig, job_id: str, restart: int) -> tuple[bool, str]:
        limit = int(cfg.launcher.max_requeues)
        if restart >= limit:
            return False, f"launcher.max_requeues={limit} reached"
        state = _scontrol_state(job_id)
        if state != "RUNNING":
            return False, f"the job is {state} (cancelled, or requeued by SLURM itself)"
        return True, ""

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler (rank 0) calls this when the signal comes before the
        training loop took over the signals: nothing to save yet, requeue as is."""
        from submitit import JobEnvironment

        cfg = load(self.config_path)
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restart >= int(cfg.launcher.max_requeues):
            return None  # submitit then ends the job ("checkpoint function returned None")

        def change(s: dict) -> None:
            s["requeues"] = s.get("requeues", 0) + 1
            if s.get("attempts"):
                s["attempts"][-1].update(ended=_now(), status="preempted", requeued=True,
                                         note="signal before training started")

        update_state(Path(cfg.run_dir), change)
        logging.getLogger("launch").info("signal before training started: requeue %s", JobEnvironment().job_id)
        return DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------- after srun (batch script)
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


def after_srun(folder: Path, srun_exit: int) -> None:
    """Run by the batch script once srun has ended (every task gone). If a task of this
    attempt was ended by a signal (killed, OOM killer, segfault) and nobody requeued the
    job already (a preemption or a hang), record the attempt as `task died` and requeue
    it like a preemption, counted against launcher.max_requeues: the next attempt resumes
    from the last committed checkpoint. Errors are printed, never raised: the script
    still exits with srun's code."""
    from submitit import JobEnvironment
    from submitit.core.utils import DelayedSubmission as Delayed, JobPaths

    if srun_exit == 0:
        return
    job_id = JobEnvironment().job_id  # "<array>_<index>" for an array element
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    paths = JobPaths(Path(folder), job_id=job_id, task_id=0)
    try:
        task = Delayed.load(paths.submitted_pickle).function
        cfg = load(task.config_path)
        failure = first_task_failure(paths.stderr.read_text(errors="replace"))
    except (OSError, ValueError, EOFError, AttributeError) as e:
        print(f"llm-launcher: cannot tell why srun ended with {srun_exit} ({e}); not requeued", file=sys.stderr)
        return
    run_dir = Path(cfg.run_dir)
    attempts = read_state(run_dir).get("attempts") or []
    mine = attempts[-1] if attempts and attempts[-1].get("restart") == restart else {}  # this attempt's record
    if mine.get("requeued"):
        return  # preempted or hung: already requeued by rank 0 / the watchdog
    if failure is None or not failure["signal"]:  # a task's own error: requeuing would fail again
        if failure is not None and mine.get("status") != "hung":  # (a hang past the limit says so itself)
            print(f"llm-launcher: task {failure['tasks']} on {failure['node']}: {failure['how']} (its error is "
                  f"above); not requeued: a relaunch would fail the same way", file=sys.stderr, flush=True)
        return
    if _scontrol_state(job_id) != "RUNNING":
        # SLURM itself ended the tasks (scancel, scontrol requeue, time limit): its decision
        # stands, and rank 0's record of the attempt with it.
        return
    from trainers.checkpoint import latest_checkpoint

    resume = latest_checkpoint(run_dir / "checkpoints")
    what = (f"task {failure['tasks']} on {failure['node']}: {failure['how']}; the last committed checkpoint is "
            f"{resume.name if resume else 'none'}")
    requeue, why_not = SlurmTask._should_requeue(cfg, job_id, restart)
    ended = {"status": "task died", "step": last_logged_step(run_dir),
             "task_died": {k: failure[k] for k in ("node", "tasks", "how")},
             "requeued": requeue, "note": what + (f"; not requeued: {why_not}" if why_not else "")}

    def record(s: dict, count: int) -> None:
        tries = s.setdefault("attempts", [])
        if not tries or tries[-1].get("restart") != restart:  # died before rank 0 recorded it
            tries.append({"job_id": job_id, "restart": restart})
        mine = tries[-1]
        if mine.get("note") and "task_died" not in mine:  # rank 0's own error (a lost peer, usually)
            mine["error"] = mine["note"]
        mine.update(ended, ended=mine.get("ended") or _now())
        s["requeues"] = s.get("requeues", 0) + count

    update_state(run_dir, lambda s: record(s, 1 if requeue else 0))  # first: the requeue ends this script
    if requeue:
        print(f"llm-launcher: {what}; requeuing job {job_id} like a preemption (restart {restart + 1} "
              f"of at most {cfg.launcher.max_requeues}); it resumes from the last committed checkpoint",
              file=sys.stderr, flush=True)
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as e:
            ended.update(requeued=False, note=f"{what}; scontrol requeue failed: "
                                              f"{(getattr(e, 'stderr', None) or str(e)).strip()}")
            update_state(run_dir, lambda s: record(s, -1))
    else:
        print(f"llm-launcher: {what}; not requeued: {why_not}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "after-srun":
        after_srun(Path(argv[1]), int(argv[2]))
        return 0
    print("usage: python -m launch.slurm after-srun SUBMITIT_FOLDER SRUN_EXIT_CODE "
          "(run by the sbatch script after srun)", file=sys.stderr)
    return 2


# --------------------------------------------------------------- submission side
def _tasks(cfg: DictConfig) -> int:
    return int(cfg.launcher.nodes) * int(cfg.launcher.gpus_per_node)


def run_slurm(cfg: DictConfig, config_path: Path) -> int:
    from launch import sweep

    if sweep.current() is not None:  # collected; SweepCallback submits one array at the end
        sweep.add_pending(cfg, config_path)
        return 0
    run_dir = Path(cfg.run_dir)
    folder = new_folder(run_dir)
    executor = make_executor(cfg, folder)
    refuse_secrets({"sbatch script": render_script(cfg, folder), "saved config": config_path.read_text()})
    try:
        job = executor.submit(SlurmTask(str(config_path)))
    except Exception as e:  # sbatch refused (bad partition, account, ...)
        raise UserError(f"sbatch refused the job: {e}") from None
    record_submission(run_dir, job.job_id, folder, _tasks(cfg), int(cfg.launcher.max_requeues))
    logs = log_paths(folder, job.job_id, 1)["rank0"]
    print(f"submitted job {job.job_id}: {cfg.launcher.nodes} node(s) x {cfg.launcher.gpus_per_node} task(s)\n"
          f"  run dir  {run_dir}\n  log      {logs['stderr']}\n"
          f"  status   python -m launch.status {run_dir}", flush=True)
    if not cfg.launcher.get("wait"):
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


def submit_array(points: list, sweep_dir: Path) -> list[str]:
    """Submit sweep points (launch.sweep.Point) as job arrays: one per distinct set of
    sbatch parameters (normally exactly one). Returns the job ids, in point order."""
    groups: dict[str, list] = {}
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
        except Exception as e:
            raise UserError(f"sbatch refused the sweep: {e}") from None
        for p, job in zip(group, jobs):
            record_submission(Path(p.run_dir), job.job_id, folder, _tasks(p.cfg), int(p.cfg.launcher.max_requeues))
            ids[p.num] = job.job_id
    return [ids[p.num] for p in points]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
