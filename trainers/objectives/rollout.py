"""The rollout phase of objective=grpo: from a step's prompt rows to scored completions.

Generation is transformers' `generate` with the KV cache on the plan's `eval_model` (the
module sharding hooks live on), prompts left-padded, stopping at EOS or after
`max_completion_length` tokens, with `synced_gpus` under several ranks so that ZeRO-3 and
FSDP2 ranks, which gather each layer's parameters inside its forward, make the same number
of forward calls (a rank that finished keeps stepping until all have): the plan's memory
bound holds, no rank gathers the whole model.

Sampling draws each completion's tokens from its own generator, seeded by (seed, step,
position of the completion in the global batch): the completions of a step do not depend
on how the batch is split over ranks and micro-batches, nor on anything a checkpoint must
carry, so a relaunch draws exactly what the uninterrupted run drew. `Sampler` does this as
a logits processor that returns a one-hot choice which greedy search then takes; the
temperature, top_k and top_p are applied as transformers' warpers apply them.

The draw is torch.multinomial's own algorithm for one sample, written out so that only the
random numbers are drawn row by row: torch takes argmax(p / q), q ~ Exp(1) from the row's
generator, for n_sample=1 (aten/src/ATen/native/Distributions.cpp); per-row multinomial
calls also ran torch's validity checks (max, min, a host sync) on every row at every token,
4x the cost of the draw (tests/test_grpo_sampler.py holds the two equal, token for token).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from trainers.data.formats import map_columns
from trainers.data.rows import IGNORE, read_rows
from trainers.objectives.merged_generation import merged_linears

_MIX = 0x9E3779B97F4A7C15


def completion_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed per (run seed, generation step, global completion index)."""
    x = (seed * 1_000_003 + step) * 1_000_003 + index
    x = (x * _MIX) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


