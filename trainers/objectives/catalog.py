"""Objectives: what the one training loop minimises.

An objective's loss is a function (model, micro-batch, device) -> (loss SUM, {metric: SUM})
and the objective says what the sum is divided by (`unit`): the target tokens of the
global batch for SFT, its rows for the preference objectives (a row is a pair for
dpo/ipo/simpo/orpo, one example for kto). Returning sums, never means, lets the loop
divide by the count of the whole global batch, so a step's loss and metrics are the same
however the batch is split over micro-batches, accumulation steps and ranks.

Some objectives need a quantity of the whole global batch before any micro-batch's loss
(ORPO's NLL token count, KTO's KL reference point): `prepare` computes it from this rank's
micro-batches with one all-reduce and stores it in each micro-batch.

The reference model is never a second copy: with a PEFT method it is the same model with
the adapter disabled (peft's `disable_adapter()`), run in the same forward schedule under
no_grad; with method=full its log-probs were computed once before training
(trainers/objectives/reference.py) and arrive in the batch as `ref_logps`.

Definitions are TRL 1.16's (trainers/objectives/preference.py), so a recipe moves between the two.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from trainers.objectives import preference as P
from trainers.objectives.lm_loss import lm_ce_sum
from trainers.objectives.settings import NEEDS_REFERENCE, OBJECTIVE_ROWS, check_objective_name, knobs_of

def forward_inputs(batch: dict, device: torch.device) -> dict:
    keys = ("input_ids", "position_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}


@dataclass(frozen=True)
class Objective:
    name: str
    unit: str  # "targets" | "rows": what the loss sum (and metric sums) are divided by
    loss: Callable  # (model, batch, device) -> (loss sum tensor, {metric: sum tensor})
    prepare: Callable | None = None  # (model, micro_batches, device) -> None
    knobs: dict = field(default_factory=dict)

    @property
    def rows(self) -> str:
        return OBJECTIVE_ROWS[self.name]

    @property
    def reference(self) -> bool:
        return self.name in NEEDS_REFERENCE

    @property
    def head(self) -> str:
        """The model head it trains (trainers.model.load.HEADS): a reward model scores
        sequences (trainers/objectives/reward_model.py); every other objective is a causal LM."""
        return "score" if self.name == "reward" else "lm"

    @property
    def generates(self) -> bool:
        """Whether evaluation generates text (exact match): not a reward model."""
        return self.head == "lm"

    def __call__(self, model, batch: dict, device: torch.device):
        return self.loss(model, batch, device)

    def finalize(self, sums: dict, count: float) -> dict:
        """Global means of the metric sums (TRL's names)."""
        return P.finalize_metrics(sums, count) if sums else {}


# ----------------------------------------------------------------------------- SFT
def sft(model: torch.nn.Module, batch: dict, device: torch.device):
    # use_cache=False also matters for packing: transformers only builds the per-row
    # (block-diagonal) mask from position_ids when no KV cache is passed. lm_ce_sum
    # cuts off prompt tuning's virtual tokens and chunks the loss when it is large.
    inputs = forward_inputs(batch, device)
    return lm_ce_sum(lambda: model(**inputs, use_cache=False).logits, batch["labels"].to(device)), {}


# ---------------------------------------------------------------- the reference model
def peft_model(model: torch.nn.Module):
    """The PEFT model inside a plan's wrappers (DDP and DeepSpeed keep it as `.module`;
    FSDP2 shards it in place), or None."""
    seen = model
    while seen is not None:
        if hasattr(seen, "disable_adapter") and hasattr(seen, "peft_config"):
            return seen
        seen = getattr(seen, "module", None)
    return None


_TUNER_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def adapter_disabled(model: torch.nn.Module):
    """The reference model: `model` with its adapter switched off for the duration.

    For adapters that live in tuner layers (LoRA and its variants, IA3) this flips each
    layer's `_disable_adapters` flag, the one their forward reads, from a list built once
    per model: peft's `disable_adapter()` does the same but also walks every module and
    builds a status report on each call (measured: 0.1 s per call on the bundled tiny
    model, a tenth of a DPO step). Prompt-learning methods go through peft's context."""
    peft = peft_model(model)
    if peft is None:
        raise RuntimeError("no reference log-probs in the batch and no adapter to disable: with method=full the "
                           "loop precomputes them (trainers/objectives/reference.py)")
    if peft.peft_config[peft.active_adapter].is_prompt_learning:
        return peft.disable_adapter()
    if peft not in _TUNER_LAYERS:
        _TUNER_LAYERS[peft] = [m for m in peft.modules() if hasattr(m, "_disable_adapters")]
    return _flags_set(_TUNER_LAYERS[peft])


@contextlib.contextmanager
def _flags_set(layers: list):
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def reference_logps(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed completion log-probs of every sequence of `batch` under the reference model:
    precomputed (method=full), or the model with its adapter disabled, without gradient."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(device)
    with torch.no_grad(), adapter_disabled(model):
        logits = model(**forward_inputs(batch, device), use_cache=False).logits
        return P.sequence_logps(logits, batch["labels"].to(device), batch["segments"])[0]


def all_targets(batch: dict, device: torch.device) -> torch.Tensor:
    """Every next token of each sequence as a target (ORPO's NLL covers the prompt too):
    the next position's token where it belongs to the same sequence."""
    ids, seg = batch["input_ids"].to(device), batch["segments"].to(device)
    labels = torch.full_like(ids, P.IGNORE)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    labels[:, :-1] = ids[:, 1:].masked_fill(~same, P.IGNORE)
    return labels


# --------------------------------------------------------------------------- pairs
def pair_objective(name: str, knobs: dict) -> Objective:
    beta = float(knobs["beta"])
    rpo_alpha = float(knobs["rpo_alpha"]) if name == "dpo" else 0.0  # conf/objective/dpo.yaml

    def loss(model, batch: dict, device: torch.device):
        labels, segments = batch["labels"].to(device), batch["segments"]
        keep = batch["keep"].to(device)
        ref = reference_logps(model, batch, device) if name in NEEDS_REFERENCE else None
        logits = model(**forward_inputs(batch, device), use_cache=False).logits
        if name == "orpo":
            per_token = P.token_logps(logits, all_targets(batch, device))
            logps, n = P.masked_sums(per_token, labels != P.IGNORE, segments)
        else:
            logps, n = P.sequence_logps(logits, labels, segments)

        half = keep.numel()  # sequences are [chosen...; rejected...] (collate_preference)

        def pairs(x):
            return x[:half][keep], x[half:][keep]

        (lc, lr), (nc, nr) = pairs(logps), pairs(n.to(logps.dtype))
        if name in ("dpo", "ipo"):
            rc, rr = pairs(ref)
            loss, metrics = P.dpo_loss(lc, lr, rc, rr, nc, nr, beta=beta,
                                       loss_type="ipo" if name == "ipo" else knobs["loss_type"],
                                       label_smoothing=float(knobs["label_smoothing"]) if name == "dpo" else 0.0)
            if rpo_alpha:
                loss, metrics["nll_loss"] = P.rpo_nll(loss, lc, batch["nll_tokens_per_pair"], rpo_alpha)
        elif name == "simpo":
            loss, metrics = P.simpo_loss(lc, nc, lr, nr, beta=beta, gamma=float(knobs["gamma"]))
        else:
            nll = -P.per_sequence(per_token, segments)[:half][keep]
            loss, metrics = P.orpo_loss(lc, nc, lr, nr, nll, nll_tokens_per_pair=batch["nll_tokens_per_pair"],
                                        beta=beta)
        # Not a TRL metric: the fraction of pairs whose chosen answer the model itself finds
        # more likely (summed log-probs). rewards/accuracies is 0 before the first update for
        # DPO (every reward is 0); this says how well the starting model already prefers.
        metrics["logps/accuracies"] = (lc.detach() > lr.detach()).float().sum()
        return loss, metrics

    prepare = orpo_prepare if name == "orpo" else rpo_prepare if rpo_alpha else None
    return Objective(name, "rows", loss, prepare, knobs)


def orpo_prepare(model, micro_batches: list[dict], device: torch.device) -> None:
    """ORPO's NLL is a token mean over the chosen sequences of the global batch: count
    their targets (every position but the last) over all ranks."""
    _chosen_tokens_per_pair(micro_batches, device, lambda b: b["seq_lengths"][: b["keep"].numel()] - 1)


def rpo_prepare(model, micro_batches: list[dict], device: torch.device) -> None:
    """DPO's `rpo_alpha` NLL is a token mean over the chosen completions of the global
    batch: count their targets over all ranks."""
    def completion_targets(b):
        per_seq = P.per_sequence((b["labels"] != P.IGNORE).long(), b["segments"])
        return per_seq[: b["keep"].numel()]

    _chosen_tokens_per_pair(micro_batches, device, completion_targets)


def _chosen_tokens_per_pair(micro_batches: list[dict], device: torch.device, chosen_targets) -> None:
    from trainers.distributed import all_reduce_sum

    tokens = pairs = 0.0
    for b in micro_batches:
        tokens += float(chosen_targets(b)[b["keep"]].sum())
        pairs += float(b["keep"].sum())
    tokens, pairs = all_reduce_sum([tokens, pairs], device)
    for b in micro_batches:
        b["nll_tokens_per_pair"] = tokens / max(pairs, 1.0)


# ----------------------------------------------------------------------------- KTO
def kto_objective(knobs: dict) -> Objective:
    beta = float(knobs["beta"])
    weights = dict(desirable_weight=float(knobs["desirable_weight"]),
                   undesirable_weight=float(knobs["undesirable_weight"]))

    def loss(model, batch: dict, device: torch.device):
        keep = batch["keep"].to(device)
        ref = reference_logps(model, batch, device)
        logits = model(**forward_inputs(batch, device), use_cache=False).logits
        logps = P.sequence_logps(logits, batch["labels"].to(device), batch["segments"])[0]
        return P.kto_loss(logps[keep], ref[keep], batch["desirable"].to(device)[keep], batch["kl"], beta=beta,
                          **weights)

    return Objective("kto", "rows", loss, kto_prepare, knobs)


def kto_prepare(model, micro_batches: list[dict], device: torch.device) -> None:
    """KTO's reference point z0 from the mismatched pairs of the whole global batch:
    policy minus reference summed completion log-probs, no gradient (TRL's
    `_compute_kl_logps`), summed over every rank's rows, then clamped at 0."""
    from trainers.distributed import all_reduce_sum

    total = rows = 0.0
    with torch.no_grad():
        for b in micro_batches:
            kl = b["kl_batch"]
            labels = kl["labels"].to(device)
            logits = model(**forward_inputs(kl, device), use_cache=False).logits
            policy = P.sequence_logps(logits, labels, kl["segments"])[0]
            ratio = policy - reference_logps(model, kl, device)
            total += float(ratio[kl["keep"].to(device)].sum())
            rows += float(kl["keep"].sum())
    total, rows = all_reduce_sum([total, rows], device)
    z0 = P.kto_reference_point(total, max(rows, 1.0))
    for b in micro_batches:
        b["kl"] = z0


# ------------------------------------------------------------------------ registry
def get_objective(cfg) -> Objective:
    """`cfg` is the objective config (conf/objective/*.yaml) or just a name (defaults)."""
    knobs = {"name": cfg} if isinstance(cfg, str) else knobs_of(cfg)
    name = knobs["name"]
    check_objective_name(name)
    if name == "sft":
        return Objective("sft", "targets", sft, None, knobs)
    if name == "kto":
        return kto_objective(knobs)
    if name == "reward":
        from trainers.objectives.reward_model import reward_objective

        return reward_objective(knobs)
    if name == "grpo":  # on-policy: generates its batches (trainers/objectives/grpo.py)
        from trainers.objectives.grpo import GRPO

        return GRPO(knobs)
    return pair_objective(name, knobs)
