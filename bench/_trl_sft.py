"""TRL side of bench/sft_vs_trl.py: one SFTTrainer run, measured from the inside.

Run by the driver in its own process (never imported), so its peak RSS is TRL's alone.
Writes a JSON file with, per optimizer step: wall-clock time at `on_step_end`, the
non-padding tokens the step consumed, the process CPU time and the logged train loss; plus ru_maxrss at train
start and at exit.

Token counting: the trainer's own collator (TRL's default, unchanged) is wrapped after
construction (TRL refuses a custom collator with padding-free/packing, and wrapping keeps
its behaviour identical). Every call is recorded in order; optimizer step k consumed calls
[(k-1)*grad_accum, k*grad_accum). Counting by index rather than "between two callbacks"
keeps the attribution right although the dataloader prefetches one batch ahead.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def to_prompt_completion(path: str) -> list[dict]:
    """Chat rows -> conversational prompt/completion: loss on the last assistant answer only."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                msgs = json.loads(line)["messages"]
                assert msgs[-1]["role"] == "assistant"
                rows.append({"prompt": msgs[:-1], "completion": [msgs[-1]]})
    return rows


class CountingCollator:
    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        if "attention_mask" in batch:
            n = int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None)
            n = int(batch["input_ids"].numel())
        self.tokens.append(n)
        return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--result", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--grad-accum", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--lr-warmup", type=int, required=True)
    ap.add_argument("--min-lr-ratio", type=float, required=True)
    ap.add_argument("--lora-r", type=int, required=True)
    ap.add_argument("--lora-alpha", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_list(to_prompt_completion(args.data))

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        # Same optimizer and schedule as conf/optim/adamw.yaml (cosine to min_lr_ratio after warmup).
        optim="adamw_torch",
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.lr_warmup,
        max_length=args.max_len,
        packing=args.packing,  # packing_strategy "bfd" (TRL default) -> padding-free batches
        # TRL defaults that would make the comparison unequal: gradient (= activation)
        # checkpointing on, bf16 on. activation_checkpointing is the transformers 5 name.
        activation_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
        target_modules="all-linear", bias="none",
    )

    step_end: list[float] = []
    step_cpu: list[float] = []
    rss_at_start = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            rss_at_start["kib"] = maxrss_kib()

        def on_step_end(self, *a, **k):
            step_end.append(time.perf_counter())
            step_cpu.append(time.process_time())

    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[Timer()],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # read when train() builds the dataloader

    trainer.train()

    ga = args.grad_accum
    tokens = [sum(counter.tokens[k * ga:(k + 1) * ga]) for k in range(len(step_end))]
    losses = {int(r["step"]): float(r["loss"]) for r in trainer.state.log_history if "loss" in r and "step" in r}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "step_end_s": step_end,
        "step_cpu_s": step_cpu,
        "tokens": tokens,
        "loss": [losses.get(k + 1) for k in range(len(step_end))],
        "rows": len(dataset),
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
        "activation_checkpointing": bool(config.activation_checkpointing),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "rss_train_start_kib": rss_at_start.get("kib"),
        "peak_rss_kib": maxrss_kib(),
    }
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
