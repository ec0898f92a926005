"""The sbatch script of a run, rendered by submitit from the config.

Every config value that reaches the script is quoted (submitit quotes #SBATCH values;
ours use shlex.quote) or refused when it holds a newline or control character;
`launcher.setup` lines are shell commands and are written verbatim. Options the launcher
sets itself cannot be overridden through launcher.sbatch: the message names the
launcher.* key to use instead.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from trainers.errors import UserError

# sbatch options the launcher sets itself (or takes from a launcher.* key).
MANAGED = {
    "output": None, "error": None, "array": None, "signal": "launcher.signal_lead_s",
    "open-mode": None, "wrap": None, "nodes": "launcher.nodes", "ntasks-per-node": "launcher.gpus_per_node",
    "ntasks": "launcher.nodes x launcher.gpus_per_node", "time": "launcher.time_min",
    "partition": "launcher.partition", "account": "launcher.account", "qos": "launcher.qos",
    "mem": "launcher.mem_gb", "constraint": "launcher.constraint", "cpus-per-task": "launcher.cpus_per_task",
    "gpus-per-node": "launcher.gpus_per_node", "job-name": None,
}
_OPTION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Printed by the batch script where each attempt's srun output begins: requeued attempts
# append to the same log, and after_srun must read only this attempt's verdicts.
ATTEMPT_MARK = "llm-launcher: srun starts, attempt"


def _plain(key: str, value) -> str:
    text = str(value)
    if _CONTROL.search(text):
        raise UserError(f"{key}={text!r} contains a newline or control character; refusing to put it in an sbatch script.")
    return text


def sbatch_parameters(cfg: DictConfig, repo_root: str, job_name: str | None = None) -> dict:
    """submitit SlurmExecutor parameters (its own names) for this config; `repo_root` goes on
    the job's PYTHONPATH (the launcher's code the job imports)."""
    L = cfg.launcher
    tasks = int(L.gpus_per_node)
    params: dict = {
        "job_name": _plain("job name", job_name or f"llm-{cfg.run_name}"),
        "nodes": int(L.nodes),
        "ntasks_per_node": tasks,
        "cpus_per_task": int(L.cpus_per_task),
        "time": int(L.time_min),
        "signal_delay_s": int(L.signal_lead_s),
        "setup": setup_lines(cfg, repo_root),
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


def setup_lines(cfg: DictConfig, repo_root: str) -> list[str]:
    """Shell lines run before srun: ours (values quoted), then launcher.setup verbatim."""
    ours = [
        f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
    ]
    user = []
    for i, line in enumerate(cfg.launcher.get("setup") or []):
        if not isinstance(line, str):
            raise UserError(f"launcher.setup[{i}]={line!r} must be a shell line (a string).")
        user.append(line)
    return ours + user


def job_script_lines(folder: Path) -> dict[str, list[str]]:
    """What the batch script runs around srun (submitit's setup and teardown): a mark in
    the batch log where this attempt's srun output begins, and after srun, slurm.after_srun's
    decision about a task that died. The script then exits with srun's code, so a job
    that is not requeued still ends FAILED."""
    python = shlex.quote(sys.executable)
    return {
        "setup": [f'echo "{ATTEMPT_MARK} ${{SLURM_RESTART_COUNT:-0}} of job ${{SLURM_JOB_ID}}" >&2'],
        "teardown": ["srun_exit=$?",
                     f"{python} -m slurm.after_srun {shlex.quote(str(folder))} $srun_exit",
                     "exit $srun_exit"],
    }


def _script_parameters(cfg: DictConfig, folder: Path, repo_root: str, job_name: str | None) -> dict:
    params = sbatch_parameters(cfg, repo_root, job_name)
    around = job_script_lines(folder)
    params.update(setup=params["setup"] + around["setup"], teardown=around["teardown"])
    return params


def make_executor(cfg: DictConfig, folder: Path, repo_root: str, job_name: str | None = None):
    from submitit import SlurmExecutor

    try:
        executor = SlurmExecutor(folder=folder, max_num_timeout=int(cfg.launcher.max_requeues))
    except RuntimeError as e:  # no srun on this machine
        raise UserError(f"launcher=slurm needs the SLURM client tools here ({e}).") from None
    try:
        executor.update_parameters(**_script_parameters(cfg, folder, repo_root, job_name))
    except ValueError as e:
        raise UserError(f"SLURM parameters refused by submitit: {e}") from None
    return executor


def render_script(cfg: DictConfig, folder: Path, repo_root: str, job_name: str | None = None,
                  array: int | None = None) -> str:
    """The exact sbatch script submitit would submit (nothing is written or submitted):
    what dry runs show and what the secrets check reads."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = _script_parameters(cfg, folder, repo_root, job_name)
    if array:
        params["map_count"] = array
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    # Same call as SlurmExecutor._make_submission_file_text (which needs srun to exist).
    return _make_sbatch_string(command=command, folder=folder, **params)


def new_folder(base: Path) -> Path:
    """BASE/slurm/submission-N, fresh for every submission from this directory: job ids
    restart at 1 on a new cluster, and submitit would read a reused folder's stale results."""
    root = Path(base) / "slurm"
    n = 1
    while (root / f"submission-{n}").exists():
        n += 1
    return root / f"submission-{n}"


def log_paths(folder: Path, job_id: str, tasks: int) -> dict[str, dict[str, str]]:
    from submitit.core.utils import JobPaths

    out = {}
    for t in range(tasks):
        p = JobPaths(folder, job_id=job_id, task_id=t)
        out[f"rank{t}"] = {"stdout": str(p.stdout), "stderr": str(p.stderr)}
    return out
