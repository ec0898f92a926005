"""Hold launch/estimate.py's GRPO terms to measurement: peak host memory per rank of a GRPO
step (rollout + training forward/backward) on CPU against the estimator's CPU prediction.

    python bench/grpo_memory.py [--plans none ddp zero3] [--work /tmp/bench_grpo_mem]
                                [--out bench/results/grpo_memory.json]

Each row is one `python launch.py objective=grpo ...` on a randomly initialised ~99M-parameter
Llama (bench/_model100m.py: hidden 768, 14 layers, intermediate 2048; the bundled character
tokenizer, vocabulary 102), LoRA, fp32, measured until the second step is logged, as
bench/memory_estimate.py measures SFT (its helpers are reused): measured_mib is the peak RSS
(VmHWM) of the largest rank minus the same command's on the bundled tiny model, estimate_mib
the estimator's CPU prediction for the big model minus the tiny one's.

The job is the estimate's worst case, so the two count the same tokens: every prompt is
exactly data.max_seq_len (64) tokens (plain-text prompts, one token per character), and the
random-init model never writes EOS, so every completion is max_completion_length (32)
tokens; 8 completions of one prompt per micro-batch and per generate call
(train.micro_batch_size=8, grad_accum=1, per rank), beta=0, num_iterations=1.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
MiB = 2**20

from memory_estimate import cpu_estimate_mib, peak_through_step_two  # noqa: E402

PROMPT_TOKENS, COMPLETION_TOKENS = 64, 32
PLANS = {
    "none": ([], 1),
    "ddp": (["parallel=ddp", "launcher.nproc_per_node=2"], 2),
    "zero3": (["parallel=zero3", "launcher.nproc_per_node=2"], 2),
    "fsdp2": (["parallel=fsdp2", "launcher.nproc_per_node=2"], 2),
}


def prompt_rows(path: Path, n: int = 32) -> Path:
    """Plain-text prompts of exactly PROMPT_TOKENS characters (= tokens) with an answer."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(8))
        text = (f"Reverse: {word} " + "x" * PROMPT_TOKENS)[:PROMPT_TOKENS]
        rows.append({"prompt": text, "answer": word[::-1]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(plan: str, data: Path, micro: int = 8) -> list[str]:
    return ["objective=grpo", f"data.train={data}", "data.eval=null", f"data.max_seq_len={PROMPT_TOKENS}",
            f"objective.max_completion_length={COMPLETION_TOKENS}", "objective.num_generations=8",
            f"train.micro_batch_size={micro}", f"train.grad_accum={8 // micro}", "train.max_steps=3",
            "train.save_every=1000",
            "train.host_memory=compact", "method=lora", "method.dropout=0", "train.precision=fp32",
            "optim.lr=1e-5", *PLANS[plan][0]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_grpo_mem")
    ap.add_argument("--out", default=str(HERE / "results" / "grpo_memory.json"))
    ap.add_argument("--plans", nargs="+", default=["none", "ddp", "zero3"], choices=list(PLANS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--micro-batch", type=int, default=8, choices=[1, 2, 4, 8],
                    help="completions per micro-batch (grad_accum = 8 / this: the generate call stays 8 rows); "
                         "2 makes the rollout (KV cache + merged LoRA copy) the step's peak instead of training")
    ap.add_argument("--set", nargs="*", default=[], help="extra launch overrides, e.g. objective.merged_generation=false")
    args = ap.parse_args()
    from _model100m import build

    work = Path(args.work)
    big = build(work / "model", max_shard_size="100MB")
    tiny = REPO / "assets" / "tiny-llama"
    data = prompt_rows(work / "prompts.jsonl")
    rows = []
    for plan in args.plans:
        result = {}
        for label, path in (("model", big), ("base", tiny)):
            run = work / "runs" / f"grpo-{plan}-{label}"
            subprocess.run(["rm", "-rf", str(run)])
            peaks = peak_through_step_two([*overrides(plan, data, args.micro_batch), *args.set, f"model.path={path}",
                                           f"hydra.run.dir={run}"],
                                          work / f"{run.name}.log", REPO, args.timeout)
            result[label] = (max(peaks.values()), cpu_estimate_mib(run))
        measured = result["model"][0] - result["base"][0]
        estimate = result["model"][1] - result["base"][1]
        row = {"plan": plan, "world_size": PLANS[plan][1], "method": "lora", "precision": "fp32",
               "prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "completions_per_rank": 8,
               "micro_batch": args.micro_batch, "overrides": args.set,
               "estimate_mib": round(estimate), "measured_mib": round(measured),
               "ratio": round(estimate / measured, 3) if measured else None,
               "peak_rss_mib": round(result["model"][0]), "fixed_overhead_mib": round(result["base"][0])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| plan | N | micro-batch | overrides | estimate MiB | measured MiB | est/meas | peak RSS | fixed overhead |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['plan']} | {r['world_size']} | {r['micro_batch']} | {' '.join(r['overrides'])} "
              f"| {r['estimate_mib']} | {r['measured_mib']} | {r['ratio']:.2f} "
              f"| {r['peak_rss_mib']} | {r['fixed_overhead_mib']} |")


if __name__ == "__main__":
    main()
