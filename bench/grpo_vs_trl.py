"""Throughput and memory of our objective=grpo vs TRL's GRPOTrainer on the same job.

    python bench/grpo_vs_trl.py [--steps 20] [--repeats 2] [--model-path PATH] [--baseline-src DIR] [--out bench/results/grpo_vs_trl.md]

Each run is its own subprocess (peak RSS = the largest ru_maxrss of its processes), runs
are interleaved (ours, TRL, ours, TRL, ...) with OMP/MKL threads pinned equal. Job (both):
the bundled prompts (data/reverse_rl), the built-in partial-credit reward, LoRA r=16
alpha=32 dropout 0 all-linear, fp32 CPU, 16 completions x 2 accumulation steps per
optimizer step (4 prompts x 8 generations), at most 16 completion tokens, AdamW at a
constant lr. tokens/s = (generated completion tokens + trained prompt/completion tokens)
of steps skip+1..N / their wall time, from each side's own per-step timestamps; tokens per
CPU-second = the same tokens / the process CPU time (user + sys) over the same steps, which
other processes on a shared machine disturb much less than wall time (ours runs launch.py
unchanged through bench/_ours_launch.py, which records the CPU time at each logged step, as
for bench/sft_vs_trl.py; TRL's side records it at on_step_end).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quiet import describe, wait_for_quiet  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parent.parent
RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(code)")


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Run `cmd`; returns the peak RSS (MiB) of its largest process."""
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, "-c", RSS, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f,
                             text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{cmd[:3]} failed, see {log}")
    return float(out.stdout.strip().splitlines()[-1])


