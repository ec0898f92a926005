"""Data at scale: first-run preparation, then time to the first step and per-rank memory
with the token cache in place, for chat datasets of growing size.

    python bench/data_scaling.py [--rows 10000,100000,1000000] [--work /tmp/bench_data]
                                 [--baseline-commit REV] [--out bench/results/data_scaling.md]

For each size N, rows like the bundled task's (chat `messages`, one or two reverse-a-string
turns, random strings) are generated, then:

1. preparation: `trainers.data.sources.prepare_data` in this process on an empty cache folder:
   validation, chat template, tokenization and best-fit-decreasing packing, what the
   launcher does before it spawns anything. Reported: wall time, and cores busy = CPU
   seconds of this process and its tokenizer processes / wall seconds.
2. `python launch.py parallel=ddp launcher.nproc_per_node=2 data.train=FILE ...` with the
   cache present: wall time from the command to the first logged step, and each rank's
   peak RSS (VmHWM) at that moment. The job is stopped after step 1.

With --baseline-commit, step 2 also runs on that commit (a git worktree) for sizes up to
100k rows: the code before the cache, which tokenized the file in the launcher and again
in every rank and held it as Python lists.

Goal (issue 12): from 10k to 1M rows, time to the first step and per-rank RSS grow by less
than 10 %; preparation uses every core.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from memory_estimate import peak_until_first_step  # noqa: E402

RUN = ["parallel=ddp", "launcher.nproc_per_node=2", "data.eval=null", "train.max_steps=1",
       "train.save_every=1000", "method.dropout=0"]


def generate(path: Path, n: int, seed: int = 0) -> Path:
    if path.exists():
        return path
    rnd = random.Random(seed)
    asks = ("Reverse: {}", "Reverse the string {}", "reverse {}", "What is {} backwards?")

    def turn() -> list[dict]:
        w = "".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 12)))
        return [{"role": "user", "content": rnd.choice(asks).format(w)}, {"role": "assistant", "content": w[::-1]}]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            msgs = turn() + (turn() if rnd.random() < 0.3 else [])
            f.write(json.dumps({"messages": msgs}) + "\n")
    tmp.replace(path)
    return path


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def prepare(data: Path, cache: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from trainers.data.sources import prepare_data
    from trainers.model.load import load_tokenizer

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = finalize(compose("config", overrides=[*RUN, f"data.train={data}", f"data.cache_dir={cache}"]),
                       str(cache / "unused-run"))
    tok = load_tokenizer(cfg.model)
    c0, t0 = cpu_seconds(), time.perf_counter()
    _, (report,) = prepare_data(cfg, tok)
    wall = time.perf_counter() - t0
    return {"prep_s": wall, "cores_busy": (cpu_seconds() - c0) / wall, "kept": report.kept, "tokens": report.tokens}


def first_step(data: Path, cache: Path | None, log: Path, repo: Path = REPO) -> dict:
    """cache=None: the baseline commit, which has no cache."""
    t0 = time.perf_counter()
    cached = [f"data.cache_dir={cache}"] if cache else []
    peaks = peak_until_first_step([*RUN, f"data.train={data}", *cached, f"hydra.run.dir={log.parent / log.stem}"],
                                  log, repo=repo)
    return {"first_step_s": time.perf_counter() - t0, "rank_rss_mib": sorted(peaks.values(), reverse=True)}


def baseline_repo(rev: str, work: Path) -> Path:
    tree = work / f"baseline-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--work", default="/tmp/bench_data")
    ap.add_argument("--baseline-commit", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_scaling.md"))
    args = ap.parse_args()
    work = Path(args.work)
    sizes = [int(x) for x in args.rows.split(",")]
    results = []
    for n in sizes:
        data = generate(work / f"chat-{n}.jsonl", n)
        cache = work / f"cache-{n}-{int(time.time())}"
        r = {"rows": n, "mib": data.stat().st_size / 2**20, **prepare(data, cache)}
        r.update(first_step(data, cache, work / f"run-{n}.log"))
        if args.baseline_commit and n <= 100_000:
            old = first_step(data, None, work / f"base-{n}.log", repo=baseline_repo(args.baseline_commit, work))
            r["baseline"] = old
        results.append(r)
        print(json.dumps(r), flush=True)
    lines = [
        "# Data at scale: token cache", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} shared CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        f"- command: `python bench/data_scaling.py --rows {args.rows}"
        + (f" --baseline-commit {args.baseline_commit}" if args.baseline_commit else "") + "`",
        "- job: `python launch.py parallel=ddp launcher.nproc_per_node=2 data.train=FILE data.eval=null "
        "train.max_steps=1` (bundled tiny model, LoRA, packed rows of 64 tokens), cache already built; "
        "preparation measured separately on an empty cache", "",
        "| rows | file MiB | tokens | first-run preparation s | cores busy | time to first step s (cache) | peak RSS per rank MiB |"
        + (" before: time to first step s | before: peak RSS per rank MiB |" if args.baseline_commit else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.baseline_commit else ""),
    ]
    for r in results:
        row = (f"| {r['rows']:,} | {r['mib']:.0f} | {r['tokens']:,} | {r['prep_s']:.1f} | {r['cores_busy']:.2f} | "
               f"{r['first_step_s']:.1f} | {' / '.join(f'{x:.0f}' for x in r['rank_rss_mib'])} |")
        if args.baseline_commit:
            b = r.get("baseline")
            row += (f" {b['first_step_s']:.1f} | {' / '.join(f'{x:.0f}' for x in b['rank_rss_mib'])} |" if b else " - | - |")
        lines.append(row)
    if len(results) > 1:
        a, z = results[0], results[-1]
        lines += ["", f"From {a['rows']:,} to {z['rows']:,} rows: time to first step x{z['first_step_s'] / a['first_step_s']:.2f}, "
                  f"largest rank's peak RSS x{max(z['rank_rss_mib']) / max(a['rank_rss_mib']):.3f}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
