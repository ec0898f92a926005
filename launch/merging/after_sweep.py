"""`python launch.py -m ... merge.after_sweep=METHOD`: when a sweep's points have finished,
merge the completed ones (what `python -m launch.merge sweep=SWEEP_DIR method=METHOD` does
afterwards), so "sweep, then soup" is one command. Called by launch/sweep_callback.py."""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from launch.config import REPO_ROOT
from trainers.errors import UserError


def check(cfg) -> None:
    """Before any point starts: a known method, and only on a multirun."""
    method = cfg.merge.after_sweep
    if method is None:
        return
    from launch import sweep
    from launch.merging.methods import get_method

    get_method(method, "merge.after_sweep")
    if sweep.current() is None:
        raise UserError(f"merge.after_sweep={method} merges a sweep's points when it ends; this is a single run "
                        f"(no -m). Add -m with swept values, or merge runs with python -m launch.merge "
                        f"method={method} inputs=[RUN_DIR,...].")


def merge_config(sweep_dir: Path, method: str):
    """conf/merge/merge.yaml's defaults for this sweep and method."""
    node = OmegaConf.load(REPO_ROOT / "conf" / "merge" / "merge.yaml")
    for key in ("defaults", "hydra"):
        node.pop(key, None)
    node.method, node.sweep = str(method), str(sweep_dir)
    OmegaConf.set_struct(node, True)
    return node


def merge_sweep(sweep_dir: Path, method: str) -> int:
    """Merge the sweep's completed points; prints the report table. Exit code: 0, or 2 when refused."""
    from launch.merging.run import execute, prepare

    print(f"\nmerge.after_sweep={method}: merging the completed points of {sweep_dir}", flush=True)
    try:
        rep = execute(prepare(merge_config(sweep_dir, method)))
    except UserError as e:
        print(f"error: merge.after_sweep={method}: {e}", file=sys.stderr, flush=True)
        return 2
    print(rep["table"], flush=True)
    print(f"merged model: {rep['out']}  (train on: python launch.py model.path={rep['out']})", flush=True)
    return 0
