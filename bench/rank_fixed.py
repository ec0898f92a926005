"""The fixed part of a rank: what every training process holds whatever the model size and
the world size, and where it comes from.

    python bench/rank_fixed.py [--baseline REPO] [--work /tmp/bench_rank_fixed] [--plans none fsdp2]

Each run is `python launch.py` (LoRA, fp32, train.host_memory=compact, 2 steps, no eval, the
single process's 4 rows per step split over the ranks) with bench/_rss_site on PYTHONPATH:
every process writes, at exit, the RSS each top-level import added and its VmRSS / VmHWM
after each named point of the loop (process group, tokenizer, data, model built, each step).
Runs: the ~360M Llama of bench/memory_estimate.py at N=1 (parallel=none) and N=2 (fsdp2),
the bundled tiny model likewise, and `python -c "import torch"` (the floor). With
--baseline the same runs from another checkout are made first, in the same invocation. Results: --out (bench/results/rank_fixed.json);
docs/plans-and-memory.md, "The fixed part of a rank".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from memory_estimate import COMMON, SHAPE, full_length_rows  # noqa: E402

RUNS = {"none": (["parallel=none"], 1), "fsdp2": (["parallel=fsdp2", "launcher.nproc_per_node=2"], 2)}


def probe(repo: Path, args: list[str], out: Path, log: Path) -> list[dict]:
    """Run `python launch.py ARGS` in `repo` with the probe; each training process's record."""
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.json"):
        f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RSS_PROBE_DIR=str(out),
               PYTHONPATH=str(HERE / "_rss_site"))
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "launch.py", *args], cwd=repo, env=env, stdout=f,
                            stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc:
        raise RuntimeError(f"rc={rc}: see {log}")
    recs = [json.loads(f.read_text()) for f in out.glob("*.json")]
    trained = [r for r in recs if any(p[0].startswith("step") for p in r["phases"])]
    return sorted(trained, key=lambda r: int(r["rank"] or 0))


def floor() -> float:
    code = "import torch\nprint(open('/proc/self/status').read())"
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    return next(int(l.split()[1]) / 1024 for l in text.splitlines() if l.startswith("VmHWM"))


def at(rec: dict, name: str) -> tuple[int, int]:
    """(VmRSS, VmHWM) at the first phase whose name starts with `name`."""
    return next((p[1], p[2]) for p in rec["phases"] if p[0].startswith(name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_rank_fixed")
    ap.add_argument("--baseline", help="another checkout measured first, same runs")
    ap.add_argument("--plans", nargs="+", default=list(RUNS))
    ap.add_argument("--models", nargs="+", default=["big", "tiny"])
    ap.add_argument("--out", default=str(HERE / "results" / "rank_fixed.json"))
    args = ap.parse_args()
    from _model100m import build

    work = Path(args.work)
    models = {"big": build(work / "model", max_shard_size="200MB", **SHAPE), "tiny": REPO / "assets" / "tiny-llama"}
    data = full_length_rows(work / "train.jsonl")
    result = {"import_torch_floor_mib": round(floor())}
    print("python -c 'import torch': VmHWM", result["import_torch_floor_mib"], "MiB", flush=True)
    repos = ([("baseline", Path(args.baseline).resolve())] if args.baseline else []) + [("now", REPO)]
    for label, repo in repos:
        for plan in args.plans:
            over, world = RUNS[plan]
            for m in args.models:
                name = f"{label}-{plan}-{m}"
                cfg = [*COMMON, "train.max_steps=2", "train.host_memory=compact", f"data.train={data}", *over,
                       "method=lora", "method.dropout=0", f"train.micro_batch_size={4 // world}",
                       f"model.path={models[m]}", f"hydra.run.dir={work / 'runs' / name}"]
                subprocess.run(["rm", "-rf", str(work / "runs" / name)])
                recs = probe(repo, cfg, work / "probe" / name, work / f"{name}.log")
                result[name] = recs
                for r in recs:
                    print(f"{name} rank {r['rank']}: peak through step 2 {at(r, 'step 2 optimizer')[1]} MiB; "
                          + ", ".join(f"{p[0]} {p[1]}/{p[2]}" for p in r["phases"]), flush=True)
                    top = sorted(r["imports"].items(), key=lambda kv: -kv[1])[:8]
                    print("   imports:", ", ".join(f"{k} {v:.0f}" for k, v in top), flush=True)
    for name, recs in result.items():  # what the docs' table reads: phases and imports of 1 MiB or more
        if isinstance(recs, list):
            result[name] = [{"rank": r["rank"], "phases": r["phases"],
                             "imports_mib": {k: v for k, v in r["imports"].items() if v >= 1}} for r in recs]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
