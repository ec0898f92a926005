"""Preference objectives (DPO and its TRL loss types, IPO, SimPO, ORPO, KTO) as pure
functions of per-sequence quantities, defined exactly as TRL 1.16.0 defines them.

Why pure functions of per-sequence sums. Every loss here only needs, per sequence, the
summed completion log-probability and the completion token count (plus, for ORPO, the
chosen NLL over prompt and completion, and for KTO a reference point shared by the whole
batch). The loop can compute those for any split of the global batch (micro-batches,
accumulation, ranks, unpadded rows), and these functions turn them into a loss SUM over
the pairs (KTO: rows) they are given. The loop divides by the number of pairs (rows) in the
whole global batch, so a step's loss is the mean over the global batch however it is
divided, as for SFT.

Where TRL is not split-invariant, and what we do instead (each choice equals TRL exactly
when the global batch is one micro-batch on one rank, which is what the parity test runs):

- ORPO's NLL term is TRL's token mean over the chosen sequences of the *micro-batch*
  (`nn.CrossEntropyLoss()` over the padded chosen rows). We use the token mean over the
  chosen sequences of the *global batch*: `orpo_loss` takes the global
  `nll_tokens_per_pair` = (NLL target tokens in the global batch) / (pairs in it).
- KTO's KL reference point is, in TRL, the mean of `KL_logps - ref_KL_logps` over the
  micro-batch, averaged over ranks (`gather_for_metrics(kl).mean()`, a mean of per-rank
  means), clamped at 0; its mismatched completions are a rotation by one within each
  chunk of `per_device_train_batch_size` rows of the dataset in file order. We estimate it
  over the global batch: the loop rotates completions within the global batch
  (`kto_mismatched`), sums the no-grad log-ratios over all of it and passes
  `kto_reference_point(...)` to every micro-batch.
- TRL logs the mean of per-micro-batch means (DPOTrainer/KTOTrainer `log`, CPO/ORPO
  `store_metrics`); we log global means (`finalize_metrics`). They differ only when
  micro-batches differ in size (DPO...ORPO) or, for KTO, in their desirable/undesirable mix.

TRL's loss for a micro-batch is `per_sequence_loss.mean()` (DPO), `losses.mean()` (CPO,
ORPO's odds-ratio term) and `losses.nanmean()` (KTO), so for equal-sized micro-batches
TRL's step loss is also the global mean; the list above is complete.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainers.data.rows import IGNORE
from trainers.objectives.settings import DPO_LOSS_TYPES

# Sizing of one chunk of positions in `token_logps`: its fp32 logits stay under this.
CHUNK_BYTES = 64 * 2**20

# --------------------------------------------------------------------------------------
# Per-sequence log-probabilities


class _TargetLogProbs(torch.autograd.Function):
    """log p(label) at labelled positions, chunked so that only one chunk of fp32 logits
    exists at a time, in forward and in backward. Autograd through `log_softmax + gather`
    would keep a full-vocabulary log-softmax (fp32 if the logits are half) alive until
    backward; this keeps only the logits the caller already holds, one fp32 log-sum-exp
    per target, and recomputes the softmax chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, logits, rows, cols, targets, chunk):
        n = rows.numel()
        lse = logits.new_empty(n, dtype=torch.float32)
        picked = logits.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk):
            x = logits[rows[s : s + chunk], cols[s : s + chunk]].float()
            lse[s : s + chunk] = torch.logsumexp(x, dim=-1)
            picked[s : s + chunk] = x.gather(1, targets[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, rows, cols, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.zeros_like(logits)
        g = grad_out.float()
        for s in range(0, rows.numel(), chunk):
            r, c, gs = rows[s : s + chunk], cols[s : s + chunk], g[s : s + chunk, None]
            d = torch.exp(logits[r, c].float() - lse[s : s + chunk, None]).mul_(-gs)
            d.scatter_add_(1, targets[s : s + chunk, None], gs)
            grad[r, c] = d.to(grad.dtype)
        return grad, None, None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """Per-position log p(labels[b, t] | logits[b, t]) in fp32, 0 where labels is IGNORE.

    `labels` are pre-shifted (labels[t] is the target of position t). `logits` may be
    longer than `labels` along the sequence (prompt tuning's virtual tokens): its last
    labels.size(1) positions are used. Ignored positions are never projected, and the
    logits are never copied whole (not even when they are a non-contiguous slice)."""
    if logits.size(1) != labels.size(1):
        logits = logits[:, -labels.size(1) :]
    labels = labels.to(logits.device)
    keep = labels != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)
    if chunk_positions is None:
        chunk_positions = max(1, CHUNK_BYTES // (4 * logits.size(-1)))
    out = logits.new_zeros(labels.shape, dtype=torch.float32)
    if rows.numel() == 0:
        # Keep the result connected to the graph (zero gradients), as lm_ce_sum does.
        return out + 0.0 * logits.sum()
    picked = _TargetLogProbs.apply(logits, rows, cols, labels[rows, cols], chunk_positions)
    return out.index_put((rows, cols), picked)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None,
                   chunk_positions: int | None = None):
    """(summed log-prob of each sequence's labelled tokens, number of labelled tokens).

    A sequence is a row, or with `segments` (batches.collate_sequences: the sequence index
    of every position, -1 for padding) a segment of a packed row. Sequences are
    independent, so a padded micro-batch, a packed one and the same sequences one by one
    give the same sums: this is what makes the losses below split-invariant."""
    per_token = token_logps(logits, labels, chunk_positions)
    return masked_sums(per_token, labels != IGNORE, segments)


def masked_sums(per_token: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None):
    """(sum of `per_token` under `mask` per sequence, count per sequence): rows, or the
    segments of packed rows. ORPO's chosen sequences use it with two masks: their
    targets are the whole sequence (NLL) but their reward uses the completion only."""
    mask = mask.to(per_token.device).bool()
    if segments is None:
        return (per_token * mask).sum(dim=1), mask.sum(dim=1)
    return per_sequence(per_token * mask, segments), per_sequence(mask.long(), segments)


def per_sequence(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Sum of `values` [rows, positions] over each sequence of `segments` (-1: padding)."""
    n = int(segments.max()) + 1  # read before the move: no device sync
    segments = segments.to(values.device)
    real = segments >= 0
    return values.new_zeros(n).index_add(0, segments[real], values[real])


# --------------------------------------------------------------------------------------
# Objectives. Each returns (loss summed over the given pairs/rows, {metric: sum}).


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.sum(),
        "rewards/rejected": rr.sum(),
        "rewards/accuracies": (cr > rr).float().sum(),
        "rewards/margins": (cr - rr).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
):
    """DPO and its pairwise variants, TRL 1.16.0 `DPOTrainer._compute_loss`
    (trl/trainer/dpo_trainer.py), with f_divergence_type="reverse_kl", ld_alpha=None,
    use_weighting=False, a single loss type (TRL's defaults).

    Inputs are per pair: policy and reference log-probs SUMMED over the completion tokens
    (TRL: `per_token_logps.sum(dim=1)` with labels masked to the completion), and for
    "ipo"/"sigmoid_norm" the completion token counts. With
        c = chosen_logps - ref_chosen_logps,  r = rejected_logps - ref_rejected_logps,
        d = c - r:
      sigmoid:      -logsigmoid(beta d)            (no label smoothing in TRL 1.x)
      hinge:        relu(1 - beta d)
      ipo:          (c/n_c - r/n_r - 1/(2 beta))^2 (per-token averaged log-ratios;
                    TRL's n is completion_mask.sum(1).clamp(min=1) on the UNshifted mask,
                    which equals our target count whenever the prompt is non-empty)
      robust:       (-(1-ls) logsigmoid(beta d) + ls logsigmoid(-beta d)) / (1 - 2 ls)
      exo_pair:     q_w (log q_w - log(1-ls)) + q_l (log q_l - log ls),
                    q_w = sigmoid(beta d), q_l = sigmoid(-beta d)  (needs ls > 0)
      nca_pair:     -logsigmoid(beta c) - logsigmoid(-beta c)/2 - logsigmoid(-beta r)/2
      bco_pair:     -logsigmoid(beta c) - logsigmoid(-beta r)
      sppo_hard:    (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
      apo_zero:     1 - sigmoid(beta c) + sigmoid(beta r)
      apo_down:     sigmoid(beta c) + 1 - sigmoid(beta d)
      discopop:     m = sigmoid(beta d / tau); (1-m)(-logsigmoid(beta d)) + m exp(-beta d)
      sigmoid_norm: -logsigmoid(beta (c/n_c - r/n_r))
    TRL's loss is the mean of these over the micro-batch; we return their sum.
    Metrics (TRL names, summed over pairs): rewards/chosen = beta c, rewards/rejected =
    beta r, rewards/accuracies = [beta c > beta r], rewards/margins = beta (c - r),
    logps/chosen and logps/rejected = the policy's summed log-probs."""
    c = chosen_logps - ref_chosen_logps
    r = rejected_logps - ref_rejected_logps
    d = c - r
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type in ("ipo", "sigmoid_norm"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type={loss_type!r} needs the completion token counts")
        delta = c / chosen_tokens.clamp(min=1.0) - r / rejected_tokens.clamp(min=1.0)
        losses = (delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * delta)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * d)
        flipped = -label_smoothing * F.logsigmoid(-beta * d)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        if label_smoothing <= 0:
            raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (TRL refuses 0)")
        qw, log_qw = torch.sigmoid(beta * d), F.logsigmoid(beta * d)
        ql, log_ql = torch.sigmoid(-beta * d), F.logsigmoid(-beta * d)
        losses = qw * (log_qw - math.log1p(-label_smoothing)) + ql * (log_ql - math.log(label_smoothing))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    elif loss_type == "sppo_hard":
        losses = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * d)
    elif loss_type == "discopop":
        logits = beta * d
        m = torch.sigmoid(logits / discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
    else:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; supported: {', '.join(DPO_LOSS_TYPES)}")
    return losses.sum(), _pair_metrics(beta * c, beta * r, chosen_logps, rejected_logps)


def rpo_nll(loss_sum: torch.Tensor, chosen_logps: torch.Tensor, nll_tokens_per_pair: float, rpo_alpha: float):
    """DPO + alpha x NLL of the chosen completions (RPO, arXiv 2404.19733): TRL 1.16's
    DPOTrainer with `loss_type=["sigmoid", "sft"], loss_weights=[1.0, rpo_alpha]` (TRL
    before 1.0 called it `DPOConfig.rpo_alpha`). TRL's "sft" term is
    `-chosen_per_token_logps[chosen_completion_mask].mean()`, a token mean over the chosen
    completions of the micro-batch; `chosen_logps` are their summed log-probs here, and
    `nll_tokens_per_pair` = (chosen completion targets of the GLOBAL batch) / (its pairs),
    so that, divided by the global pair count, the term is the global batch's token mean:
    TRL's value when the global batch is one micro-batch, split-invariant otherwise (as
    ORPO's NLL). Returns (loss sum with the term added, the NLL's share for `nll_loss`).
    Why: DPO alone lowers both answers of a near-miss pair (likelihood displacement); the
    NLL term keeps the chosen answer likely (docs/dpo-after-sft.md)."""
    nll = -chosen_logps.sum() / nll_tokens_per_pair
    return loss_sum + rpo_alpha * nll, nll.detach()


def simpo_loss(
    chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
):
    """SimPO as TRL 1.16.0 trains it: `CPOTrainer` (trl/experimental/cpo/cpo_trainer.py)
    with loss_type="simpo", cpo_alpha=0, alpha=0 (defaults beta=0.1, simpo_gamma=0.5).

    Inputs are the policy's SUMMED completion log-probs and completion token counts; CPO's
    `get_batch_logps(average_log_prob=True)` divides them (no clamp: an empty completion is
    NaN in TRL, so the data layer must refuse it). With a = sum/n per sequence:
        h = (a_c - a_r) - gamma / beta
        loss = -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)    (`cpo_loss`)
    and TRL's step loss is `losses.mean() + cpo_alpha * nll` = `losses.mean()`.
    Metrics (TRL names): rewards/chosen = beta a_c, rewards/rejected = beta a_r,
    accuracies and margins from those, logps/chosen = a_c, logps/rejected = a_r (per-token
    AVERAGED, unlike DPO's sums). TRL also logs nll_loss = 0 (cpo_alpha=0); not repeated."""
    a_c = chosen_logps / chosen_tokens
    a_r = rejected_logps / rejected_tokens
    h = (a_c - a_r) - gamma / beta
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return losses.sum(), _pair_metrics(beta * a_c, beta * a_r, a_c, a_r)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, TRL's ORPO `log1mexp` (branch at -ln 2 against
    cancellation)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_tokens: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    nll_tokens_per_pair: float,
    beta: float = 0.1,
):
    """ORPO as TRL 1.16.0 `ORPOTrainer` (trl/experimental/orpo/orpo_trainer.py) computes it.

    chosen_logps / rejected_logps: SUMMED completion log-probs, with their token counts.
    chosen_nll: per chosen sequence, the summed cross-entropy of EVERY non-padding target,
    prompt included (TRL `concatenated_forward`: labels = input_ids where attention_mask is
    1, "orpo chosen nll loss is computed over the full prompt and response"); with our
    pre-shifted labels that is every position but the last of the chosen row.
    nll_tokens_per_pair: (number of those NLL targets in the GLOBAL batch) / (pairs in the
    global batch); see below.

    TRL, for one micro-batch of P pairs whose chosen rows have T NLL targets in total:
        a = logps / n per sequence  (`get_batch_logps(average_log_prob=True)`)
        log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
        ratio = logsigmoid(log_odds)
        loss = sum(chosen_nll) / T - beta * mean(ratio)
    The NLL is a token mean over the micro-batch, which is not a sum over pairs. We return
        sum(chosen_nll) / nll_tokens_per_pair - beta * sum(ratio)
    so that, divided by the global pair count, the NLL is the token mean over the global
    batch: TRL's value exactly when the global batch is one micro-batch, split-invariant
    otherwise.
    Metrics (TRL names): rewards/* from beta a (as SimPO), logps/* = a (averaged),
    nll_loss (same global token mean), log_odds_ratio = mean(ratio) (TRL's name for the
    logsigmoid, sic) and log_odds_chosen = mean(log_odds)."""
    a_c = (chosen_logps / chosen_tokens).float()
    a_r = (rejected_logps / rejected_tokens).float()
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.sum() / nll_tokens_per_pair
    metrics = _pair_metrics(beta * a_c, beta * a_r, a_c, a_r)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().sum()
    metrics["log_odds_chosen"] = log_odds.detach().sum()
    return nll - beta * ratio.sum(), metrics


def kto_mismatched(items: list) -> list:
    """The completions paired with the wrong prompts for KTO's KL estimate: TRL's rotation by
    one, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}) (`KTOTrainer._prepare_dataset`,
    `add_kl_completion_ids`). TRL rotates within each chunk of per_device_train_batch_size
    rows of the dataset in file order; we rotate within the global batch (the same rows
    when it is one unshuffled micro-batch), so the mismatched completions are the batch's
    own, as TRL's comment there recommends."""
    return items[-1:] + items[:-1]


def kto_reference_point(kl_logratio_sum, rows: int) -> torch.Tensor:
    """KTO's z0: clamp(mean over the global batch of (KL_logps - ref_KL_logps), min=0),
    detached. KL_logps are the policy's summed log-probs of the mismatched completions under
    no_grad (TRL `_compute_kl_logps`); TRL averages over the micro-batch and then over ranks
    (`gather_for_metrics(kl).mean().clamp(min=0)`): per micro-batch, not split-invariant.
    The caller sums the log-ratios over the whole global batch (all-reduced) first."""
    kl = torch.as_tensor(kl_logratio_sum, dtype=torch.float32).detach() / rows
    return kl.clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    label: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """KTO as TRL 1.16.0 `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py),
    loss_type="kto".

    Per row: summed completion log-probs of policy and reference, the desirable label, and
    the batch reference point `kl` (`kto_reference_point`, detached). With
    l = logps - ref_logps:
        desirable:   desirable_weight   * (1 - sigmoid(beta (l - kl)))
        undesirable: undesirable_weight * (1 - sigmoid(beta (kl - l)))
    TRL's loss is `losses.nanmean()` over the rows of the micro-batch; we return the sum.
    Metrics (TRL's definitions): rewards/chosen = mean of beta l over desirable rows,
    rewards/rejected over undesirable rows, logps/chosen and logps/rejected the same for
    the policy's summed log-probs, rewards/margins = rewards/chosen - rewards/rejected
    (a difference of class means, logged only when both classes occur), kl. KTO logs no
    rewards/accuracies. We return sums plus count/chosen and count/rejected;
    `finalize_metrics` forms the means."""
    label = label.to(logps.device).bool()
    lr = logps - ref_logps
    kl = kl.to(lr.device, lr.dtype)
    losses = torch.where(
        label,
        desirable_weight * (1 - torch.sigmoid(beta * (lr - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - lr))),
    )
    rewards = beta * lr.detach()
    zero = rewards.new_zeros(())
    metrics = {
        "rewards/chosen": torch.where(label, rewards, zero).sum(),
        "rewards/rejected": torch.where(label, zero, rewards).sum(),
        "logps/chosen": torch.where(label, logps.detach(), zero).sum(),
        "logps/rejected": torch.where(label, zero, logps.detach()).sum(),
        "count/chosen": label.sum().to(rewards.dtype),
        "count/rejected": (~label).sum().to(rewards.dtype),
        # Summed per row so that, like every other metric, it is divided by the row count.
        "kl": kl.detach() * label.numel(),
    }
    return losses.sum(), metrics


def finalize_metrics(sums: dict, count: int) -> dict:
    """Global-batch means from metric sums added over micro-batches and ranks: divide by
    the pair (KTO: row) count, except KTO's per-class metrics, which TRL divides by the
    number of desirable / undesirable rows, and KTO's margin, a difference of class means."""
    sums = {k: float(v) for k, v in sums.items()}
    if "count/chosen" not in sums:
        return {k: v / count for k, v in sums.items()}
    n_c, n_r = sums.pop("count/chosen"), sums.pop("count/rejected")
    out = {"kl": sums.pop("kl") / count}
    for side, n in (("chosen", n_c), ("rejected", n_r)):
        if n > 0:
            out[f"rewards/{side}"] = sums[f"rewards/{side}"] / n
            out[f"logps/{side}"] = sums[f"logps/{side}"] / n
    if n_c > 0 and n_r > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
