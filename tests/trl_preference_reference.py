"""TRL 1.16.0's own trainers on a preference job, as the reference for the parity test of
issue 11: per-step loss and rewards/margins of DPOTrainer (dpo, ipo), CPOTrainer
(loss_type="simpo", cpo_alpha=0), ORPOTrainer and KTOTrainer, on CPU in fp32, rows in
file order, no dropout, with our LR schedule (trainers.optim.lr_factor) and optimizer
settings, so that our loop can be run on the same job and compared step by step.

    python tests/trl_preference_reference.py --model assets/tiny-llama \
        --data data/reverse_pref/train.jsonl --objective dpo --method lora --steps 10 \
        --batch-size 4 --out /tmp/trl_dpo.json

What is held fixed, and why:
- Order: `train_sampling_strategy="sequential"` (a TrainingArguments option in
  transformers 5.23; TRL's KTO requires it anyway), so step k sees rows
  [k*B, (k+1)*B) of the file. One process, `gradient_accumulation_steps` default 1:
  TRL's metrics and its ORPO NLL / KTO KL are per micro-batch, so only with the whole
  global batch in one micro-batch are they the split-invariant values our loop logs.
- Dropout: TRL's `disable_dropout=True` (its default) plus `lora_dropout=0`.
- Schedule: the scheduler is a LambdaLR over `trainers.optim.lr_factor` (our warmup is
  (step+1)/(warmup+1), not transformers' step/warmup). Optimizer `adamw_torch`
  (weight_decay, betas, eps as given), `max_grad_norm` as given (TRL default 1.0).
- LoRA init: the adapter is created by peft under TRL's `set_seed(args.seed)`. For an
  exact comparison one side must start from the other's adapter: `init_out` saves the
  adapter TRL starts from (safetensors, peft's parameter names), `init_from` loads one.
- Reference model: with LoRA, TRL's reference is the base with the adapter disabled
  (`use_adapter(model, None)`, DPOTrainer/KTOTrainer); with full fine-tuning, a second
  copy loaded from the same directory (or precomputed log-probs with
  `precompute_ref=True`), i.e. the initial policy in both cases.

TRL's tokenization (what our data layer must reproduce for parity; `tokenized_rows`
returns TRL's ids per row so a test can compare them with ours):
- DPOTrainer / KTOTrainer (`_prepare_dataset`), conversational rows:
    prompt_ids = apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    full_ids   = apply_chat_template(prompt + chosen, tokenize=True)  (no generation prompt)
    p = common_prefix_length(prompt_ids, full_ids)  (DPO: min over chosen and rejected)
    prompt = full_ids[:p], completion = full_ids[p:]
  No BOS/EOS is added besides what the template renders (apply_chat_template tokenizes
  without add_special_tokens, so no doubled BOS). With the bundled template:
    prompt     = <|bos|> (<|role|> content <|end|>)* <|assistant|>
    completion = content <|end|>
  Plain-text rows: prompt_ids = tokenizer(prompt) (WITH the tokenizer's special tokens;
  the bundled tokenizer adds none), EOS text appended to chosen/rejected/completion unless
  already there, completion = tokenizer(prompt + completion)[common prefix:].
- CPOTrainer / ORPOTrainer (`maybe_apply_chat_template` then `tokenize_row`): the chat
  template is rendered to TEXT (prompt with the generation prompt; chosen = text of
  prompt+chosen minus the prompt's text), then tokenized with add_special_tokens=False;
  BOS is prepended unless the prompt already starts with it, EOS appended unless the
  completion already ends with it. For the bundled template this gives the same ids as
  DPO. For plain text it does not: CPO/ORPO add BOS, DPO/KTO do not (bundled tokenizer).
- Truncation: DPO/KTO truncate prompt+completion to max_length keeping the start (rows
  whose prompt alone fills max_length are dropped); CPO/ORPO cut the completion to fit
  max_length (default 1024, plus max_completion_length only for encoder-decoders). The
  bundled task never reaches the limits; parity runs keep max_length=None (DPO/KTO) / 1024.
- Labels: DPO/KTO/CPO/ORPO score only completion tokens for log-probs; ORPO's NLL scores
  every non-padding token of prompt+chosen (all but the first, as targets).
- Batches: chosen and rejected are stacked ([chosen; rejected]) and right-padded to a
  common width; padding does not change the fp32 values beyond rounding.
- KTO: the KL completions are a rotation by one within each chunk of
  per_device_train_batch_size rows in file order: row i is paired with the completion of
  row i-1 (row 0 with the chunk's last). KTO's batch size must be > 1.

Averaging (TRL, one micro-batch): DPO/IPO loss = mean over pairs; SimPO = mean over pairs
of per-token-averaged log-probs; ORPO = (token-mean NLL over the chosen rows) - beta *
mean(logsigmoid(log_odds)); KTO = mean over rows, KL reference point = mean over the
micro-batch (then over ranks), clamped at 0, no gradient. See trainers/objectives/preference.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")
# Logged per step besides the loss (whatever of these the trainer logs).
KEYS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl", "learning_rate",
        "grad_norm")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rows_in_our_order(cfg, steps: int) -> list[dict]:
    """The data rows of our first `steps` global batches (one rank), in order: TRL reads
    them sequentially, so this is the file order to hand it for the same batches."""
    from trainers.data.sources import training_batches
    from trainers.model.load import load_tokenizer

    batches, _ = training_batches(cfg, load_tokenizer(cfg.model), 1)
    rows = read_jsonl(cfg.data.train)
    out = []
    for step in range(steps):
        for k, r in batches.rows(step):
            src = batches.sources[k]
            out.append(rows[int(src.store.rows[int(src.examples(r)[0])]) - 1])  # row numbers are 1-based lines
    return out


def build_trainer(
    model_dir,
    rows: list[dict],
    objective: str,
    *,
    method: str = "lora",
    batch_size: int = 4,
    grad_accum: int = 1,
    steps: int = 10,
    lr: float = 1e-3,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    beta: float = 0.1,
    gamma: float = 0.5,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    target_modules="all-linear",
    precompute_ref: bool = False,
    rpo_alpha: float = 0.0,
    init_from=None,
    init_out=None,
    output_dir=None,
):
    """A TRL trainer for `objective` on `rows` (conversational or plain-text, TRL's formats)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.optim import lr_factor

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    if method not in ("lora", "full"):
        raise ValueError("method must be lora or full")
    torch.use_deterministic_algorithms(False)
    output_dir = output_dir or tempfile.mkdtemp(prefix=f"trl_{objective}_")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if method == "lora":
        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules,
                                 task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
        adam_epsilon=eps, max_grad_norm=max_grad_norm, optim="adamw_torch", seed=seed, data_seed=seed,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_dropout=True,
        dataset_num_proc=None,
    )
    sched_cfg = SimpleNamespace(schedule=schedule, warmup_steps=warmup_steps, warmup_ratio=None, min_lr_ratio=min_lr_ratio)

    def with_schedule(cls):
        class Reference(cls):
            # Our schedule, not transformers' get_scheduler (their warmups differ by one step).
            def create_scheduler(self, num_training_steps, optimizer=None):
                if self.lr_scheduler is None:
                    self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                                 lambda s: lr_factor(s, sched_cfg, num_training_steps))
                return self.lr_scheduler

        Reference.__name__ = cls.__name__
        return Reference

    dataset = Dataset.from_list(rows)
    if objective in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        # objective.rpo_alpha: TRL 1.16 writes RPO as a second loss type, "sft", weighted rpo_alpha
        losses = ["sigmoid" if objective == "dpo" else "ipo"] + (["sft"] if rpo_alpha else [])
        args = DPOConfig(**common, beta=beta, loss_type=losses, loss_weights=[1.0, rpo_alpha] if rpo_alpha else None,
                         max_length=None, precompute_ref_log_probs=precompute_ref)
        cls = DPOTrainer
    elif objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, beta=beta, loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0.0,
                         remove_unused_columns=False)
        cls = CPOTrainer
    elif objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, beta=beta, remove_unused_columns=False)
        cls = ORPOTrainer
    else:
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, beta=beta, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight, max_length=None,
                         precompute_ref_log_probs=precompute_ref)
        cls = KTOTrainer
    trainer = with_schedule(cls)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config)
    if init_from is not None or init_out is not None:
        _sync_initial_adapter(trainer.model, init_from, init_out)
    return trainer


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _sync_initial_adapter(model, init_from, init_out):
    import torch
    from safetensors.torch import load_file, save_file

    params = _trainable(model)
    if init_from is not None:
        state = load_file(str(init_from))
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"{init_from} lacks {sorted(missing)[:3]}...")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
    if init_out is not None:
        save_file({n: p.detach().contiguous().clone() for n, p in params.items()}, str(init_out))


