"""Objectives: a loss is a function of (model, micro-batch) -> summed loss and its count.

Returning the *sum* over target tokens (not a mean) lets the loop divide by the target
count of the whole global batch, so the step loss is the same however the batch is split.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainers.errors import UserError
from trainers.lm_loss import lm_ce_sum

Objective = Callable[[torch.nn.Module, dict], torch.Tensor]


def forward_inputs(batch: dict, device: torch.device) -> dict:
    keys = ("input_ids", "position_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}


def sft(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    # use_cache=False also matters for packing: transformers only builds the per-row
    # (block-diagonal) mask from position_ids when no KV cache is passed. lm_ce_sum
    # cuts off prompt tuning's virtual tokens and chunks the loss when it is large.
    inputs = forward_inputs(batch, device)
    return lm_ce_sum(lambda: model(**inputs, use_cache=False).logits, batch["labels"].to(device))


OBJECTIVES: dict[str, Callable] = {"sft": sft}


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise UserError(f"Unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}.")
    return OBJECTIVES[name]
