"""The optimizers (torch's AdamW and SGD, bitsandbytes' 8-bit, paged and Lion, transformers'
Adafactor), their parameter groups (LoRA+, `optim.lr_embeddings`) and the LR schedules.

Every optimizer is the defining library's class, built from `optim.*`; nothing here
re-implements an update rule. torch is imported where an optimizer or schedule is built:
the launcher reads `SCHEDULES`, `OPTIMIZERS`, `warmup_steps` and `lr_factor` without it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainers.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

# cosine, linear, constant: the launcher's own warmup-then-decay to optim.min_lr_ratio
# (`lr_factor`); the others are transformers' get_scheduler curves, taken as they are.
SCHEDULES = ("cosine", "linear", "constant", "cosine_with_restarts", "polynomial", "constant_with_warmup")
TRANSFORMERS_SCHEDULES = ("cosine_with_restarts", "polynomial", "constant_with_warmup")

# optim.name -> the class that implements it ("module:attribute", imported on first use).
OPTIMIZERS = {
    "adamw": "torch.optim:AdamW",
    "adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "paged_adamw8bit": "bitsandbytes.optim:PagedAdamW8bit",
    "paged_adamw32bit": "bitsandbytes.optim:PagedAdamW32bit",
    "lion": "bitsandbytes.optim:Lion",  # optim.bits=8: bitsandbytes.optim:Lion8bit
    "adafactor": "transformers.optimization:Adafactor",
    "sgd": "torch.optim:SGD",
}
BITSANDBYTES = ("adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "lion")


def warmup_steps(optim_cfg, max_steps: int) -> int:
    """optim.warmup_steps, or optim.warmup_ratio of the run's steps rounded up (transformers'
    TrainingArguments.get_warmup_steps)."""
    ratio = optim_cfg.warmup_ratio
    if ratio is not None:
        return math.ceil(max_steps * ratio)
    return int(optim_cfg.warmup_steps)


def _embedding_params(model) -> set[int]:
    """The input embeddings and the LM head (one set when tied), as ids."""
    import torch

    mods = [getattr(model, f)() for f in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, f)]
    if not any(m is not None for m in mods):  # a pipeline stage: its own modules
        mods = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) or n.endswith("lm_head")]
    return {id(p) for m in mods if m is not None for p in m.parameters()}


def param_groups(model: torch.nn.Module, optim_cfg, method_cfg) -> list[dict]:
    """Trainable parameters, split for LoRA+ (B matrices at lr x ratio) or, in full
    fine-tuning, for `optim.lr_embeddings` (embeddings and LM head at their own lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("The model has no trainable parameter: check method.* settings.")
    ratio = method_cfg.loraplus_lr_ratio if method_cfg.peft == "lora" else None  # LoRA+ (lora family only)
    if ratio:
        b = [p for n, p in named if "lora_B" in n or "lora_embedding_B" in n]
        rest = [p for n, p in named if not ("lora_B" in n or "lora_embedding_B" in n)]
        return [{"params": rest, "lr": optim_cfg.lr}, {"params": b, "lr": optim_cfg.lr * ratio}]
    if optim_cfg.lr_embeddings is not None and method_cfg.peft is None:
        emb = _embedding_params(model)
        return [{"params": [p for _, p in named if id(p) not in emb], "lr": optim_cfg.lr},
                {"params": [p for _, p in named if id(p) in emb], "lr": optim_cfg.lr_embeddings}]
    return [{"params": [p for _, p in named], "lr": optim_cfg.lr}]


def optimizer_kwargs(optim_cfg) -> dict:
    """The optimizer's constructor arguments from optim.* (lr comes with each group)."""
    c, name = optim_cfg, optim_cfg.name
    if name in ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit"):
        kw = dict(lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
        return kw if name in ("adamw", "paged_adamw32bit") else {**kw, "min_8bit_size": int(c.min_8bit_size)}
    if name == "lion":
        return dict(lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, min_8bit_size=int(c.min_8bit_size))
    if name == "adafactor":  # an external lr and schedule, as transformers' Trainer uses it
        return dict(lr=c.lr, eps=tuple(c.eps), clip_threshold=c.clip_threshold, decay_rate=c.decay_rate,
                    beta1=c.beta1, weight_decay=c.weight_decay, scale_parameter=False, relative_step=False,
                    warmup_init=False)
    if name == "sgd":
        return dict(lr=c.lr, momentum=c.momentum, nesterov=bool(c.nesterov), weight_decay=c.weight_decay)
    raise UserError(f"optim.name={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")


def build_optimizer(params_or_groups, optim_cfg) -> torch.optim.Optimizer:
    from trainers.registry import resolve

    table = dict(OPTIMIZERS)
    if optim_cfg.name == "lion" and int(optim_cfg.bits) == 8:
        table["lion"] = "bitsandbytes.optim:Lion8bit"
    cls = resolve(table, optim_cfg.name, "optim.name")
    return cls(params_or_groups, **optimizer_kwargs(optim_cfg))


def lr_factor(step: int, optim_cfg, max_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps (cosine, linear, constant)."""
    warm = warmup_steps(optim_cfg, max_steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    if optim_cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    floor = optim_cfg.min_lr_ratio
    if optim_cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> LambdaLR:
    from torch.optim.lr_scheduler import LambdaLR

    name = optim_cfg.schedule
    if name not in SCHEDULES:
        raise UserError(f"optim.schedule={name!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    if name in TRANSFORMERS_SCHEDULES:
        from transformers import get_scheduler

        extra = {"cosine_with_restarts": {"num_cycles": int(optim_cfg.num_cycles)},
                 "polynomial": {"power": float(optim_cfg.power), "lr_end": float(optim_cfg.lr_end)}}.get(name)
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(optim_cfg, max_steps),
                             num_training_steps=max_steps, scheduler_specific_kwargs=extra)
    return LambdaLR(optimizer, lambda s: lr_factor(s, optim_cfg, max_steps))