class Sampler(LogitsProcessor):
    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k and top_k > 0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature != 1.0:  # (x / 1.0 is x: skipping it changes no bit)
            scores = scores / self.temperature
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = scores.softmax(-1)
        return torch.full_like(scores, -math.inf).scatter_(1, draw(probs, self.generators)[:, None], 0.0)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One index per row of `probs`, row i drawn with generators[i]: equal to
    torch.multinomial(probs[i], 1, generator=generators[i]) for every row."""
    q = torch.empty_like(probs)
    for row, g in zip(q, generators):
        row.exponential_(1, generator=g)
    return (probs / q).argmax(-1)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(plan, tokenizer, prompts: list[list[int]], max_new_tokens: int, per_call: int,
             seeds: list[int] | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             copies: int = 1, merged: bool = False) -> list[list[int]]:
    """Completion token ids (cut after the first EOS, which they keep, as TRL does) of each
    prompt, `copies` completions per prompt (a GRPO group: rows i*copies..(i+1)*copies-1 are
    prompt i's), `per_call` completions per generate call; `seeds` (one per completion)
    None: greedy; `merged`: through merged LoRA weights where the plan allows
    (trainers/objectives/merged_generation.py). Every rank must call this with the same
    number of prompts."""
    model, device = plan.eval_model, plan.env.device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    step = max(per_call // copies, 1)
    try:
        with merged_linears(model, merged):
            for s in range(0, len(prompts), step):
                ids, mask = left_padded(prompts[s:s + step], tokenizer.pad_token_id)
                processors = LogitsProcessorList()
                if seeds is not None:
                    processors.append(Sampler(seeds[s * copies:(s + step) * copies], temperature, top_k, top_p, device))
                ids, mask = ids.to(device), mask.to(device)
                with plan.autocast():
                    cache = shared_prefix(model, ids, mask, copies)
                    ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
                    seq = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                         max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                         synced_gpus=plan.dp_world > 1 and dist.is_initialized())
                for row in seq[:, ids.size(1):].tolist():
                    cut = row.index(eos) + 1 if eos in row else len(row)
                    out.append(row[:cut])
    finally:
        model.train(was_training)
    return out


def shared_prefix(model, ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of every prompt token but the last, computed once per prompt and repeated
    for its `copies` rows (None: nothing to share). `generate` resumes from it and runs the
    last prompt token itself, for all rows: a group's prompt is prefilled once instead of
    num_generations times (vLLM's prefix caching does this for TRL's GPU users), which at
    8 generations was a quarter of the generate call here (docs/grpo.md). Positions are
    generate's own (cumsum of the mask - 1, 0 on padding), so the cache is the one generate
    would have built, row for row."""
    if copies == 1 or ids.size(1) < 2:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(copies)
    return cache


def training_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, eos_id: int,
                  mask_truncated: bool) -> dict:
    """TRL's layout: prompts left-padded, completions right-padded, one attention mask; the
    labels are the completion tokens at the positions that predict them (IGNORE elsewhere
    and, with mask_truncated_completions, on every token of a completion without EOS)."""
    p_ids, p_mask = left_padded(prompts, pad_id)
    width = max(max(len(c) for c in completions), 1)
    c_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    c_mask = torch.zeros_like(c_ids)
    for i, c in enumerate(completions):
        c_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        truncated = not c or c[-1] != eos_id
        if not (mask_truncated and truncated):
            c_mask[i, :len(c)] = 1
    ids = torch.cat([p_ids, c_ids], 1)
    attention = torch.cat([p_mask, c_mask], 1)
    labels = torch.full_like(ids, IGNORE)
    P = p_ids.size(1)
    labels[:, P - 1:P - 1 + width] = c_ids.masked_fill(c_mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def micro_batches(batch: dict, size: int) -> list[dict]:
    """The rank's rows as micro-batches of `size` rows, rows of like extent together, each
    micro-batch cut to the columns its rows use. A step's loss is a sum over tokens (or
    sequences) divided by a count over the global batch, so which micro-batch a row trains
    in changes no term, only the padding the forward and backward compute: completions of
    8 generations range from a few tokens to max_completion_length, and TRL's layout pads
    every row to the longest of the batch (a third of the trained positions here)."""
    mask = batch["attention_mask"]
    width = mask.size(1)
    end = width - mask.flip(1).int().argmax(1)  # one past each row's last attended column
    order = torch.argsort(end, stable=True)
    out = []
    for i in range(0, mask.size(0), size):
        rows = order[i:i + size]
        b = {k: v.index_select(0, rows) for k, v in batch.items()}
        used = b["attention_mask"].any(0).nonzero().squeeze(1)
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, width)
        out.append({k: v[:, lo:hi] if v.dim() == 2 and v.size(1) == width else v for k, v in b.items()})
    return out


def raw_rows(items: list[tuple[str, int]], columns=None) -> list[dict]:
    """The data rows (path, row number) as decoded from their files (the rewards' columns),
    renamed by data.columns as the prompts were."""
    by_path: dict[str, set[int]] = {}
    for path, n in items:
        by_path.setdefault(path, set()).add(n)
    found = {(path, n): map_columns(row, columns) for path, numbers in by_path.items()
             for n, row in read_rows(path, numbers)}
    return [found[i] for i in items]


def gather_rows(local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """[world * n, ...] with every rank's [n, ...] rows in rank order (equal n on every
    rank), NaN kept: one all-reduce of a zero-filled global tensor."""
    if world == 1 or not dist.is_initialized():
        return local.clone()
    full = torch.zeros((world * local.size(0), *local.shape[1:]), dtype=local.dtype, device=local.device)
    full[rank * local.size(0):(rank + 1) * local.size(0)] = local
    dist.all_reduce(full)
    return full


def prompt_items(micro: list[dict]) -> list[dict]:
    return [item for batch in micro for item in batch["prompts"]]


def prompt_arrays(items: list[dict]) -> list[list[int]]:
    return [np.asarray(it["ids"]).tolist() for it in items]
