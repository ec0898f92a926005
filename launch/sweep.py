"""Sweeps: `python launch.py -m method.r=8,16 optim.lr=1e-4,2e-4 [launcher=slurm]`.

Hydra enumerates the points and calls the app once per point (each gets its own run dir,
SWEEP_DIR/<num>, and is an ordinary run: own checkpoints, resumable on its own).

  launcher=local  the points run one after another in this process;
  launcher=slurm  each point is validated and its config saved, then SweepCallback
                  submits all of them as one SLURM job array when Hydra is done.

SWEEP_DIR/sweep.json                 the points: overrides, run dirs, job ids
SWEEP_DIR/sweep_summary.{md,json}    one row per point: status, steps, final eval loss,
                                     best marked. Written when a local sweep ends; on
                                     SLURM by every point's job as it finishes (under a
                                     file lock, so the last one writes the complete
                                     table); refreshed by `python -m launch.status SWEEP_DIR`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainers.files import locked, read_json, update_json, write_json

MANIFEST = "sweep.json"
SUMMARY = "sweep_summary"
FINAL = {"completed", "failed", "preempted", "cancelled"}


@dataclass
class Point:
    num: int
    overrides: list[str]
    run_dir: str
    config_path: str
    cfg: Any


_PENDING: list[Point] = []  # slurm points waiting for the array submission
_FAILED: list[int] = []      # points whose app call returned non-zero
_SWEEP_DIR: list[Path] = []


def current() -> dict | None:
    """This Hydra job's place in a sweep (None outside a multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return {"sweep_dir": Path(hc.sweep.dir).resolve(), "num": int(hc.job.num),
                "overrides": list(hc.overrides.task)}
    except Exception:  # not under Hydra
        return None


# --------------------------------------------------------------------- manifest
def _update_manifest(sweep_dir: Path, change) -> dict:
    return update_json(sweep_dir / MANIFEST, change)


def register(cfg: DictConfig, config_path: Path) -> None:
    """Record this point in SWEEP_DIR/sweep.json (any launcher)."""
    here = current()
    if here is None:
        return
    sweep_dir = here["sweep_dir"]
    if not _SWEEP_DIR:
        _SWEEP_DIR.append(sweep_dir)

    def change(m: dict) -> None:
        m.setdefault("sweep_dir", str(sweep_dir))
        m["launcher"] = cfg.launcher.name
        points = [p for p in m.get("points", []) if p["num"] != here["num"]]
        points.append({"num": here["num"], "overrides": here["overrides"], "run_dir": str(cfg.run_dir)})
        m["points"] = sorted(points, key=lambda p: p["num"])

    _update_manifest(sweep_dir, change)


def add_pending(cfg: DictConfig, config_path: Path) -> None:
    here = current()
    _PENDING.append(Point(here["num"], here["overrides"], str(cfg.run_dir), str(config_path), cfg))


