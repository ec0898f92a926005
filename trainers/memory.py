"""Memory options of `train.*`, applied once to the freshly built model before a plan wraps
it, so every plan (none, ddp, zero*, fsdp2, pipeline) trains the same modified model.

- `train.activation_checkpointing`: each decoder layer keeps only its input for backward
  and recomputes its activations there (transformers' per-layer checkpointing, non-reentrant).
  Non-reentrant because it needs no input that requires grad (PEFT freezes the embeddings)
  and it checkpoints the layer's `forward`, not `__call__`: FSDP2's and ZeRO-3's gather
  hooks stay outside the recomputed region, and the pipeline's stages, which call the
  backbone with their own slice of the same layer modules, checkpoint too. Layers only
  checkpoint in train mode (`module.training`), so evaluation and generation are unchanged.
- `train.loss_chunk_tokens`: the loss never holds a large micro-batch's full logits
  (trainers/objectives/lm_loss.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.errors import UserError

if TYPE_CHECKING:  # the launcher checks these options without importing torch
    import torch

# `train.loss_chunk_tokens=auto`: chunks whose fp32 logits take at most this much
AUTO_LOGITS_BYTES = 128 * 2**20


def chunk_tokens_for(setting, vocab_size: int) -> int:
    """Tokens per chunk for `train.loss_chunk_tokens` (0: never chunk)."""
    if setting == "auto":
        return max(1, AUTO_LOGITS_BYTES // (4 * vocab_size))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise UserError(
            f"train.loss_chunk_tokens={setting!r} must be auto, 0 (never chunk the loss) or a "
            f"positive number of tokens per chunk."
        )
    return setting




def hf_model(model: torch.nn.Module):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def enable_activation_checkpointing(hf) -> None:
    if not hf.supports_gradient_checkpointing:
        raise UserError(
            f"train.activation_checkpointing=true: {type(hf).__name__} does not support "
            f"per-layer activation checkpointing in transformers; set it to false."
        )
    had_input_hooks = bool(getattr(hf, "_require_grads_hooks", None))
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not had_input_hooks:
        # transformers also makes the embeddings' output require grad, which only reentrant
        # checkpointing needs; it would add a useless backward through the first layer's
        # input projections down to the frozen embeddings.
        hf.disable_input_require_grads()


def apply_memory_options(model: torch.nn.Module, train_cfg) -> None:
    hf = hf_model(model)
    if hf is None:
        raise UserError(f"{type(model).__name__} holds no transformers model to apply train.* memory options to.")
    if train_cfg.get("activation_checkpointing", False):
        enable_activation_checkpointing(hf)
    from trainers.objectives.lm_loss import install_chunked_head

    install_chunked_head(hf, train_cfg.get("loss_chunk_tokens", "auto"))
