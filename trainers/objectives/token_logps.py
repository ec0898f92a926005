"""Per-token log-probs (and entropies) of chosen tokens, projected to the vocabulary in
chunks inside the lm_head's forward, so the full-vocabulary logits of all completions of a
micro-batch never exist at once (the most common out-of-memory report of TRL's GRPO on
long completions).

Same idea as trainers/objectives/lm_loss.py's chunked loss, and inside the lm_head's
forward for the same reason (ZeRO-3 and FSDP2 gather its weight around that call): while
`token_logps` has put labels in context, the head returns a [rows, positions] tensor of
log-probs (0 where the label is ignored) in place of logits, computing `chunk` target
positions at a time, each chunk recomputed in backward (unless there is only one). Logits
are divided by the sampling temperature first, as TRL does.
"""
from __future__ import annotations

import contextvars

import torch
from torch.utils.checkpoint import checkpoint

from trainers.data.rows import IGNORE


class _Request:
    def __init__(self, labels: torch.Tensor, temperature: float, chunk: int):
        self.labels, self.temperature, self.chunk = labels, temperature, chunk
        self.entropy: torch.Tensor | None = None
        self.answered = False


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("grpo_token_logps", default=None)


def _chunk(head, hidden: torch.Tensor, labels: torch.Tensor, temperature: float):
    logp = (head(hidden).float() / temperature).log_softmax(-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _chunked(head, hidden: torch.Tensor, req: _Request) -> torch.Tensor:
    labels = req.labels
    if hidden.size(1) != labels.size(1):  # prompt tuning's virtual tokens have no label
        hidden = hidden[:, -labels.size(1):]
    flat = labels.reshape(-1)
    keep = (flat != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
    y = flat.index_select(0, keep)
    lps, ents = [], []
    # One chunk: its logits are what a chunk costs anyway (the estimate's logits term), so
    # keep them for backward instead of recomputing the head (bitwise the same gradients).
    recompute = torch.is_grad_enabled() and h.size(0) > req.chunk
    for start in range(0, max(h.size(0), 1), req.chunk):
        hs, ys = h[start:start + req.chunk], y[start:start + req.chunk]
        if recompute:
            lp, ent = checkpoint(_chunk, head, hs, ys, req.temperature, use_reentrant=False)
        else:
            lp, ent = _chunk(head, hs, ys, req.temperature)
        lps.append(lp)
        ents.append(ent.detach())
    n = flat.numel()
    out = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, keep, torch.cat(lps)[: keep.numel()])
    req.entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(
        0, keep, torch.cat(ents)[: keep.numel()]).view_as(labels)
    req.answered = True
    return out.view_as(labels)


def install(causal_lm) -> None:
    """Let the lm_head of `causal_lm` answer `token_logps` (idempotent)."""
    head = causal_lm.get_output_embeddings()
    if getattr(head, "_token_logps_installed", False):
        return
    inner = head.forward

    def forward(hidden, *args, **kwargs):
        req = _REQUEST.get()
        if req is None or args or kwargs or req.answered:
            return inner(hidden, *args, **kwargs)
        return _chunked(inner, hidden, req)

    head.forward = forward
    head._token_logps_installed = True


def token_logps(model, inputs: dict, labels: torch.Tensor, temperature: float, chunk: int):
    """(log-probs [rows, positions], entropies [rows, positions]) of `labels` (pre-shifted,
    IGNORE elsewhere) under `model(**inputs)`; gradients flow to the log-probs."""
    req = _Request(labels, temperature, chunk)
    token = _REQUEST.set(req)
    try:
        out = model(**inputs, use_cache=False).logits
    finally:
        _REQUEST.reset(token)
    if not req.answered or out.shape != labels.shape:
        raise RuntimeError("the lm_head did not return per-token log-probs: token_logps.install was not called on "
                           "this model, or the model transforms its logits after the lm_head")
    return out, req.entropy
