"""State of a run or a sweep: `python -m launch.status RUN_DIR|SWEEP_DIR [--json]`.

For a run: job id, SLURM state (slurmctld, else sacct), attempts and requeues, last
logged step, last committed checkpoint, summary status and log paths; for a pending job,
why it waits and how long, or why it can never start (slurm/wait.py). Works for
launcher=local runs too (without the SLURM part).
For a sweep (a directory with sweep.json): refreshes and prints sweep_summary.md.
Exit code: 0 when the run/sweep completed, 3 while it is pending or running, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.run_state import IN_PROGRESS, derive_status, read_state
from slurm.scheduler import job_state, sacct
from slurm.wait import check, waited
from trainers.files import read_json


def run_status(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from trainers.checkpoint_files import latest_checkpoint
    from trainers.metrics.sinks import read_metrics

    state = read_state(run_dir)
    summary = read_json(run_dir / "summary.json")
    rows = read_metrics(run_dir)
    last = next((r for r in reversed(rows) if "loss" in r), None)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    out = {
        "run_dir": str(run_dir),
        "last_step": last["step"] if last else None,
        "last_loss": last["loss"] if last else None,
        "final_eval_loss": summary.get("final_eval_loss"),
        "checkpoint": str(ckpt) if ckpt else None,
    }
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        cfg = OmegaConf.load(cfg_path)
        out["max_steps"] = cfg.train.max_steps
        out["launcher"] = cfg.launcher.name
    slurm_state = None
    if state.get("job_id"):
        job_id = state["job_id"]
        slurm_state = job_state(job_id)
        out.update(
            job_id=job_id, slurm_state=slurm_state, sacct=sacct(job_id), requeues=state.get("requeues", 0),
            max_requeues=state.get("max_requeues"), attempts=state.get("attempts") or [], logs=state.get("logs"),
            submissions=len(state.get("submissions", [])),
        )
    out["status"] = derive_status(summary, state, slurm_state)
    if out["status"] == "cannot start":
        out["cannot_start"] = state["never_starts"].get("message")
    elif slurm_state == "PENDING":
        pending = check(state["job_id"])
        if pending is not None:
            out["pending"] = {"reason": pending.reason, "waited_s": pending.waited_s}
            if pending.never:  # nobody waited for it (launcher.wait=false): the same verdict
                out["status"] = "cannot start"
                out["cannot_start"] = f"{pending.never} Cancel it: scancel {state['job_id']}."
    return out


def format_run(s: dict) -> str:
    lines = [f"run dir      {s['run_dir']}"]
    if s.get("job_id"):
        acct = s.get("sacct") or {}
        extra = ", ".join(f"{k.lower()} {acct[k]}" for k in ("Elapsed", "ExitCode", "NodeList") if acct.get(k))
        lines.append(f"job          {s['job_id']}  SLURM state {s['slurm_state']}" + (f"  ({extra})" if extra else ""))
        lines.append(f"requeues     {s['requeues']} of at most {s['max_requeues']}"
                     f" ({len(s['attempts'])} attempt(s), {s['submissions']} submission(s))")
        for a in s["attempts"]:
            lines.append(f"  attempt    job {a.get('job_id')} restart {a.get('restart')}: {a.get('started')} -> {a.get('ended', '...')}"
                         f"  {a.get('status', 'running')} at step {a.get('step', '?')}"
                         + ("  requeued" if a.get("requeued") else "") + (f"  ({a['note']})" if a.get("note") else ""))
    if s.get("pending") and s["status"] != "cannot start":
        p = s["pending"]
        lines.append(f"pending      {p['reason']}, waited {waited(p['waited_s'])}")
    status = s["status"]
    if status == "cannot start":
        status += f": {s.get('cannot_start')}"
    if status.startswith("killed ("):
        status += "; resumes from the last checkpoint when requeued or relaunched"
    lines.append(f"status       {status}")
    step = s.get("last_step")
    of = f" / {s['max_steps']}" if s.get("max_steps") else ""
    loss = f" (loss {s['last_loss']:.4f})" if s.get("last_loss") is not None else ""
    lines.append(f"last step    {step if step is not None else '-'}{of}{loss}")
    if s.get("final_eval_loss") is not None:
        lines.append(f"eval loss    {s['final_eval_loss']:.4f}")
    lines.append(f"checkpoint   {s.get('checkpoint') or 'none committed yet'}")
    for rank, paths in (s.get("logs") or {}).items():
        lines.append(f"log {rank:<8} {paths['stderr']}  (stdout: {paths['stdout']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a run dir or a sweep dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    path = Path(args.path).resolve()
    if not path.is_dir():
        print(f"error: {path} is not a directory", file=sys.stderr)
        return 2
    if (path / "sweep.json").exists():
        from launch.sweep import markdown, refresh_sweep_summary

        data = refresh_sweep_summary(path)
        print(json.dumps(data, indent=1) if args.json else markdown(data))
        if data["complete"]:
            return 0 if all(r["status"] == "completed" for r in data["points"]) else 1
        return 3
    s = run_status(path)
    print(json.dumps(s, indent=1, default=str) if args.json else format_run(s))
    return 0 if s["status"] == "completed" else 3 if s["status"] in IN_PROGRESS else 1


if __name__ == "__main__":
    sys.exit(main())
