"""The reference model's log-probs for method=full, computed once before training.

Why precompute. DPO, IPO and KTO compare the policy with the model it started from. With
a PEFT method that model is the policy with its adapter disabled, so it costs nothing to
keep. With full fine-tuning every weight moves, and keeping the start would mean a second
model in memory (TRL loads one). Instead, before the first step (and before a resume
loads a checkpoint, so the weights are still the initial ones), every example's summed
completion log-prob is computed under no_grad, sharded over the data-parallel ranks, and
kept as one float per example: in the run directory (`reference/<cache entry>.npy`, so
a relaunch does not recompute it) and in memory on each rank (`Source.reference`), from
where `collate_preference` puts it into each batch as `ref_logps`.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainers.batches import Source, collate_sequences
from trainers.distributed import all_reduce_sum
from trainers.objectives import forward_inputs
from trainers.preference import sequence_logps

log = logging.getLogger("train")


def _path(run_dir: Path, source: Source) -> Path:
    return Path(run_dir) / "reference" / f"{source.store.folder.name}.npy"


@torch.no_grad()
def compute(plan, source: Source, sequences_per_batch: int, pad_id: int) -> np.ndarray:
    """Summed completion log-probs of every example of `source` under the current
    weights; every rank computes an equal share (sharded plans need equal forwards)."""
    n = len(source.store)
    world, rank = plan.dp_world, plan.dp_rank
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    padded = mine + [0] * (per - len(mine))
    values = torch.zeros(n, dtype=torch.float64)
    model = plan.eval_model
    was_training = model.training
    model.eval()
    try:
        for s in range(0, per, sequences_per_batch):
            idx = padded[s : s + sequences_per_batch]
            batch = collate_sequences([source.store.example(e) for e in idx], pad_id, packed=False)
            with plan.autocast():
                logits = model(**forward_inputs(batch, plan.env.device), use_cache=False).logits
                logps = sequence_logps(logits, batch["labels"].to(plan.env.device), batch["segments"])[0]
            real = len([e for e in mine[s : s + sequences_per_batch]])
            values[idx[:real]] = logps[:real].double().cpu()
    finally:
        model.train(was_training)
    if dist.is_initialized() and world > 1:
        values = values.to(plan.env.device)
        dist.all_reduce(values)
        values = values.cpu()
    return values.numpy().astype(np.float32)


def precompute_reference(plan, sources: list[Source], run_dir: Path, micro_batch_size: int, pad_id: int) -> None:
    """Set `source.reference` for every source, from the run directory if an earlier
    launch of this run computed it (all ranks must agree, so they vote), else computed now."""
    for source in sources:
        path = _path(run_dir, source)
        have = path.exists() and len(np.load(path, mmap_mode="r")) == len(source.store)
        if all_reduce_sum([float(have)], plan.env.device)[0] == plan.env.world_size:
            source.reference = np.load(path)
            continue
        values = compute(plan, source, micro_batch_size * source.per_row, pad_id)
        if plan.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, values)
            tmp.replace(path)
            log.info("reference: log-probs of %d sequences of %s computed once (method=full: no second model)",
                     len(values), source.name)
        source.reference = values
