"""AdamW (with LoRA+ parameter groups) and the warmup-then-decay LR schedule.

torch is imported where an optimizer or schedule is built: the launcher reads
`SCHEDULES` and `lr_factor` without it."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainers.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: torch.nn.Module, optim_cfg, method_cfg) -> list[dict]:
    """Trainable parameters, split for LoRA+ (B matrices at lr x ratio) when asked."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("The model has no trainable parameter: check method.* settings.")
    ratio = method_cfg.get("loraplus_lr_ratio")
    if not ratio:
        return [{"params": [p for _, p in named], "lr": optim_cfg.lr}]
    b = [p for n, p in named if "lora_B" in n or "lora_embedding_B" in n]
    rest = [p for n, p in named if not ("lora_B" in n or "lora_embedding_B" in n)]
    return [
        {"params": rest, "lr": optim_cfg.lr},
        {"params": b, "lr": optim_cfg.lr * ratio},
    ]


def build_optimizer(params_or_groups, optim_cfg) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(
        params_or_groups,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )


def lr_factor(step: int, optim_cfg, max_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    warm = optim_cfg.warmup_steps
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

    if optim_cfg.schedule not in SCHEDULES:
        raise UserError(f"optim.schedule={optim_cfg.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    return LambdaLR(optimizer, lambda s: lr_factor(s, optim_cfg, max_steps))
