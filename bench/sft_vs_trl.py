"""Throughput and memory of our SFT loop vs TRL's SFTTrainer on the same job.

    python bench/sft_vs_trl.py [--steps 60] [--repeats 2] [--packing] [--out bench/results/sft_vs_trl.md]

Prints a markdown report: non-padding tokens/s over the steady-state steps and peak RSS
for (a) `python launch.py ...` and (b) TRL's SFTTrainer, with the ratio ours/TRL and the
final train losses (so a reader can see both actually trained comparably).

Why it is built this way
- Same job on both sides: same model files, same rows (data/reverse/train.jsonl; TRL gets
  them as conversational prompt/completion rows, prompt = all messages but the last,
  completion = [last assistant message], so its loss is on the answer only), LoRA r=16
  alpha=32 dropout 0 all-linear, same rows per optimizer step (micro batch x grad accum),
  max length 64, same steps, fp32 on CPU, same lr / AdamW / cosine-to-10% schedule with
  10 warmup steps. TRL defaults that differ from ours (gradient checkpointing and bf16
  both on by default in TRL) are turned off explicitly. Eval and mid-run checkpoints are
  off on our side (data.eval=null, save_every > steps) as they are on TRL's.
- Each run is its own subprocess, so peak RSS (ru_maxrss at exit) belongs to one system
  and neither inherits the other's imports or allocator state. Ours runs launch.py
  unchanged through bench/_ours_launch.py (runpy + RSS); TRL runs bench/_trl_sft.py.
- Tokens/s is measured the same way on both sides: wall-clock between the end of step
  `--skip` and the end of the last step (so data loading, logging and the optimizer are
  inside the window; model load, dataset preparation and export are not), divided by
  the non-padding tokens of those steps. Ours: metrics.jsonl `tokens` and `elapsed_s`;
  TRL: attention-mask sums counted by a wrapper around its own collator, and times from
  a TrainerCallback's on_step_end. The first `--skip` steps (warm-up of allocator and
  kernels) are excluded.
- The machine is shared and noisy: runs are interleaved (ours, TRL, ours, TRL, ...) so
  drift hits both, OMP/MKL thread counts are pinned to the same value for both (default
  1: extra threads on contended cores add variance, not speed), and the report gives
  medians over `--repeats` plus every run with its pair's ratio. Because wall-clock on a
  loaded machine partly measures the scheduler, it also reports tokens per CPU-second
  (process CPU time over the same steps) and the median single-step throughput.
- Inputs are frozen at start: launch.py, launch/, trainers/, parallel/, conf/ and the
  data file are copied into the temp dir and every run uses the copies, so edits made to
  the working tree while the benchmark runs (a shared, actively edited repo) cannot make
  repeats measure different code or data.
- If assets/tiny-llama is missing and no --model-path is given, a random-init Llama with
  the bundled asset's architecture and character tokenizer (scripts/build_tiny_base.py)
  is written to a temp dir; throughput does not depend on the weights, but the losses
  are then from-scratch losses.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from _quiet import describe, wait_for_quiet  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEFAULT_MODEL = REPO / "assets" / "tiny-llama"
DEFAULT_DATA = REPO / "data" / "reverse" / "train.jsonl"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", help=f"default: {DEFAULT_MODEL.relative_to(REPO)} if present, else a random-init stand-in")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5, help="leading steps excluded from tokens/s")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="default: method.lr of conf/method/lora.yaml")
    ap.add_argument("--lr-warmup", type=int, default=10, help="conf/optim/adamw.yaml warmup_steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="conf/optim/adamw.yaml min_lr_ratio")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads for both systems")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--packing", action="store_true", help="also run a packed pair (ours data.packing vs TRL packing=bfd)")
    ap.add_argument("--note", default="", help="machine note for the report, e.g. '2 shared CPU cores'")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with run dirs and logs")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--max-busy", type=float, default=0.1,
                    help="wait (up to 10 min) before each run until at most this share of the CPUs is busy")
    args = ap.parse_args()
    if args.steps <= args.skip + 1:
        ap.error("--steps must exceed --skip + 1")
    return args


# ------------------------------------------------------------------------------ model
def random_init_model(out: Path) -> Path:
    """A random-init stand-in for assets/tiny-llama: same architecture (the defaults of
    scripts/build_tiny_base.py) and the same character tokenizer, no pretraining."""
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    from build_tiny_base import build_model, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    shape = SimpleNamespace(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2)
    build_model(tok, shape).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def resolve_model(args, work: Path) -> tuple[str, str]:
    if args.model_path:
        return args.model_path, f"`{args.model_path}`"
    if (DEFAULT_MODEL / "config.json").exists():
        return str(DEFAULT_MODEL), f"`{DEFAULT_MODEL.relative_to(REPO)}` (pretrained tiny base)"
    path = random_init_model(work / "tiny-random")
    return str(path), ("random-init stand-in (assets/tiny-llama is missing): Llama 4 layers, hidden 128, "
                       "intermediate 384, 4 heads / 2 KV heads, character tokenizer of scripts/build_tiny_base.py")


# ------------------------------------------------------------------------------ inputs
SOURCES = ("launch.py", "launch", "trainers", "parallel", "conf")


def snapshot_inputs(args, work: Path) -> str:
    """Copy our code and the data into `work`; returns a description of what was copied."""
    import hashlib
    import shutil

    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    data = work / "train.jsonl"
    shutil.copy2(args.data, data)
    args.src, args.data_copy = src, str(data)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCES], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    md5 = hashlib.md5(data.read_bytes()).hexdigest()[:12]
    return (f"commit {git or '?'}" + (" + uncommitted changes" if dirty else "") +
            f" ({', '.join(SOURCES)} copied at start); data md5 {md5}")


# ------------------------------------------------------------------------------- runs
def run_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    return env


def run_logged(cmd: list[str], log: Path, args) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=log.parent, env=run_env(args.threads), stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"run failed ({proc.returncode}): {shlex.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def steady(times: list[float], tokens: list[int], skip: int) -> float:
    """Tokens/s from the end of step `skip` to the end of the last step."""
    return sum(tokens[skip:]) / (times[-1] - times[skip - 1])


def median_step(times: list[float], tokens: list[int], skip: int) -> float:
    """Median over steps skip+1.. of one step's tokens / its wall time: less sensitive than
    `steady` to a burst of load from other processes on a shared machine."""
    return statistics.median(tokens[k] / (times[k] - times[k - 1]) for k in range(skip, len(times)))


def summarize(times, cpu, tokens, losses, rss, skip) -> dict:
    return {
        "tokens_per_s": steady(times, tokens, skip),
        "tokens_per_cpu_s": steady(cpu, tokens, skip),
        "median_step_tokens_per_s": median_step(times, tokens, skip),
        "tokens_per_step": statistics.mean(tokens),
        "peak_rss_mib": rss["peak_rss_kib"] / 1024,
        "rss_start_mib": rss["rss_train_start_kib"] / 1024,
        "final_loss": losses[-1],
        "last10_loss": statistics.mean(losses[-10:]),
        "threads": rss["threads"],
    }


def ours_overrides(args, model: str, packing: bool, run_dir: Path) -> list[str]:
    return [
        f"model.path={model}", "method=lora", f"method.r={args.lora_r}", f"method.alpha={args.lora_alpha}",
        "method.dropout=0", "method.target_modules=all-linear", "parallel=none", "launcher.nproc_per_node=1",
        f"data.train={args.data_copy}", "data.eval=null", f"data.max_seq_len={args.max_len}",
        f"data.packing={str(packing).lower()}", f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={args.grad_accum}",
        "train.log_every=1", f"train.save_every={args.steps + 1000}", f"train.eval_every={args.steps + 1000}",
        "train.precision=fp32", f"optim.lr={args.lr}", "optim.schedule=cosine", "optim.weight_decay=0.0",
        f"optim.warmup_steps={args.lr_warmup}", f"optim.min_lr_ratio={args.min_lr_ratio}",
        "optim.max_grad_norm=1.0", f"seed={args.seed}", f"hydra.run.dir={run_dir}",
    ]


def run_ours(args, model: str, packing: bool, work: Path, tag: str) -> dict:
    run_dir, result = work / f"ours-{tag}", work / f"ours-{tag}.json"
    cmd = [sys.executable, str(BENCH / "_ours_launch.py"), str(args.src), str(result),
           *ours_overrides(args, model, packing, run_dir)]
    run_logged(cmd, work / f"ours-{tag}.log", args)
    rss = json.loads(result.read_text())
    rows = sorted((r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r),
                  key=lambda r: r["step"])
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), "metrics.jsonl must log every step"
    cpu = [rss["cpu_s"][str(r["step"])] for r in rows]
    return summarize([r["elapsed_s"] for r in rows], cpu, [r["tokens"] for r in rows], [r["loss"] for r in rows],
                     rss, args.skip)


def trl_command(args, model: str, packing: bool, output_dir: Path, result: Path) -> list[str]:
    cmd = [
        sys.executable, str(BENCH / "_trl_sft.py"), "--model-path", model, "--data", args.data_copy,
        "--output-dir", str(output_dir), "--result", str(result), "--steps", str(args.steps),
        "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--max-len", str(args.max_len),
        "--lr", str(args.lr), "--lr-warmup", str(args.lr_warmup), "--min-lr-ratio", str(args.min_lr_ratio),
        "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--seed", str(args.seed),
    ]
    return cmd + (["--packing"] if packing else [])


def run_trl(args, model: str, packing: bool, work: Path, tag: str) -> dict:
    result = work / f"trl-{tag}.json"
    run_logged(trl_command(args, model, packing, work / f"trl-{tag}", result), work / f"trl-{tag}.log", args)
    r = json.loads(result.read_text())
    assert len(r["step_end_s"]) == args.steps and None not in r["loss"], "TRL must log every step"
    assert not r["activation_checkpointing"] and r["mixed_precision"] == "no", "TRL must train fp32, no checkpointing"
    return summarize(r["step_end_s"], r["step_cpu_s"], r["tokens"], r["loss"], r, args.skip)


# ----------------------------------------------------------------------------- report
def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(args, results: dict, model_desc: str, inputs: str, started: str, seconds: float, load: tuple) -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "trl", "accelerate"))
    cpu = platform.processor() or platform.machine()
    note = f"; {args.note}" if args.note else ""
    lines = [
        "# SFT throughput: our loop vs TRL SFTTrainer",
        "",
        f"- date: {started} ({seconds / 60:.1f} min wall for all runs)",
        f"- machine: {cpu}, os.cpu_count()={os.cpu_count()}{note}; load average {load[0]:.2f} at start, "
        f"{load[1]:.2f} at end; OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads} for both",
        f"- versions: Python {platform.python_version()}, {versions}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- model: {model_desc}",
        f"- inputs: {inputs}",
        f"- job (both): {Path(args.data).relative_to(REPO) if Path(args.data).is_relative_to(REPO) else args.data}, "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha} dropout=0 all-linear, fp32 CPU, "
        f"{args.micro_batch} rows x {args.grad_accum} grad accum = {args.micro_batch * args.grad_accum} rows/step, "
        f"max length {args.max_len}, {args.steps} steps, AdamW lr {args.lr:g} cosine to {args.min_lr_ratio:g}x after "
        f"{args.lr_warmup} warmup steps, seed {args.seed}",
        f"- tokens/s = non-padding tokens of steps {args.skip + 1}..{args.steps} / wall time from the end of step "
        f"{args.skip} to the end of step {args.steps}; peak RSS = ru_maxrss of the training process at exit; "
        f"medians over {args.repeats} interleaved repeats (ours, TRL, ours, TRL, ...)",
        "",
        "| setup | system | tokens/s | peak RSS MiB | final loss | mean loss last 10 steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for setup, pair in results.items():
        o, t = pair["ours"], pair["trl"]
        for name, runs in (("ours (launch.py)", o), ("TRL SFTTrainer", t)):
            lines.append(
                f"| {setup} | {name} | {med(runs, 'tokens_per_s'):,.0f} | {med(runs, 'peak_rss_mib'):,.0f} | "
                f"{med(runs, 'final_loss'):.4f} | {med(runs, 'last10_loss'):.4f} |"
            )
        lines.append(
            f"| {setup} | **ratio ours/TRL** | **{med(o, 'tokens_per_s') / med(t, 'tokens_per_s'):.2f}x** | "
            f"**{med(o, 'peak_rss_mib') / med(t, 'peak_rss_mib'):.2f}x** | | |"
        )
    lines += [
        "",
        "Cross-checks (medians): tokens per CPU-second = the same tokens / process CPU time (user+sys, all "
        "threads) over the same steps, far less sensitive than wall-clock to other processes on a shared machine; "
        "median step tokens/s = median over those steps of one step's tokens / its wall time; RSS before step 1 = "
        "ru_maxrss once data, model and optimizer are built (imports + model; the rest of the peak is training "
        "and end-of-run work).",
        "",
        "| setup | system | tokens per CPU-s | median step tokens/s | RSS before step 1 MiB | non-padding tokens/step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = ("tokens_per_cpu_s", "median_step_tokens_per_s", "rss_start_mib")
    for setup, pair in results.items():
        o, t = pair["ours"], pair["trl"]
        for name, runs in (("ours (launch.py)", o), ("TRL SFTTrainer", t)):
            lines.append(f"| {setup} | {name} | " + " | ".join(f"{med(runs, k):,.0f}" for k in keys)
                         + f" | {med(runs, 'tokens_per_step'):.0f} |")
        lines.append(f"| {setup} | ratio ours/TRL | " + " | ".join(f"{med(o, k) / med(t, k):.2f}x" for k in keys) + " | |")
    lines += ["", "Every run (each pair ran back to back, ours first):", "",
              "| setup | repeat | ours tokens/s | TRL tokens/s | ratio | ours tokens/CPU-s | TRL tokens/CPU-s | ratio "
              "| ours peak RSS MiB | TRL peak RSS MiB | machine before ours / TRL |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setup, pair in results.items():
        pairs = list(zip(pair["ours"], pair["trl"]))
        for i, (o, t) in enumerate(pairs, start=1):
            lines.append(
                f"| {setup} | {i} | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x | {o['tokens_per_cpu_s']:,.0f} | "
                f"{t['tokens_per_cpu_s']:,.0f} | {o['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | "
                f"{o['peak_rss_mib']:,.0f} | {t['peak_rss_mib']:,.0f} | {describe(o['load_before'])} / {describe(t['load_before'])} |"
            )
        wall = statistics.median(o["tokens_per_s"] / t["tokens_per_s"] for o, t in pairs)
        cpu = statistics.median(o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for o, t in pairs)
        lines.append(f"| {setup} | median of pair ratios | | | {wall:.2f}x | | | {cpu:.2f}x | | | |")
    same = all(len({round(r["final_loss"], 6) for r in runs}) == 1 for pair in results.values() for runs in pair.values())
    lines += ["", "Final losses " + ("are identical across repeats of each system (seeded runs)."
                                     if same else "differ across repeats of a system (see run logs).")]
    threads = {r["threads"] for pair in results.values() for runs in pair.values() for r in runs}
    lines += ["", f"torch.get_num_threads() seen in the runs: {sorted(threads)}", "", *differences(args)]
    return "\n".join(lines) + "\n"


def differences(args) -> list[str]:
    """What still differs between the two setups (true by construction, not measured)."""
    rows = [json.loads(x)["messages"] for x in Path(args.data_copy).read_text().splitlines() if x.strip()]
    multi = sum(1 for m in rows if sum(x["role"] == "assistant" for x in m) > 1)
    out = [
        "Differences that remain between the two setups:",
        "",
        f"- Loss targets: ours trains on every assistant turn; TRL (prompt/completion rows) only on the last one. "
        f"{multi} of {len(rows)} rows have more than one assistant turn; the tokens fed to the model are the same.",
        "- Data order: each system shuffles with its own sampler (both seeded), so the batches differ; the losses "
        "are comparable, not identical.",
        f"- LR warmup: ours multiplies lr by (step+1)/({args.lr_warmup}+1), transformers by step/{args.lr_warmup} "
        "(TRL's first step runs at lr 0); the cosine decay to the floor is the same.",
        "- Loss computation: TRL's fused LM head computes log-probs in chunks without materialising the logits and "
        "also computes entropy and token accuracy on every micro-batch; ours computes full logits and a summed "
        "cross-entropy.",
        "- Per-step bookkeeping: ours appends to metrics.jsonl and TensorBoard on every step; TRL (logging_steps=1, "
        "report_to=none) logs every step to stdout.",
        "- Peak RSS covers the whole process: imports (ours: hydra, tensorboard, ...; TRL: datasets, accelerate, "
        "...), the model, training, and end-of-run work (ours exports the adapter and a merged model and plots "
        "loss.png; TRL saves nothing, save_strategy=no). With a ~1M-parameter model, imports dominate.",
    ]
    if args.packing:
        out.append(
            f"- Packing: both pack with best-fit decreasing into bins of {args.max_len} tokens. Ours pads each "
            f"micro-batch of {args.micro_batch} bins to its longest; TRL runs padding-free, flattening the "
            f"{args.micro_batch} bins into one row of up to {args.micro_batch * args.max_len} tokens (sdpa then attends over a "
            f"block-diagonal mask of that length). Tokens/step therefore differ; tokens/s normalises for it."
        )
    out.append(
        "- Noise: on a shared machine wall-clock tokens/s swings with other processes' load; compare the pair "
        "ratios and the tokens-per-CPU-second cross-check before drawing conclusions from a small difference."
    )
    return out


def main() -> None:
    args = parse_args()
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0, t0 = os.getloadavg()[0], time.time()
    work = Path(tempfile.mkdtemp(prefix="sft_vs_trl-"))
    inputs = snapshot_inputs(args, work)
    model, model_desc = resolve_model(args, work)
    setups = [("unpacked", False)] + ([("packed", True)] if args.packing else [])
    results = {name: {"ours": [], "trl": []} for name, _ in setups}
    for rep in range(args.repeats):
        for name, packing in setups:
            tag = f"{name}-{rep}"
            for system, fn in (("ours", run_ours), ("trl", run_trl)):
                print(f"[{time.strftime('%H:%M:%S')}] repeat {rep + 1}/{args.repeats} {name} {system} ...",
                      file=sys.stderr, flush=True)
                load = wait_for_quiet(args.max_busy)
                r = fn(args, model, packing, work, tag) | {"load_before": load}
                results[name][system].append(r)
                print(f"    {r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_cpu_s']:,.0f} tokens/CPU-s, peak RSS {r['peak_rss_mib']:,.0f} MiB, "
                      f"final loss {r['final_loss']:.4f}", file=sys.stderr, flush=True)
    text = report(args, results, model_desc, inputs, started, time.time() - t0, (load0, os.getloadavg()[0]))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.keep:
        print(f"run dirs and logs kept in {work}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
