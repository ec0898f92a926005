"""Sweeps: `python launch.py -m method.r=8,16 optim.lr=1e-4,2e-4 [launcher=slurm]`.

Hydra enumerates the points and calls the app once per point (each gets its own run dir,
SWEEP_DIR/<num>, and is an ordinary run: own checkpoints, resumable on its own).

  launcher=local  the points run one after another in this process;
  launcher=slurm  each point is validated and its config saved, then SweepCallback
                  (launch/sweep_callback.py) submits all of them as one SLURM job
                  array when Hydra is done (launch/on_slurm.py -> slurm/submit.py).

This module holds the sweep's files, which the submitter, every point's job and
`python -m launch.status` read and write: the points are found in sweep.json, never in
the memory of the process that ran Hydra.

SWEEP_DIR/sweep.json                 the points: overrides, run dirs, job ids
SWEEP_DIR/sweep_summary.{md,json}    one row per point: status, steps, final eval loss,
                                     best marked. Written when a local sweep ends; on
                                     SLURM by every point's job as it finishes (under a
                                     file lock, so the last one writes the complete
                                     table); refreshed by `python -m launch.status SWEEP_DIR`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launch.config import load
from launch.run_state import IN_PROGRESS, derive_status, needs_scheduler, read_state
from slurm.scheduler import job_state
from trainers.files import atomic_write, locked, read_json, update_json, write_json

MANIFEST = "sweep.json"
SUMMARY = "sweep_summary"


@dataclass
class Point:
    num: int
    overrides: list[str]
    run_dir: str
    config_path: str
    cfg: DictConfig


def current() -> dict | None:
    """This Hydra job's place in a sweep (None outside a multirun)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {"sweep_dir": Path(hc.sweep.dir).resolve(), "num": int(hc.job.num),
            "overrides": list(hc.overrides.task)}


# --------------------------------------------------------------------- manifest
def update_manifest(sweep_dir: Path, change) -> dict:
    return update_json(Path(sweep_dir) / MANIFEST, change)


def register(cfg: DictConfig, config_path: Path) -> None:
    """Record this point in SWEEP_DIR/sweep.json (any launcher)."""
    here = current()
    if here is None:
        return

    def change(m: dict) -> None:
        m.setdefault("sweep_dir", str(here["sweep_dir"]))
        m["launcher"] = cfg.launcher.name
        points = [p for p in m.get("points", []) if p["num"] != here["num"]]
        points.append({"num": here["num"], "overrides": here["overrides"], "run_dir": str(cfg.run_dir),
                       "config_path": str(config_path), "launcher": cfg.launcher.name})
        m["points"] = sorted(points, key=lambda p: p["num"])

    update_manifest(here["sweep_dir"], change)


def registered_points(sweep_dir: Path, launcher: str) -> list[Point]:
    """The points of this launcher in sweep.json, with their saved configs."""
    return [Point(p["num"], p["overrides"], p["run_dir"], p["config_path"], load(p["config_path"]))
            for p in read_json(Path(sweep_dir) / MANIFEST).get("points", []) if p.get("launcher") == launcher]


# ---------------------------------------------------------------------- summary
def _parse(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def _row(point: dict) -> dict:
    run_dir = Path(point["run_dir"])
    summary, state = read_json(run_dir / "summary.json"), read_state(run_dir)
    scheduler_state = job_state(state["job_id"]) if needs_scheduler(summary, state) else None
    return {
        "num": point["num"], "overrides": point["overrides"],
        "params": dict(_parse(o) for o in point["overrides"]),
        "run_dir": str(run_dir), "status": derive_status(summary, state, scheduler_state),
        "final_step": summary.get("final_step"), "final_eval_loss": summary.get("final_eval_loss"),
        "final_loss": summary.get("final_loss"), "job_id": state.get("job_id"), "requeues": state.get("requeues"),
    }


def refresh_sweep_summary(sweep_dir: Path) -> dict:
    """Build and write SWEEP_DIR/sweep_summary.{json,md}; returns the JSON data."""
    sweep_dir = Path(sweep_dir)
    with locked(sweep_dir / (SUMMARY + ".json")):
        manifest = read_json(sweep_dir / MANIFEST)
        rows = [_row(p) for p in manifest.get("points", [])]
        metric = "final_eval_loss" if any(r["final_eval_loss"] is not None for r in rows) else "final_loss"
        done = [r for r in rows if r["status"] == "completed" and r[metric] is not None]
        best = min(done, key=lambda r: r[metric])["num"] if done else None
        keys = sorted({k for r in rows for k in r["params"]})
        varying = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1] or keys
        data = {
            "sweep_dir": str(sweep_dir), "launcher": manifest.get("launcher"),
            "complete": bool(rows) and all(r["status"] not in IN_PROGRESS for r in rows),
            "metric": metric, "best": best, "varying": varying, "points": rows,
        }
        write_json(sweep_dir / (SUMMARY + ".json"), data)
        atomic_write(sweep_dir / (SUMMARY + ".md"), markdown(data))
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