def tokenized_rows(trainer, objective: str) -> list[dict]:
    """TRL's token ids per row, in file order, in one shape for every trainer:
    {"prompt": [...], "chosen": [...], "rejected": [...]} or, for KTO,
    {"prompt": [...], "completion": [...], "label": bool, "kl_completion": [...]}."""
    ds = trainer.train_dataset
    out = []
    for r in ds:
        if objective in ("dpo", "ipo"):
            out.append({"prompt": r["prompt_ids"], "chosen": r["chosen_ids"], "rejected": r["rejected_ids"]})
        elif objective == "kto":
            out.append({"prompt": r["prompt_ids"], "completion": r["completion_ids"], "label": bool(r["label"]),
                        "kl_completion": r.get("KL_completion_ids")})
        else:  # CPO/ORPO keep the prompt inside chosen_input_ids, with -100 labels on it
            n = len(r["prompt_input_ids"])
            out.append({"prompt": r["prompt_input_ids"], "chosen": r["chosen_input_ids"][n:],
                        "rejected": r["rejected_input_ids"][n:],
                        "prompt_as_in_chosen": r["chosen_input_ids"][:n], "labels_start": n})
    return out


def expected_tokens(tokenizer, row: dict) -> dict:
    """The ids the TRL conventions above give for one conversational row (prompt/chosen/
    rejected or prompt/completion), computed independently of TRL's dataset code: what
    our data layer should produce."""

    def ids(messages, gen=False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                             return_dict=True)["input_ids"]

    prompt = ids(row["prompt"], gen=True)
    out = {}
    for key in ("chosen", "rejected", "completion"):
        if key in row:
            full = ids(row["prompt"] + row[key])
            p = 0
            while p < min(len(prompt), len(full)) and prompt[p] == full[p]:
                p += 1
            out["prompt"] = prompt[:p] if "prompt" not in out else out["prompt"][: min(p, len(out["prompt"]))]
            out[key] = full[p:]
    return out


