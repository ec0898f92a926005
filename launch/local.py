"""launcher=local: in-process for one worker, torch's elastic launcher for several.

A worker that dies (SIGKILL, the OOM killer, a segfault) is seen by the elastic agent
within its monitor interval; the agent stops the others (the survivors' collectives fail
as soon as the dead peer's sockets close), and the launcher names the dead rank and its
signal. With launcher.max_restarts=K the agent starts the whole group again up to K
times instead, and the new workers resume from the last committed checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

from trainers.distributed import free_port
from trainers.errors import TrainingError
from trainers.files import read_json, write_json


def run_local(cfg, config_path: Path) -> int:
    n = int(cfg.launcher.nproc_per_node)
    if n == 1:
        from launch.worker import run, setup_logging

        setup_logging()
        code = run(cfg)
        if read_json(Path(cfg.run_dir) / "summary.json").get("status") == "interrupted":
            return stopped(cfg, signal.SIGINT)
        return code

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launcher.master_port or free_port()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # Workers get a store of their own (rank 0 hosts it, on a new port each attempt)
    # instead of sharing the agent's rendezvous store: in the shared one, a restarted
    # group's gloo rendezvous found the dead attempt's keys and waited forever to connect.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"run-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=int(cfg.launcher.max_restarts),
        monitor_interval=0.5,
        start_method="spawn",
        # SIGTERM / Ctrl-C to the launcher: the agent forwards it and gives the workers this
        # long to reach a step boundary and commit a checkpoint before it kills them (workers
        # still starting exit at once); a second Ctrl-C stops everything at once.
        shutdown_timeout=shutdown_allowance(cfg),
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "launch.worker", str(config_path))
    except SignalException as e:
        # The workers got the same signal, saved a checkpoint at the next step boundary and
        # wrote summary.json with status "preempted" (SIGINT: "interrupted"); relaunching resumes.
        return stopped(cfg, e.sigval)
    except ChildFailedError as e:
        raise TrainingError(failure_message(e, Path(cfg.run_dir), cfg.launcher.max_restarts)) from None
    return 0


def shutdown_allowance(cfg) -> int:
    """Seconds for a step and a checkpoint save (the hang watchdog's allowances), 1 h without them."""
    from trainers.watchdog import allowances

    step, long = allowances(cfg.train)
    return int(step + long) if step else 3600


def stopped(cfg, sig: signal.Signals) -> int:
    """One line on where a stopped run is and how to resume it; the shell's exit code."""
    summary = read_json(Path(cfg.run_dir) / "summary.json")
    latest = Path(cfg.run_dir) / "checkpoints" / "latest"
    saved = f"checkpoint {latest.read_text().strip()} committed" if latest.exists() else "no checkpoint yet"
    what = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
    print(f"{what} at step {summary.get('final_step', 0)} ({saved}): relaunch with "
          f"hydra.run.dir={cfg.run_dir} to resume", file=sys.stderr, flush=True)
    return 128 + int(sig)


def how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def failure_message(error, run_dir: Path, restarts: int) -> str:
    """One paragraph on why the worker group ended; also recorded in summary.json, which a
    worker killed outright could not write. A hang was already reported by the workers'
    watchdog (stack files, the ranks that stopped): its message is the one to show."""
    path = run_dir / "summary.json"
    summary = read_json(path)
    if summary.get("status") == "hung" and summary.get("error"):
        return summary["error"]
    # The rank that died, not the ones the agent stopped (SIGTERM) or whose collectives
    # then failed (exit code 1); the earliest failure when nothing was killed.
    killed = [(r, f) for r, f in sorted(error.failures.items()) if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    first_rank, first = killed[0] if killed else error.get_first_failure()
    others = [f"rank {r} (pid {f.pid}) {how_it_ended(f.exitcode)}"
              for r, f in sorted(error.failures.items()) if r != first_rank]
    message = (
        f"Rank {first_rank} (pid {first.pid}) {how_it_ended(first.exitcode)}"
        + (f"; then {', '.join(others)}" if others else "")
        + (f", after {restarts} restart(s) of the worker group" if restarts else "")
        + ". Any error it printed is above. Nothing past the last committed checkpoint is lost: "
        f"relaunch with hydra.run.dir={run_dir} to resume"
        + ("" if restarts else ", or set launcher.max_restarts=K to restart the workers automatically")
        + "."
    )
    summary.update(status="failed", error=message, failed_ranks=[
        {"rank": r, "pid": f.pid, "exitcode": f.exitcode,
         "signal": f.signal_name() if f.exitcode < 0 else None} for r, f in sorted(error.failures.items())])
    write_json(path, summary)
    return message
