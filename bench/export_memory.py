"""What the end-of-run export adds to each rank's peak host memory, for a full fine-tune
of a ~360M-parameter Llama (1.4 GB in fp32; bench/memory_estimate.py's shapes).

    python bench/export_memory.py [--plans none ddp fsdp2 zero3 pipeline] [--baseline REPO]
                                  [--shard-mib 200] [--work /tmp/bench_export]

Each run is `python launch.py method=full train.max_steps=2 ...` to completion. Every rank's
VmHWM is polled: `training` is the peak when step 2 is logged, `+ final checkpoint` when the
end-of-run checkpoint is committed (the export starts right after), `whole run` the last
reading before the process exits; `export adds` is whole run minus the second. With
--baseline, the same runs from another checkout (e.g. a worktree of the commit before the
streamed export) are printed side by side. Before: the trained model was gathered whole
on rank 0 (fp32) and handed to save_pretrained. After: rank 0 receives one tensor at a
time and writes files of at most train.export_shard_mib.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from memory_estimate import COMMON, PLANS, SHAPE, full_length_rows, read_peaks, start, stop  # noqa: E402


def run_peaks(args: list[str], log: Path, repo: Path, timeout: float = 1800) -> dict[int, tuple[float, float, float]]:
    """{pid: (peak MiB when step 2 is logged, when the final checkpoint is committed (the
    export starts next), over the whole run)} of the training processes (workers; or the
    launcher when it trains in-process)."""
    proc = start(args, log, repo)
    peaks: dict[int, float] = {}
    at_step2: dict[int, float] = {}
    at_commit: dict[int, float] = {}
    t0 = time.time()
    try:
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"timed out: see {log}")
            read_peaks(proc, peaks)
            text = log.read_text(errors="replace")
            if not at_step2 and "step=2 " in text:
                at_step2 = dict(peaks)
            if not at_commit and "checkpoint committed" in text:
                at_commit = dict(peaks)
            time.sleep(0.05)
    finally:
        code = proc.poll()
        stop(proc)
    if code != 0 or not at_step2 or not at_commit:
        raise RuntimeError(f"run failed (exit {code}): see {log}")
    workers = [p for p in peaks if p != proc.pid] or list(peaks)
    return {p: (at_step2.get(p, 0.0), at_commit.get(p, 0.0), peaks[p]) for p in sorted(workers)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", nargs="+", default=["fsdp2", "zero3", "ddp", "pipeline"])
    ap.add_argument("--baseline", help="another checkout to run the same jobs from (before/after)")
    ap.add_argument("--shard-mib", type=float, default=200)
    ap.add_argument("--work", default="/tmp/bench_export")
    args = ap.parse_args()
    from _model100m import build

    work = Path(args.work)
    model = build(work / "model", max_shard_size="200MB", **SHAPE)
    data = full_length_rows(work / "train.jsonl")
    repos = {"after": (REPO, [f"train.export_shard_mib={args.shard_mib}"])}
    if args.baseline:
        repos = {"before": (Path(args.baseline), []), **repos}
    print("| plan | N | code | rank | training MiB | + final checkpoint MiB | whole run MiB | export adds MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for plan in args.plans:
        plan_args, world = PLANS[plan]
        for label, (repo, extra) in repos.items():
            run = work / "runs" / f"{plan}-{label}"
            subprocess.run(["rm", "-rf", str(run)])
            cfg = [*(c for c in COMMON if not c.startswith("train.max_steps")), "train.max_steps=2", "method=full", "train.host_memory=compact", f"data.train={data}",
                   f"model.path={model}", *plan_args, *extra, f"hydra.run.dir={run}"]
            peaks = run_peaks(cfg, work / f"{run.name}.log", repo)
            for rank, (train, committed, whole) in enumerate(peaks.values()):
                print(f"| {plan} | {world} | {label} | {rank} | {train:.0f} | {committed:.0f} | {whole:.0f} "
                      f"| {whole - committed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