def run(model_dir, data, objective: str, out=None, **kwargs) -> list[dict]:
    """Train and return one record per optimizer step: {"step", "loss", "rewards/margins", ...}."""
    from transformers import TrainerCallback

    rows = read_jsonl(data) if isinstance(data, (str, Path)) else list(data)
    if kwargs.get("output_dir") is None:
        with tempfile.TemporaryDirectory(prefix=f"trl_{objective}_") as tmp:
            return run(model_dir, rows, objective, out=out, **{**kwargs, "output_dir": tmp})
    trainer = build_trainer(model_dir, rows, objective, **kwargs)
    records: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **_):
            if logs and "loss" in logs:
                rec = {"step": state.global_step}
                rec.update({k: float(logs[k]) for k in KEYS if k in logs})
                records.append(rec)

    trainer.add_callback(Record())
    trainer.train()
    if out is not None:
        Path(out).write_text(json.dumps({"objective": objective, "steps": records}, indent=1))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "assets/tiny-llama"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--objective", choices=OBJECTIVES, required=True)
    ap.add_argument("--method", choices=("lora", "full"), default="lora")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--desirable-weight", type=float, default=1.0)
    ap.add_argument("--undesirable-weight", type=float, default=1.0)
    ap.add_argument("--precompute-ref", action="store_true")
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--init-out", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    records = run(a.model, a.data, a.objective, out=a.out, method=a.method, batch_size=a.batch_size,
                  grad_accum=a.grad_accum, steps=a.steps, lr=a.lr, schedule=a.schedule,
                  warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio, seed=a.seed, beta=a.beta,
                  gamma=a.gamma, desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight,
                  precompute_ref=a.precompute_ref, init_from=a.init_from, init_out=a.init_out)
    for r in records:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
