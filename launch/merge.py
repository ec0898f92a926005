"""Merge fine-tuned models: `python -m launch.merge method=M inputs=[RUN_OR_MODEL,...] [base=PATH]
[weights=[...]] [density=...] [t=...] [lambda=...] [out=DIR]`, or `sweep=SWEEP_DIR` for a
sweep's completed points. `--cfg job` prints the config, `dry_run=true` the plan and its
memory estimate. Methods, inputs and reports: docs/merging.md; the work: launch/merging/.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from launch.config import register_resolvers
from trainers.errors import UserError

register_resolvers()


def main(cfg: DictConfig) -> int:
    """Merge (or with dry_run, plan) and turn refusals into one paragraph and exit code 2."""
    from launch.merging.run import dry_run_text, execute, prepare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        plan = prepare(cfg)
        if cfg.dry_run:
            print(dry_run_text(plan))
            return 0
        rep = execute(plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep["table"])
    print(f"merged model: {rep['out']}  (train on: python launch.py model.path={rep['out']})")
    return 0


@hydra.main(version_base=None, config_path="../conf/merge", config_name="merge")
def app(cfg: DictConfig) -> None:
    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    app()
