"""NEFTune (train.neftune_alpha): uniform noise on the input embeddings in training
forwards, scaled alpha / sqrt(sequence length x hidden size), as TRL and transformers
define it (their own hook is used). Evaluation and generation run in eval mode and see
no noise. The noise comes from each rank's RNG, so like LoRA dropout it makes ranks
draw differently: plan-parity claims hold with it off."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.errors import UserError

if TYPE_CHECKING:  # the launcher checks the alpha without importing torch
    import torch


def check_alpha(alpha) -> None:
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise UserError(f"train.neftune_alpha={alpha!r} must be a positive number (the paper uses 5) or null (off).")


def add_neftune(hf: torch.nn.Module, alpha) -> None:
    check_alpha(alpha)
    if alpha is None:
        return
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = hf.get_input_embeddings()
    embeddings.neftune_noise_alpha = float(alpha)
    embeddings.register_forward_hook(neftune_post_forward_hook)