def ours(a, work: Path, tag: str, env: dict, src: Path = REPO) -> dict:
    run_dir, result = work / f"ours-{tag}", work / f"ours-{tag}.json"
    rss = run([sys.executable, str(REPO / "bench" / "_ours_launch.py"), str(src), str(result), "objective=grpo", f"data.train={a.data}", "data.eval=null",
               f"model.path={a.model_path}", "method.dropout=0", f"train.max_steps={a.steps}",
               f"train.micro_batch_size={a.micro_batch}", f"train.grad_accum={a.grad_accum}",
               f"objective.num_generations={a.generations}", f"objective.max_completion_length={a.completion_len}",
               f"optim.lr={a.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "train.precision=fp32",
               "objective.rewards=[{fn: trainers.objectives.reverse_rewards:partial_credit}]",
               f"train.save_every={a.steps}", "train.log_every=1", f"hydra.run.dir={run_dir}"],
              work / f"ours-{tag}.log", env)
    cpu_s = json.loads(result.read_text())["cpu_s"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    n = a.micro_batch * a.grad_accum
    tokens = [r["tokens"] + r["completions/mean_length"] * n for r in rows]
    ends = [r["elapsed_s"] for r in rows]
    cpu = [cpu_s[str(r["step"])] for r in rows]
    return summary(ends, cpu, tokens, rss, a.skip, [r["reward"] for r in rows])


def trl(a, work: Path, tag: str, env: dict) -> dict:
    result = work / f"trl-{tag}.json"
    rss = run([sys.executable, str(REPO / "bench" / "_trl_grpo.py"), "--model-path", a.model_path, "--data", a.data,
               "--output-dir", str(work / f"trl-{tag}"), "--result", str(result), "--steps", str(a.steps),
               "--micro-batch", str(a.micro_batch), "--grad-accum", str(a.grad_accum), "--generations",
               str(a.generations), "--completion-len", str(a.completion_len), "--lr", str(a.lr)],
              work / f"trl-{tag}.log", env)
    r = json.loads(result.read_text())
    return summary(r["step_end_s"], r["step_cpu_s"], r["tokens"], rss, a.skip, r["reward"])


def summary(ends: list[float], cpu: list[float], tokens: list[float], rss: float, skip: int, reward: list) -> dict:
    span = ends[-1] - ends[skip - 1]
    return {"tokens_per_s": sum(tokens[skip:]) / span, "s_per_step": span / (len(ends) - skip), "peak_rss_mib": rss,
            "tokens_per_cpu_s": sum(tokens[skip:]) / (cpu[-1] - cpu[skip - 1]),
            "reward_last5": statistics.mean(x for x in reward[-5:] if x is not None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=str(REPO / "assets" / "tiny-llama"))
    ap.add_argument("--data", default=str(REPO / "data" / "reverse_rl" / "train.jsonl"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--baseline-src", help="also run our launcher from this source tree (e.g. `git archive` of an "
                    "older commit), interleaved, as a before/after row")
    ap.add_argument("--max-busy", type=float, default=0.1, help="wait before each run until at most this share of the CPUs is busy")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    work = Path(tempfile.mkdtemp(prefix="grpo_vs_trl-"))
    load0, t0 = os.getloadavg()[0], time.time()
    runs: dict[str, list[dict]] = {"ours": [], "trl": [], "before": []}
    systems = [("ours", ours), ("trl", trl)]
    if a.baseline_src:
        src = Path(a.baseline_src).resolve()
        systems.insert(0, ("before", lambda a, work, tag, env: ours(a, work, "before-" + tag, env, src)))
    for rep in range(a.repeats):
        for name, fn in systems:
            load = wait_for_quiet(a.max_busy)
            r = fn(a, work, str(rep), env) | {"load_before": load}
            runs[name].append(r)
            print(f"[{time.strftime('%H:%M:%S')}] {name} {rep + 1}: {r}", file=sys.stderr, flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    lines = ["# GRPO throughput and memory: our loop vs TRL GRPOTrainer", "",
             f"- {time.strftime('%Y-%m-%d %H:%M')}, {(time.time() - t0) / 60:.1f} min, load average {load0:.1f} -> "
             f"{os.getloadavg()[0]:.1f}, {a.threads} thread(s) each, model {a.model_path}",
             f"- job: {a.micro_batch} x {a.grad_accum} completions/step ({a.generations} per prompt), <= "
             f"{a.completion_len} completion tokens, LoRA r16 fp32 CPU, {a.steps} steps (first {a.skip} not timed), "
             f"medians of {a.repeats} interleaved repeats", "",
             "| system | generated + trained tokens/s | tokens per CPU-s | s/step | peak RSS MiB | reward (last 5 steps) |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = [("ours", "ours (launch.py objective=grpo)"), ("trl", "TRL GRPOTrainer")]
    if a.baseline_src:
        labels.insert(0, ("before", f"ours from {a.baseline_src}"))
    for name, label in labels:
        lines.append(f"| {label} | {med(name, 'tokens_per_s'):,.0f} | {med(name, 'tokens_per_cpu_s'):,.0f} | "
                     f"{med(name, 's_per_step'):.2f} | "
                     f"{med(name, 'peak_rss_mib'):,.0f} | {med(name, 'reward_last5'):.3f} |")
    lines.append(f"| **ours / TRL** | **{med('ours', 'tokens_per_s') / med('trl', 'tokens_per_s'):.2f}x** | "
                 f"**{med('ours', 'tokens_per_cpu_s') / med('trl', 'tokens_per_cpu_s'):.2f}x** | | "
                 f"**{med('ours', 'peak_rss_mib') / med('trl', 'peak_rss_mib'):.2f}x** | |")
    if a.baseline_src:
        for num, den in (("before", "trl"), ("ours", "before")):
            lines.append(f"| {num} / {den} | {med(num, 'tokens_per_s') / med(den, 'tokens_per_s'):.2f}x | "
                         f"{med(num, 'tokens_per_cpu_s') / med(den, 'tokens_per_cpu_s'):.2f}x | | "
                         f"{med(num, 'peak_rss_mib') / med(den, 'peak_rss_mib'):.2f}x | |")
        lines += ["", "Baseline runs (tokens/s, tokens/CPU-s, peak RSS MiB, load): " + ", ".join(
            f"{b['tokens_per_s']:,.0f}, {b['tokens_per_cpu_s']:,.0f}, {b['peak_rss_mib']:,.0f}, {describe(b['load_before'])}"
            for b in runs["before"])]
    lines += ["", "| repeat | ours tokens/s | TRL tokens/s | ours tokens/CPU-s | TRL tokens/CPU-s | ratio (wall / CPU) |",
              "|---|---:|---:|---:|---:|---:|"]
    for i, (o, t) in enumerate(zip(runs["ours"], runs["trl"])):
        lines.append(f"| {i + 1} | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | {o['tokens_per_cpu_s']:,.0f} | "
                     f"{t['tokens_per_cpu_s']:,.0f} | {o['tokens_per_s'] / t['tokens_per_s']:.2f}x / "
                     f"{o['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x |")
    lines += ["", "Load average before each run (ours / TRL, per repeat): " + ", ".join(
        f"{describe(o['load_before'])} / {describe(t['load_before'])}" for o, t in zip(runs["ours"], runs["trl"]))]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
