"""objective=reward: a reward model (one score per sequence) trained on preference pairs
with TRL 1.16's `RewardTrainer` loss, so a reward model trained here scores like one
trained there and plugs into a GRPO run's `objective.rewards=[{model: RUN/export/merged}]`.

The model is the causal LM's decoder with a sequence-classification head of one label
(transformers' *ForSequenceClassification, built by trainers/model/load.py with the head
fresh). A sequence's reward is the head's output at its last token, which is where
transformers pools (the last non-padding token) and so what TRL trains; we read it per
sequence from the head's per-position output, so packed micro-batches (several sequences
in a row, `segments` saying which) are scored exactly like padded ones.

Loss per pair (TRL `RewardTrainer.compute_loss`), with r_c, r_r the rewards of the chosen
and rejected sequences (the whole conversation, prompt included, as TRL tokenizes it) and
m the row's optional `margin`:
    -logsigmoid(r_c - r_r - m)  +  center_rewards_coefficient * (r_c + r_r)^2
TRL averages both terms over the pairs of the micro-batch; we return sums, which the loop
divides by the pairs of the global batch: the same value when the global batch is one
micro-batch, split-invariant otherwise. Metrics (TRL's names): `accuracy` (pairs with
r_c > r_r), `margin` (mean r_c - r_r) and `mean_reward` as global means; TRL's min/max
reward are per-micro-batch extrema and are not logged.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_HEADS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None):
    """(loss summed over the pairs, {metric: sum over the pairs})."""
    diff = chosen - rejected
    losses = -F.logsigmoid(diff if margin is None else diff - margin.to(diff))
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    d = diff.detach()
    metrics = {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
               "mean_reward": ((chosen.detach() + rejected.detach()) / 2).sum()}
    return losses.sum(), metrics


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The `score` module inside the plan's and PEFT's wrappers (PEFT's modules_to_save
    wrapper when it trains the head: its output is the trained copy's)."""
    if model not in _HEADS:
        found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "score"]
        if not found:
            raise RuntimeError("objective=reward needs a sequence-classification model with a `score` head")
        _HEADS[model] = min(found, key=lambda nm: nm[0].count("."))[1]  # the outermost
    return _HEADS[model]


def sequence_rewards(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The reward of every sequence of `batch`: the score head's output at the sequence's
    last position. The head's per-position output is taken from a forward hook, since
    transformers returns only its own pooling (the last non-pad token of each ROW, which
    a packed row would get wrong)."""
    from trainers.objectives.catalog import forward_inputs

    seen = []
    handle = score_head(model).register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model(**forward_inputs(batch, device), use_cache=False)
    finally:
        handle.remove()
    segments = batch["segments"]
    scores = seen[-1][..., 0]
    if scores.size(1) != segments.size(1):  # prompt tuning's virtual tokens come first
        scores = scores[:, -segments.size(1):]
    width = segments.size(1)
    rows, cols = (segments >= 0).nonzero(as_tuple=True)
    which = segments[rows, cols]
    n = int(segments.max()) + 1
    last = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, which, rows * width + cols, "amax")
    return scores.reshape(-1)[last.to(scores.device)].float()


def reward_objective(knobs: dict):
    from trainers.objectives.catalog import Objective

    center = knobs["center_rewards_coefficient"]

    def loss(model, batch: dict, device: torch.device):
        keep = batch["keep"].to(device)
        rewards = sequence_rewards(model, batch, device)
        half = keep.numel()  # sequences are [chosen...; rejected...] (collate_preference)
        margin = batch["margin"].to(device)[keep] if "margin" in batch else None
        return reward_loss(rewards[:half][keep], rewards[half:][keep], margin, center)

    return Objective("reward", "rows", loss, None, knobs)

