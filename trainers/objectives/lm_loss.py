"""The language-model loss: summed fp32 cross-entropy of the lm_head's logits against
pre-shifted labels, computed either from the whole micro-batch's logits or chunk by chunk.

Why chunks. At Llama-3's vocabulary (128256) one 4096-token row has 2 GiB of fp32 logits,
and the plain loss holds them, their log-softmax and then their gradient at once: a
spike larger than a decoder layer's activations. Chunked, lm_head + fp32 cross-entropy
run over a few hundred target tokens at a time under non-reentrant `torch.utils.checkpoint`,
so each chunk's logits are freed after its forward and recomputed in backward: only one
chunk's logits are ever alive.

Why inside the lm_head's forward. Sharded plans gather the lm_head weight with module
hooks (ZeRO-3 partitions it and gathers it around the module's forward and backward; FSDP2
keeps it in the root unit), so the weight may only be used inside that module's call.
`install_chunked_head` therefore replaces the lm_head's `forward`: while `lm_ce_sum` has
put labels in context, a call returns the summed loss (a 0-d tensor, which flows out of
the model's forward where the logits would) instead of logits. Without that context
(generation, the pipeline's eval forward) the head returns logits as before. Micro-batches
with no more target tokens than one chunk take the plain path unchanged, so chunking costs
nothing where it does not matter.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainers.errors import UserError
from trainers.memory import chunk_tokens_for
from trainers.data.rows import IGNORE

# `train.loss_chunk_tokens=auto`: one chunk's fp32 logits stay under this many bytes
# (261 tokens at a vocabulary of 128256; 1048 at 32000).

# Logits transforms some models apply after lm_head (Gemma's soft-capping, Cohere's and
# Granite's scaling): a head that returns the loss would have it transformed instead.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over non-ignored (pre-shifted) labels, computed in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _chunk_ce(head: Callable, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_ce_sum(head: Callable, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """token_ce_sum(head(hidden), labels) without the whole logits tensor: only target
    positions are projected, `chunk_tokens` at a time, each chunk recomputed in backward.
    `hidden` may be longer than `labels` (prompt tuning prepends virtual tokens, which
    have no target): its last labels.size(1) positions are the labelled ones."""
    if hidden.size(1) != labels.size(1):
        hidden = hidden[:, -labels.size(1) :]
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
    y = flat_labels.index_select(0, keep)
    recompute = torch.is_grad_enabled()
    parts = []
    # max(..., 1): a micro-batch without targets still returns a loss connected to the
    # graph (zero gradients), as the plain path does.
    for start in range(0, max(h.size(0), 1), chunk_tokens):
        hs, ys = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
        if recompute:
            parts.append(checkpoint(_chunk_ce, head, hs, ys, use_reentrant=False))
        else:
            parts.append(_chunk_ce(head, hs, ys))
    return torch.stack(parts).sum()


class _Targets:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.n_targets: int | None = None
        self.loss_returned = False


_TARGETS: contextvars.ContextVar[_Targets | None] = contextvars.ContextVar("lm_loss_targets", default=None)


def lm_ce_sum(forward: Callable[[], torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of what `forward()` computes (a model's or an lm_head's
    forward returning logits), chunked when the lm_head was installed with
    `install_chunked_head` and the micro-batch is large enough to need it."""
    targets = _Targets(labels)
    token = _TARGETS.set(targets)
    try:
        out = forward()
    finally:
        _TARGETS.reset(token)
    if targets.loss_returned:
        if out.dim() != 0:
            raise RuntimeError("the lm_head returned the chunked loss, but the model transformed it")
        return out
    if out.size(1) != labels.size(1):
        # Prompt tuning prepends virtual tokens: their logits have no target.
        out = out[:, -labels.size(1) :]
    return token_ce_sum(out, labels)


@contextlib.contextmanager
def plain_logits():
    """Inside, the lm_head returns logits even under `lm_ce_sum`: for a forward that runs
    the lm_head on other rows than the labels' (the pipeline's eval forward, which
    broadcasts logits from its last stage)."""
    token = _TARGETS.set(None)
    try:
        yield
    finally:
        _TARGETS.reset(token)


def install_chunked_head(causal_lm, setting) -> bool:
    """Make the lm_head of `causal_lm` (a transformers *ForCausalLM) compute the chunked
    loss when `lm_ce_sum` asks for it. Returns whether it did: not for `setting` 0, nor
    (with `auto`) for models without a plain output head or that transform the logits after
    it, for which an explicit chunk size is refused."""
    head = causal_lm.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or causal_lm.config.get_text_config().vocab_size
    chunk_tokens = chunk_tokens_for(setting, vocab)
    if chunk_tokens == 0:
        return False
    transforms = [k for k in POST_HEAD_TRANSFORMS if getattr(causal_lm.config, k, None)]
    if head is None or transforms:
        if setting == "auto":
            return False
        raise UserError(
            f"train.loss_chunk_tokens={setting}: {type(causal_lm).__name__} "
            f"{'transforms its logits after the lm_head (' + ', '.join(transforms) + ')' if transforms else 'has no output head'}, "
            f"so the loss cannot be computed in chunks inside it; use train.loss_chunk_tokens=auto or 0."
        )
    plain = head.forward

    def forward(hidden, *args, **kwargs):
        targets = _TARGETS.get()
        if targets is None or args or kwargs or targets.loss_returned:
            return plain(hidden, *args, **kwargs)
        if targets.n_targets is None:
            targets.n_targets = int((targets.labels != IGNORE).sum())
        if targets.n_targets <= chunk_tokens:
            return plain(hidden)
        targets.loss_returned = True
        return chunked_ce_sum(plain, hidden, targets.labels, chunk_tokens)

    head.forward = forward
    return True
