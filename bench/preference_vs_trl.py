"""Throughput and memory of our dpo vs TRL's DPOTrainer on the same job.

    python bench/preference_vs_trl.py [--steps 40] [--repeats 3] [--out bench/results/preference_vs_trl.md]

Same method as bench/sft_vs_trl.py (its helpers are reused): each run is its own
subprocess (peak RSS = ru_maxrss of that process), runs are interleaved (ours, TRL, ours,
TRL, ...), OMP/MKL threads pinned equal, inputs snapshotted at start, tokens/s over the
steady-state steps from each side's own per-step timestamps and non-padding token counts
(chosen + rejected sequences; the reference pass is extra work both sides do and is not
counted as tokens). Job: the bundled preference task (data/reverse_pref/train.jsonl,
conversational), LoRA r=16 alpha=32 dropout 0 all-linear, fp32 CPU, DPO sigmoid beta 0.1,
8 pairs x 2 accumulation steps per optimizer step, max length 64, AdamW cosine schedule.
Both systems compute the reference with the adapter disabled (TRL's PEFT default).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from _quiet import describe, wait_for_quiet  # noqa: E402  (bench/ is on sys.path when run as a script)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import sft_vs_trl as S  # noqa: E402  (helpers: snapshot, runs, summaries)

REPO = S.REPO


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--data", default=str(REPO / "data" / "reverse_pref" / "train.jsonl"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-warmup", type=int, default=10)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--note", default="")
    ap.add_argument("--host-memory", default="fast", choices=("fast", "compact"),
                    help="train.host_memory of our runs (launch/worker.py set_host_allocator)")
    ap.add_argument("--padded-pairs", action="store_true",
                    help="ours with data.packing=false: each sequence its own row, padded to the longest of the "
                         "micro-batch, as TRL does (default: our default, packed micro-batches)")
    ap.add_argument("--out")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--max-busy", type=float, default=0.1, help="wait before each run until at most this share of the CPUs is busy")
    args = ap.parse_args()
    args.packing = not args.padded_pairs
    if args.steps <= args.skip + 1:
        ap.error("--steps must exceed --skip + 1")
    return args


def run_ours(args, model: str, work: Path, tag: str) -> dict:
    run_dir, result = work / f"ours-{tag}", work / f"ours-{tag}.json"
    overrides = S.ours_overrides(args, model, args.packing, run_dir) + [
        "objective=dpo", f"objective.beta={args.beta}", f"train.host_memory={args.host_memory}"]
    S.run_logged([sys.executable, str(BENCH / "_ours_launch.py"), str(args.src), str(result), *overrides],
                 work / f"ours-{tag}.log", args)
    rss = json.loads(result.read_text())
    rows = sorted((r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r),
                  key=lambda r: r["step"])
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1))
    cpu = [rss["cpu_s"][str(r["step"])] for r in rows]
    out = S.summarize([r["elapsed_s"] for r in rows], cpu, [r["tokens"] for r in rows], [r["loss"] for r in rows],
                      rss, args.skip)
    out["accuracy_last10"] = statistics.mean(r["rewards/accuracies"] for r in rows[-10:])
    return out


def run_trl(args, model: str, work: Path, tag: str) -> dict:
    result = work / f"trl-{tag}.json"
    cmd = [sys.executable, str(BENCH / "_trl_dpo.py"), "--model-path", model, "--data", args.data_copy,
           "--output-dir", str(work / f"trl-{tag}"), "--result", str(result), "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--max-len", str(args.max_len),
           "--lr", str(args.lr), "--lr-warmup", str(args.lr_warmup), "--min-lr-ratio", str(args.min_lr_ratio),
           "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--seed", str(args.seed),
           "--beta", str(args.beta)]
    S.run_logged(cmd, work / f"trl-{tag}.log", args)
    r = json.loads(result.read_text())
    assert len(r["step_end_s"]) == args.steps and None not in r["loss"], "TRL must log every step"
    assert not r["activation_checkpointing"] and r["mixed_precision"] == "no"
    out = S.summarize(r["step_end_s"], r["step_cpu_s"], r["tokens"], r["loss"], r, args.skip)
    out["accuracy_last10"] = float("nan")
    return out


def report(args, runs: dict, model_desc: str, inputs: str, started: str, seconds: float, load: tuple) -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "trl", "accelerate"))
    med = S.med
    o, t = runs["ours"], runs["trl"]
    note = f"; {args.note}" if args.note else ""
    lines = [
        "# DPO throughput and memory: our loop vs TRL DPOTrainer", "",
        f"- date: {started} ({seconds / 60:.1f} min wall for all runs)",
        f"- machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}{note}; load average {load[0]:.2f} at "
        f"start, {load[1]:.2f} at end; OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads} for both",
        f"- versions: Python {platform.python_version()}, {versions}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- model: {model_desc}", f"- inputs: {inputs}",
        f"- job (both): DPO sigmoid beta {args.beta:g}, LoRA r={args.lora_r} alpha={args.lora_alpha} dropout 0 "
        f"all-linear, reference = adapter disabled, fp32 CPU, {args.micro_batch} pairs x {args.grad_accum} accum "
        f"= {args.micro_batch * args.grad_accum} pairs/step, max length {args.max_len}, {args.steps} steps",
        f"- ours: train.host_memory={args.host_memory}, data.packing={str(args.packing).lower()} "
        f"({'each micro-batch packed into rows of the max length' if args.packing else 'one sequence per row, padded'})",
        f"- tokens/s = non-padding tokens (chosen + rejected) of steps {args.skip + 1}..{args.steps} / wall time; "
        f"peak RSS = ru_maxrss at exit; medians over {args.repeats} interleaved repeats", "",
        "| system | tokens/s | tokens per CPU-s | peak RSS MiB | RSS before step 1 MiB | tokens/step | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in (("ours (launch.py objective=dpo)", o), ("TRL DPOTrainer", t)):
        lines.append(f"| {name} | {med(rs, 'tokens_per_s'):,.0f} | {med(rs, 'tokens_per_cpu_s'):,.0f} | "
                     f"{med(rs, 'peak_rss_mib'):,.0f} | {med(rs, 'rss_start_mib'):,.0f} | {med(rs, 'tokens_per_step'):,.0f} | "
                     f"{med(rs, 'final_loss'):.4f} |")
    lines.append(f"| **ratio ours/TRL** | **{med(o, 'tokens_per_s') / med(t, 'tokens_per_s'):.2f}x** | "
                 f"{med(o, 'tokens_per_cpu_s') / med(t, 'tokens_per_cpu_s'):.2f}x | "
                 f"**{med(o, 'peak_rss_mib') / med(t, 'peak_rss_mib'):.2f}x** | "
                 f"{med(o, 'rss_start_mib') / med(t, 'rss_start_mib'):.2f}x | | |")
    lines += ["", "Goals (issue 11): tokens/s >= 1.3x TRL, peak RSS <= 0.85x TRL.", "",
              "Every run (pairs back to back, ours first):", "",
              "| repeat | ours tokens/s | TRL tokens/s | ratio | ours tokens/CPU-s | TRL tokens/CPU-s | ratio | "
              "ours peak RSS | TRL peak RSS | ratio | machine before ours / TRL |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (a, b) in enumerate(zip(o, t), start=1):
        lines.append(f"| {i} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                     f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {a['tokens_per_cpu_s']:,.0f} | "
                     f"{b['tokens_per_cpu_s']:,.0f} | {a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x | "
                     f"{a['peak_rss_mib']:,.0f} | {b['peak_rss_mib']:,.0f} | {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x | "
                     f"{describe(a['load_before'])} / {describe(b['load_before'])} |")
    lines += ["", "Differences that remain: data order (each side shuffles with its own seeded sampler); "
              "warmup (ours (step+1)/(w+1), transformers step/w); TRL's fused LM head computes log-probs "
              "without the full logits; ours exports the adapter and a merged model at the end (inside the peak RSS); "
              "imports dominate RSS at this model size."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0, t0 = os.getloadavg()[0], time.time()
    work = Path(tempfile.mkdtemp(prefix="preference_vs_trl-"))
    inputs = S.snapshot_inputs(args, work)
    model, model_desc = S.resolve_model(args, work)
    runs = {"ours": [], "trl": []}
    for rep in range(args.repeats):
        for system, fn in (("ours", run_ours), ("trl", run_trl)):
            print(f"[{time.strftime('%H:%M:%S')}] repeat {rep + 1}/{args.repeats} {system} ...", file=sys.stderr,
                  flush=True)
            load = wait_for_quiet(args.max_busy)
            r = fn(args, model, work, str(rep)) | {"load_before": load}
            runs[system].append(r)
            print(f"    {r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_cpu_s']:,.0f} tokens/CPU-s, "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB, final loss {r['final_loss']:.4f}", file=sys.stderr,
                  flush=True)
    text = report(args, runs, model_desc, inputs, started, time.time() - t0, (load0, os.getloadavg()[0]))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
