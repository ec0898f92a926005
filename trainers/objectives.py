"""Objectives: a loss is a function of (model, micro-batch) -> summed loss and its count.

Returning the *sum* over target tokens (not a mean) lets the loop divide by the target
count of the whole global batch, so the step loss is the same however the batch is split.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from trainers.data import IGNORE
from trainers.errors import UserError

Objective = Callable[[torch.nn.Module, dict], torch.Tensor]


def forward_inputs(batch: dict, device: torch.device) -> dict:
    keys = ("input_ids", "position_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over non-ignored (pre-shifted) labels, computed in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def sft(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    # use_cache=False also matters for packing: transformers only builds the per-row
    # (block-diagonal) mask from position_ids when no KV cache is passed.
    out = model(**forward_inputs(batch, device), use_cache=False)
    logits = out.logits
    labels = batch["labels"].to(device)
    if logits.size(1) != labels.size(1):
        # Prompt tuning prepends virtual tokens: their logits have no target.
        logits = logits[:, -labels.size(1) :]
    return token_ce_sum(logits, labels)


OBJECTIVES: dict[str, Callable] = {"sft": sft}


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise UserError(f"Unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}.")
    return OBJECTIVES[name]
