"""TRL side of bench/grpo_vs_trl.py: one GRPOTrainer run in its own process (never
imported), so its peak RSS is TRL's alone. Writes JSON: per optimizer step the wall-clock
time and the process CPU time at `on_step_end`, the tokens generated (completion lengths) and trained (prompt +
completion, TRL's num_tokens), the logged loss and reward; ru_maxrss at exit."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    for k in ("model-path", "data", "output-dir", "result"):
        ap.add_argument(f"--{k}", required=True)
    for k, d in (("steps", 20), ("micro-batch", 16), ("grad-accum", 2), ("generations", 8), ("completion-len", 16),
                 ("lora-r", 16), ("lora-alpha", 32), ("seed", 1234)):
        ap.add_argument(f"--{k}", type=int, default=d)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainers.objectives.reverse_rewards import partial_credit

    torch.manual_seed(a.seed)
    rows = [json.loads(line) for line in open(a.data) if line.strip()]
    tok = AutoTokenizer.from_pretrained(a.model_path)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    ends: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    args = GRPOConfig(
        output_dir=a.output_dir, per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=a.grad_accum,
        num_generations=a.generations, max_completion_length=a.completion_len, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=a.steps, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, save_strategy="no", seed=a.seed, optim="adamw_torch", log_completions=False)
    peft = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[partial_credit], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=peft, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    n = a.micro_batch * a.grad_accum
    tokens, before = [], 0.0
    for h in logs:
        trained = h["num_tokens"] - before
        before = h["num_tokens"]
        tokens.append(trained + h["completions/mean_length"] * n)
    Path(a.result).write_text(json.dumps({
        "start_s": start, "step_end_s": ends, "step_cpu_s": cpu, "tokens": tokens, "loss": [h["loss"] for h in logs],
        "reward": [h.get("reward") for h in logs], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
