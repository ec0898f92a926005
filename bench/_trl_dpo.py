"""TRL side of bench/preference_vs_trl.py: one DPOTrainer run, measured from the inside.

Run by the driver in its own process (never imported), so its peak RSS is TRL's alone.
Writes a JSON file with, per optimizer step: wall-clock time at `on_step_end`, the
non-padding tokens the step consumed (chosen + rejected sequences, counted by a wrapper
around TRL's own collator, by call index as in bench/_trl_sft.py), the process CPU time and
the logged train loss; plus ru_maxrss at train start and at exit.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class CountingCollator:
    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--model-path", "--data", "--output-dir", "--result"):
        ap.add_argument(name, required=True)
    for name in ("--steps", "--micro-batch", "--grad-accum", "--max-len", "--lr-warmup", "--lora-r", "--lora-alpha",
                 "--seed"):
        ap.add_argument(name, type=int, required=True)
    for name in ("--lr", "--min-lr-ratio", "--beta"):
        ap.add_argument(name, type=float, required=True)
    args = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(x) for x in open(args.data) if x.strip()]
    dataset = Dataset.from_list(rows)
    config = DPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, optim="adamw_torch", learning_rate=args.lr, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.lr_warmup, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_len,
        # TRL defaults that would make the comparison unequal: activation checkpointing, bf16
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=args.seed, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", bias="none")
    step_end: list[float] = []
    step_cpu: list[float] = []
    rss_at_start = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            rss_at_start["kib"] = maxrss_kib()

        def on_step_end(self, *a, **k):
            step_end.append(time.perf_counter())
            step_cpu.append(time.process_time())

    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()

    ga = args.grad_accum
    tokens = [sum(counter.tokens[k * ga:(k + 1) * ga]) for k in range(len(step_end))]
    losses = {int(r["step"]): float(r["loss"]) for r in trainer.state.log_history if "loss" in r and "step" in r}
    result = {
        "step_end_s": step_end, "step_cpu_s": step_cpu, "tokens": tokens,
        "loss": [losses.get(k + 1) for k in range(len(step_end))], "rows": len(dataset),
        "threads": torch.get_num_threads(), "activation_checkpointing": bool(config.activation_checkpointing),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "rss_train_start_kib": rss_at_start.get("kib"), "peak_rss_kib": maxrss_kib(),
    }
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
