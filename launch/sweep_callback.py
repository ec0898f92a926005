"""Hydra's side of a sweep (`python launch.py -m ...`): registered in conf/config.yaml
(hydra.callbacks), does nothing outside -m.

When Hydra has called the app for every point, the callback submits the launcher=slurm
points (found in SWEEP_DIR/sweep.json, see launch/sweep.py) as one job array, or prints
the summary of a local sweep; its exit code says whether every point completed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from launch.on_slurm import submit_sweep, wait_sweep
from launch.sweep import MANIFEST, SUMMARY, Point, current, markdown, refresh_sweep_summary, registered_points, \
    update_manifest
from trainers.errors import UserError


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.refused: list[int] = []  # points whose app call failed or returned non-zero

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.refused = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if current() is None:
            return
        if job_return.status != JobStatus.COMPLETED or job_return.return_value not in (0, None):
            self.refused.append(int(config.hydra.job.num))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The same directory every point saw: Hydra's resolver cache keeps ${now:...} fixed.
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        batched = registered_points(sweep_dir, "slurm")
        if batched:
            self._submit(sweep_dir, batched)
        elif (sweep_dir / MANIFEST).exists():
            _print_summary(sweep_dir, refresh_sweep_summary(sweep_dir))
            merged = _merge_after(config, sweep_dir)
            if self.refused or merged:
                sys.exit(1 if self.refused else merged)
        elif self.refused:  # every point refused (or a dry run with refusals): nothing ran
            print(f"error: no point of the sweep ran: point(s) {', '.join(map(str, sorted(self.refused)))} "
                  f"were refused (messages above).", file=sys.stderr)
            sys.exit(2)

    def _submit(self, sweep_dir: Path, points: list[Point]) -> None:
        if self.refused:
            print(f"error: the sweep was not submitted: point(s) {', '.join(map(str, sorted(self.refused)))} "
                  f"were refused (messages above).", file=sys.stderr)
            sys.exit(2)
        try:
            ids = submit_sweep(points, sweep_dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        update_manifest(sweep_dir, lambda m: m.update(job_ids=sorted(set(i.split("_")[0] for i in ids))))
        refresh_sweep_summary(sweep_dir)
        print(f"submitted {len(points)} point(s) as job(s) {', '.join(ids)}\n"
              f"  sweep dir  {sweep_dir}\n  status     python -m launch.status {sweep_dir}", flush=True)
        if not any(p.cfg.launcher.wait for p in points):
            if points[0].cfg.merge.after_sweep is not None:
                print(f"  merge      python -m launch.merge sweep={sweep_dir} method={points[0].cfg.merge.after_sweep}"
                      f"  (once the points have finished)", flush=True)
            return
        try:
            wait_sweep(points, ids)
        except UserError as e:  # a job that can never start (cancelled)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        data = refresh_sweep_summary(sweep_dir)
        _print_summary(sweep_dir, data)
        merged = _merge_after(points[0].cfg, sweep_dir)
        if any(r["status"] != "completed" for r in data["points"]) or merged:
            sys.exit(1 if any(r["status"] != "completed" for r in data["points"]) else merged)


def _merge_after(config: DictConfig, sweep_dir: Path) -> int:
    """merge.after_sweep: merge the completed points (launch/merging/after_sweep.py)."""
    method = config.merge.after_sweep
    if method is None:
        return 0
    from launch.merging.after_sweep import merge_sweep

    return merge_sweep(sweep_dir, method)


def _print_summary(sweep_dir: Path, data: dict) -> None:
    print(f"\nsweep summary: {sweep_dir / (SUMMARY + '.md')}\n\n{markdown(data)}", flush=True)
