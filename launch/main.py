"""What `python launch.py ...` does once Hydra has composed the config."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from launch import config as config_io
from launch import sweep
from launch.command_line import check_run_dir
from launch.credentials import check_config as check_credentials
from launch.estimate import check as memory_check
from launch.schema import check_closed
from launch.host_memory import check_host_memory
from launch.optim_checks import apply_epochs
from launch.relaunch import check_relaunch
from launch.run_lock import RunDirLock, refuse_active_job
from launch.validate import check, check_data_suits_model, prepare_data
from trainers.errors import TrainingError, UserError
from trainers.registry import resolve

log = logging.getLogger("launch")


# launcher name -> "module:function(cfg, config_path) -> exit code"
LAUNCHERS = {
    "local": "launch.local:run_local",
    "slurm": "launch.on_slurm:run_slurm",
}


def launcher_for(name: str):
    return resolve(LAUNCHERS, name, "launcher")


def run(cfg: DictConfig, run_dir: str) -> int:
    check_credentials(cfg)  # before anything is printed or written
    check_closed(cfg)  # a key conf/ does not define (`+train.num_epochs=3`) would be ignored
    check_run_dir(run_dir)  # Hydra's entry point checked it before creating it (launch/command_line.py)
    cfg = config_io.finalize(cfg, run_dir)
    if cfg.dry_run:
        return dry_run(cfg)
    # One launch at a time per run dir (launch/run_lock.py): a local launch holds it to the end;
    # for SLURM it covers the checks and the submission, then the job's rank 0 takes it.
    with RunDirLock.acquire(Path(cfg.run_dir)) as lock:
        if cfg.launcher.name != "local":
            refuse_active_job(Path(cfg.run_dir))  # a job of this run dir still pending or running
        checks(cfg)
        launch_fn = launcher_for(cfg.launcher.name)
        check_data_suits_model(cfg)
        for line in prepare_data(cfg):
            log.info("data ok: %s", line)
        if epochs := apply_epochs(cfg):  # train.epochs -> train.max_steps, from the prepared rows
            log.info("length: %s", epochs)
        config_path = Path(cfg.run_dir) / "config.yaml"
        config_io.save(cfg, config_path)
        sweep.register(cfg, config_path)  # no-op outside `-m`
        if cfg.launcher.name != "local":
            lock.release()
        code = launch_fn(cfg, config_path)
    if code == 0 and cfg.eval.harness.tasks and cfg.launcher.name == "local":  # SLURM jobs end later
        from launch.evaluate import evaluate_run

        results = evaluate_run(Path(cfg.run_dir), list(cfg.eval.harness.tasks), cfg.eval.harness.limit)
        for task, scores in results.items():
            log.info("harness: %s %s", task, " ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    return code


def checks(cfg: DictConfig, dry: bool = False) -> None:
    """Everything refused before data is read or a process started."""
    check(cfg)
    check_relaunch(cfg)  # a resume whose changed settings the checkpoint cannot load
    memory_check(cfg)  # refuses what cannot fit launcher.gpu_mem_gb (SLURM), before anything runs
    if not dry:  # the dry run reports it (launch/plan_report.py)
        check_host_memory(cfg)  # local workers that cannot fit this machine's free memory


def dry_run(cfg: DictConfig) -> int:
    from launch.plan_report import dry_run_report

    checks(cfg, dry=True)
    if cfg.train.epochs is not None:  # counting the rows needs the token cache (built once, kept)
        check_data_suits_model(cfg)
        prepare_data(cfg)
    print(dry_run_report(cfg, apply_epochs(cfg)))
    return 0


def main(cfg: DictConfig, run_dir: str) -> int:
    """Run and turn expected failures into one paragraph on stderr and an exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return run(cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training took the signal over, or a second one (StopRequest)
        print(f"interrupted: stopped at once; relaunch with hydra.run.dir={Path(run_dir).resolve()} to resume "
              f"from its last committed checkpoint", file=sys.stderr)
        return 130