# ---------------------------------------------------------------------- summary
def _parse(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def point_status(summary: dict, state: dict) -> str:
    """From the point's summary.json and (SLURM) state.json."""
    attempts = state.get("attempts") or []
    if attempts and "ended" not in attempts[-1]:
        return "running"
    if attempts and attempts[-1].get("requeued"):
        return "requeued"
    if summary:
        return summary.get("status", "unknown")
    if state.get("job_id"):
        return "pending"
    return "not started"


def refresh_sweep_summary(sweep_dir: Path) -> dict:
    """Build and write SWEEP_DIR/sweep_summary.{json,md}; returns the JSON data."""
    from launch.slurm import read_state

    sweep_dir = Path(sweep_dir)
    with locked(sweep_dir / (SUMMARY + ".json")):
        manifest = read_json(sweep_dir / MANIFEST)
        rows = []
        for p in manifest.get("points", []):
            run_dir = Path(p["run_dir"])
            s, state = read_json(run_dir / "summary.json"), read_state(run_dir)
            status = point_status(s, state)
            rows.append({
                "num": p["num"], "overrides": p["overrides"], "params": dict(_parse(o) for o in p["overrides"]),
                "run_dir": str(run_dir), "status": status, "final_step": s.get("final_step"),
                "final_eval_loss": s.get("final_eval_loss"), "final_loss": s.get("final_loss"),
                "job_id": state.get("job_id"), "requeues": state.get("requeues"),
            })
        metric = "final_eval_loss" if any(r["final_eval_loss"] is not None for r in rows) else "final_loss"
        done = [r for r in rows if r["status"] == "completed" and r[metric] is not None]
        best = min(done, key=lambda r: r[metric])["num"] if done else None
        keys = sorted({k for r in rows for k in r["params"]})
        varying = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1] or keys
        data = {
            "sweep_dir": str(sweep_dir), "launcher": manifest.get("launcher"),
            "complete": bool(rows) and all(r["status"] in FINAL for r in rows),
            "metric": metric, "best": best, "varying": varying, "points": rows,
        }
        write_json(sweep_dir / (SUMMARY + ".json"), data)
        (sweep_dir / (SUMMARY + ".md")).write_text(markdown(data))
    return data


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(data: dict) -> str:
    metric = data["metric"].replace("final_", "").replace("_", " ")
    head = ["#", *data["varying"], "status", "step", "eval loss", "train loss", "best"]
    lines = [
        "# Sweep summary", "",
        f"sweep dir: `{data['sweep_dir']}`  ",
        f"points: {len(data['points'])} ({sum(r['status'] == 'completed' for r in data['points'])} completed)"
        f"{'' if data['complete'] else ', still running'}; best = lowest final {metric}", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for r in data["points"]:
        cells = [str(r["num"]), *[r["params"].get(k, "") for k in data["varying"]], r["status"],
                 _fmt(r["final_step"]), _fmt(r["final_eval_loss"]), _fmt(r["final_loss"]),
                 "**best**" if r["num"] == data["best"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Run dirs: " + ", ".join(f"{r['num']}=`{r['run_dir']}`" for r in data["points"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------- callback
class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks); does nothing outside -m."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _PENDING.clear(), _FAILED.clear(), _SWEEP_DIR.clear()

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if current() is None:
            return
        if job_return.status != JobStatus.COMPLETED or job_return._return_value not in (0, None):
            _FAILED.append(int(config.hydra.job.num))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _SWEEP_DIR[0] if _SWEEP_DIR else Path(str(config.hydra.sweep.dir)).resolve()
        if _PENDING:
            self._submit(sweep_dir)
        elif (sweep_dir / MANIFEST).exists():
            data = refresh_sweep_summary(sweep_dir)
            print(f"\nsweep summary: {sweep_dir / (SUMMARY + '.md')}\n\n{markdown(data)}", flush=True)
            if _FAILED:
                sys.exit(1)

    @staticmethod
    def _submit(sweep_dir: Path) -> None:
        from launch.slurm import submit_array, wait_for
        from trainers.errors import UserError

        points = list(_PENDING)
        _PENDING.clear()
        if _FAILED:
            print(f"error: the sweep was not submitted: point(s) {', '.join(map(str, sorted(_FAILED)))} "
                  f"were refused (messages above).", file=sys.stderr)
            sys.exit(2)
        try:
            ids = submit_array(points, sweep_dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        _update_manifest(sweep_dir, lambda m: m.update(job_ids=sorted(set(i.split("_")[0] for i in ids))))
        refresh_sweep_summary(sweep_dir)
        print(f"submitted {len(points)} point(s) as job(s) {', '.join(ids)}\n"
              f"  sweep dir  {sweep_dir}\n  status     python -m launch.status {sweep_dir}", flush=True)
        if not any(p.cfg.launcher.get("wait") for p in points):
            return
        wait_for(ids)
        data = refresh_sweep_summary(sweep_dir)
        print(f"\nsweep summary: {sweep_dir / (SUMMARY + '.md')}\n\n{markdown(data)}", flush=True)
        if any(r["status"] != "completed" for r in data["points"]):
            sys.exit(1)
