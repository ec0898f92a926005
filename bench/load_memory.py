"""Peak host memory per rank while the model is built, for a 4-bit (QLoRA) base of the
~360M-parameter Llama (bench/memory_estimate.py's shapes), before and after a change.

    python bench/load_memory.py --baseline REPO [--plans fsdp2 pipeline] [--work /tmp/bench_load]

Each run is `python launch.py method=qlora ...` on 2 ranks, stopped when the run logs its
`plan:` line (the model is built, sharded or pruned; no step has run). `load` is each
rank's peak RSS (VmHWM) then, minus the same command's peak on the bundled 0.8M-parameter
model (the fixed overhead, as in bench/memory_estimate.py). With --baseline the same runs
from another checkout are printed beside. Before: every rank loaded the whole 4-bit model
through transformers' from_pretrained, then sharded (fsdp2) or pruned (pipeline) it. After:
a rank quantizes one weight at a time from the checkpoint, only what it keeps (fsdp2: each
unit sharded as soon as it is filled; pipeline: its own layers).
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

MARK = "plan: world_size="


def load_peaks(args: list[str], log: Path, repo: Path, timeout: float = 900) -> list[float]:
    """Each training process's peak MiB when the model is built (the `plan:` line)."""
    proc = start(args, log, repo)
    peaks: dict[int, float] = {}
    t0 = time.time()
    try:
        while MARK not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.time() - t0 > timeout:
                raise RuntimeError(f"no {MARK!r} line: see {log}")
            read_peaks(proc, peaks)
            time.sleep(0.05)
        read_peaks(proc, peaks)
    finally:
        stop(proc)
    workers = [p for p in peaks if p != proc.pid] or list(peaks)
    return [peaks[p] for p in sorted(workers)]


def measure(repo: Path, plan: str, big: Path, tiny: Path, data: Path, work: Path) -> list[float]:
    args = [*COMMON, "train.host_memory=compact", f"data.train={data}", *PLANS[plan][0], "method=qlora",
            "method.dropout=0"]
    out = {}
    for label, path in (("model", big), ("base", tiny)):
        run = work / "runs" / f"{repo.name}-{plan}-{label}"
        subprocess.run(["rm", "-rf", str(run)])
        out[label] = load_peaks([*args, f"model.path={path}", f"hydra.run.dir={run}"], work / f"{run.name}.log", repo)
    return [m - b for m, b in zip(out["model"], out["base"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_load")
    ap.add_argument("--plans", nargs="+", default=["fsdp2", "pipeline"])
    ap.add_argument("--baseline", help="another checkout to measure beside this one")
    args = ap.parse_args()
    from _model100m import build

    work = Path(args.work)
    big = build(work / "model", max_shard_size="200MB", **SHAPE)
    data = full_length_rows(work / "train.jsonl")
    tiny = REPO / "assets" / "tiny-llama"
    repos = ([Path(args.baseline).resolve()] if args.baseline else []) + [REPO]
    rows = []
    for plan in args.plans:
        got = [measure(repo, plan, big, tiny, data, work) for repo in repos]
        rows.append((plan, got))
        print(plan, [[round(x) for x in g] for g in got], flush=True)
    print()
    head = " | ".join(f"{'baseline' if i == 0 and args.baseline else 'now'} rank {r}"
                      for i in range(len(repos)) for r in (0, 1))
    print(f"| plan (qlora, N=2) | {head} |")
    print("|---|" + "---:|" * 2 * len(repos))
    for plan, got in rows:
        print(f"| {plan} | " + " | ".join(f"{x:.0f}" for g in got for x in g) + " |")


if __name__ == "__main__":
    main()
