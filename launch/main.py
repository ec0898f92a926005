"""What `python launch.py ...` does once Hydra has composed the config."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launch import config as config_io
from launch.validate import check, check_data, world_size
from trainers.errors import TrainingError, UserError

log = logging.getLogger("launch")


def run(cfg: DictConfig, run_dir: str) -> int:
    cfg = config_io.finalize(cfg, run_dir)
    check(cfg)
    if cfg.dry_run:
        from launch.plan_report import describe

        print(describe(cfg))
        return 0
    for line in check_data(cfg):
        log.info("data ok: %s", line)
    config_path = Path(cfg.run_dir) / "config.yaml"
    config_io.save(cfg, config_path)
    if cfg.launcher.name == "local":
        from launch.local import run_local

        return run_local(cfg, config_path)
    raise UserError(f"launcher={cfg.launcher.name!r} is not available; use launcher=local.")


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
