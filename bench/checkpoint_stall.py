"""How long checkpointing blocks training: async vs sync vs no checkpoints, real launcher.

    python bench/checkpoint_stall.py [--plans fsdp2 ddp] [--reps 1] [--steps 9] [--every 2]
                                     [--micro 1] [--work /tmp/bench100m]
                                     [--out bench/results/checkpoint_stall.md]

Each run is `python launch.py parallel=PLAN method=full launcher.nproc_per_node=2
model.path=<~99M random Llama> data.eval=null train.precision=fp32 train.max_steps=STEPS
train.save_every=EVERY|1000 train.checkpoint.mode=async|sync ...`; the three modes run
interleaved (none, async, sync per repetition) so machine load hits them alike.

From rank 0's metrics.jsonl (one record per step, logged before that step's checkpoint):
  dt[k]    = tokens / tokens_per_s: step k's own time (batch -> optimizer step)
  gap[k]   = elapsed_s[k] - elapsed_s[k-1] = dt[k] + whatever ran between the two steps
  blocking at checkpoint step k = (gap[k+1] - dt[k+1]) - median over non-checkpoint steps
           of (gap - dt): the time the training thread spent in Checkpointer.save (for async
           it includes waiting for the previous in-flight save, and the staging copy).
  overlap penalty = dt[k+1] - median dt of steps that do not follow a checkpoint (a
           background write competes for the 2 cores).
The final step's checkpoint (step == max_steps) has no next step and is left out of the
per-checkpoint numbers; it is part of the wall time.
Slowdown: loop time (elapsed_s of the last step) and summary.json wall_time_s (incl.
startup, final save, export) relative to the run without checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def snapshot_data(work: Path) -> Path:
    """Copy data/reverse/train.jsonl once it parses (other jobs may be rewriting it)."""
    src, dst = REPO / "data" / "reverse" / "train.jsonl", work / "train.jsonl"
    for _ in range(30):
        text = src.read_text()
        try:
            [json.loads(l) for l in text.splitlines() if l.strip()]
        except ValueError:
            time.sleep(1)
            continue
        dst.write_text(text)
        return dst
    raise SystemExit(f"{src} did not parse for 30 s")


def run(plan: str, mode: str, model: Path, run_dir: Path, a) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    every = a.every if mode != "none" else 1000
    ckmode = mode if mode != "none" else "async"
    cmd = [
        sys.executable, "launch.py", f"parallel={plan}", "method=full", "launcher.nproc_per_node=2",
        f"model.path={model}", f"data.train={a.data}", "data.eval=null", "train.precision=fp32", f"train.max_steps={a.steps}",
        f"train.save_every={every}", f"train.checkpoint.mode={ckmode}", f"train.micro_batch_size={a.micro}",
        "train.grad_accum=1", "train.keep_last=2", "optim.warmup_steps=0", "optim.schedule=constant",
        f"hydra.run.dir={run_dir}",
    ]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall_outer = time.time() - t0
    recs = []
    mf = run_dir / "metrics.jsonl"
    if mf.exists():
        recs = [json.loads(l) for l in mf.read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r]
    summ = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    if p.returncode != 0 or len(recs) < a.steps:
        print(f"  FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
    return {"plan": plan, "mode": mode, "recs": recs, "summary": summ, "wall_outer": wall_outer,
            "ckpt_steps": [k for k in range(1, a.steps + 1) if k % every == 0 or k == a.steps] if mode != "none" else []}


def analyse(r: dict, every_steps: int) -> dict:
    recs = {x["step"]: x for x in r["recs"]}
    steps = sorted(recs)
    dt = {k: recs[k]["tokens"] / recs[k]["tokens_per_s"] for k in steps}
    gap = {k: recs[k]["elapsed_s"] - recs[k - 1]["elapsed_s"] for k in steps if k - 1 in recs}
    ck = set(r["ckpt_steps"])
    interior = [k for k in sorted(ck) if k + 1 in gap]
    # baseline between-step overhead and step time, from steps not touched by a checkpoint;
    # the first step is left out (warm-up)
    plain = [k for k in gap if (k - 1) not in ck and k > 2]
    base_over = statistics.median(gap[k] - dt[k] for k in plain) if plain else 0.0
    base_dt = statistics.median(dt[k] for k in plain) if plain else statistics.median(dt.values())
    block = [gap[k + 1] - dt[k + 1] - base_over for k in interior]
    penalty = [dt[k + 1] - base_dt for k in interior]
    return {
        "blocking": block, "penalty": penalty, "base_dt": base_dt,
        "loop_s": recs[steps[-1]]["elapsed_s"] if steps else float("nan"),
        "wall_s": r["summary"].get("wall_time_s", float("nan")), "final_loss": r["summary"].get("final_loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", nargs="+", default=["fsdp2", "ddp"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--work", default="/tmp/bench100m")
    ap.add_argument("--data", default=None,
                    help="train jsonl (default: a snapshot of data/reverse/train.jsonl copied into --work, "
                         "so a concurrent rewrite of the repo's file cannot break a run)")
    ap.add_argument("--out", default=str(HERE / "results" / "checkpoint_stall.md"))
    a = ap.parse_args()
    from _model100m import build

    model = build(Path(a.work) / "model")
    if a.data is None:
        a.data = str(snapshot_data(Path(a.work)))
    results: dict[tuple, list] = {}
    for plan in a.plans:
        for rep in range(a.reps):
            for mode in ("none", "async", "sync"):
                rd = Path(a.work) / "ckpt" / f"{plan}-{mode}-{rep}"
                r = run(plan, mode, model, rd, a)
                an = analyse(r, a.every) if r["recs"] else None
                print(f"{plan} {mode} rep{rep}: {an}", flush=True)
                if an:
                    results.setdefault((plan, mode), []).append(an)
    med = statistics.median
    lines = [
        "# Checkpoint stall: async vs sync (N=2, CPU, gloo, fp32, method=full)",
        "",
        f"Command: `python bench/checkpoint_stall.py --plans {' '.join(a.plans)} --reps {a.reps} "
        f"--steps {a.steps} --every {a.every} --micro {a.micro}`",
        f"Each run: `python launch.py parallel=PLAN method=full launcher.nproc_per_node=2 model.path=<99.3M random Llama> "
        f"data.eval=null train.precision=fp32 train.max_steps={a.steps} train.save_every={a.every} (1000 for 'none') "
        f"train.checkpoint.mode=async|sync train.micro_batch_size={a.micro} train.grad_accum=1 ...`; "
        "modes interleaved per repetition. Per-checkpoint numbers exclude the final (step == max_steps) save.",
        "Model+AdamW state is ~1.1 GiB (ddp: per rank) / ~0.57 GiB per rank (fsdp2).",
        "",
        "| plan | mode | runs | ckpts measured | blocking per ckpt s (median, min-max) | next-step penalty s (median) | median step s | loop time s | loop vs none | wall s | wall vs none |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (plan, mode), ans in results.items():
        blocks = [b for x in ans for b in x["blocking"]]
        pens = [b for x in ans for b in x["penalty"]]
        loop = med([x["loop_s"] for x in ans])
        wall = med([x["wall_s"] for x in ans])
        none = results.get((plan, "none"))
        rl = f"{loop / med([x['loop_s'] for x in none]):.2f}" if none else "-"
        rw = f"{wall / med([x['wall_s'] for x in none]):.2f}" if none else "-"
        bs = f"{med(blocks):.2f} ({min(blocks):.2f}-{max(blocks):.2f})" if blocks else "-"
        ps = f"{med(pens):+.2f}" if pens else "-"
        lines.append(f"| {plan} | {mode} | {len(ans)} | {len(blocks)} | {bs} | {ps} | "
                     f"{med([x['base_dt'] for x in ans]):.2f} | {loop:.1f} | {rl} | {wall:.1f} | {rw} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
