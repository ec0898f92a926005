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

KTO also needs the reference on its mismatched pairs (row i's prompt with row i-1's
completion, rotated within each global batch), whose policy-minus-reference log-ratio
estimates the KL reference point. Those pairs change every step, but the rows of step s
are a function of (seed, s) alone (trainers/data/batches.py), so the pairs of every step of the
run are known before the first one: `precompute_kl_reference` lists them for steps
[0, train.max_steps), computes each distinct pair once (same sharding, no gradient) and
keeps one float per (step, batch position) (`GlobalBatches.kl_reference`, put into each
`kl_batch` as `ref_logps`), plus one per row of each held-out set (its fixed rotation).
The cost is one no-grad forward per KL sequence the run will see, a forward without
backward for each training row, about a third of a step's compute over the run: TRL's
full KTO instead keeps a second model in memory (or precomputes per dataset row, with
KL pairs fixed once for the dataset). The file is named by a hash of the pairs and the
data's cache entries, so a relaunch with the same run reuses it and one whose pairs differ
(another seed, batch size, data, a longer max_steps) recomputes it, from the initial
weights in every case (before a resume loads its checkpoint).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainers.data.batches import GlobalBatches, Source, collate_sequences, heldout_partners, mismatched_sequences
from trainers.distributed import all_reduce_sum
from trainers.files import atomic_write
from trainers.objectives.catalog import forward_inputs
from trainers.objectives.preference import sequence_logps

log = logging.getLogger("train")


def _path(run_dir: Path, source: Source) -> Path:
    return Path(run_dir) / "reference" / f"{source.store.folder.name}.npy"


@torch.no_grad()
def sharded_logps(plan, n: int, batch_of, per_batch: int) -> np.ndarray:
    """Summed completion log-probs of sequences 0..n-1 under the current weights, no
    gradient; `batch_of(indices)` collates some of them. Every rank computes an equal share
    (sharded plans need equal forwards; a short last share repeats sequence 0) and one
    all-reduce gives every rank all n values."""
    world, rank = plan.dp_world, plan.dp_rank
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    padded = mine + [0] * (per - len(mine))
    values = torch.zeros(n, dtype=torch.float64)
    model = plan.eval_model
    was_training = model.training
    model.eval()
    try:
        for s in range(0, per, per_batch):
            idx = padded[s : s + per_batch]
            batch = batch_of(idx)
            with plan.autocast():
                logits = model(**forward_inputs(batch, plan.env.device), use_cache=False).logits
                logps = sequence_logps(logits, batch["labels"].to(plan.env.device), batch["segments"])[0]
            real = len(mine[s : s + per_batch])
            values[idx[:real]] = logps[:real].double().cpu()
    finally:
        model.train(was_training)
    if dist.is_initialized() and world > 1:
        values = values.to(plan.env.device)
        dist.all_reduce(values)
        values = values.cpu()
    return values.numpy().astype(np.float32)


def compute(plan, source: Source, sequences_per_batch: int, pad_id: int) -> np.ndarray:
    """Summed completion log-probs of every example of `source` under the current weights."""
    return sharded_logps(
        plan, len(source.store),
        lambda idx: collate_sequences([source.store.example(e) for e in idx], pad_id, packed=False),
        sequences_per_batch)


def compute_mismatched(plan, sources: list[Source], pairs: np.ndarray, sequences_per_batch: int, pad_id: int,
                       max_len: int | None) -> np.ndarray:
    """Reference log-probs of KTO's mismatched sequences, one per row of `pairs`
    ((source, row, partner source, partner row)); each distinct pair is computed once."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float32)
    distinct, inverse = np.unique(pairs, axis=0, return_inverse=True)

    def batch_of(idx):
        chosen = distinct[idx]
        seqs = mismatched_sequences(sources, [(int(k), int(r)) for k, r in chosen[:, :2]],
                                    [(int(k), int(r)) for k, r in chosen[:, 2:]], max_len)
        return collate_sequences(seqs, pad_id, packed=False)

    return sharded_logps(plan, len(distinct), batch_of, sequences_per_batch)[inverse.reshape(-1)]


def _save(plan, path: Path, values: np.ndarray) -> None:
    if plan.env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, values)
        atomic_write(path, buffer.getvalue())


def _stored(plan, path: Path, n: int) -> np.ndarray | None:
    """The values at `path` if every rank finds them with length n (all ranks must agree
    whether to compute, since computing is collective), else None."""
    have = path.exists() and len(np.load(path, mmap_mode="r")) == n
    if all_reduce_sum([float(have)], plan.env.device)[0] == plan.env.world_size:
        return np.load(path)
    return None


def precompute_reference(plan, sources: list[Source], run_dir: Path, micro_batch_size: int, pad_id: int) -> None:
    """Set `source.reference` for every source, from the run directory if an earlier
    launch of this run computed it, else computed now."""
    for source in sources:
        path = _path(run_dir, source)
        values = _stored(plan, path, len(source.store))
        if values is None:
            values = compute(plan, source, micro_batch_size * source.per_row, pad_id)
            _save(plan, path, values)
            if plan.env.is_main:
                log.info("reference: log-probs of %d sequences of %s computed once (method=full: no second model)",
                         len(values), source.name)
        source.reference = values


def training_kl_pairs(batches: GlobalBatches, steps: int) -> np.ndarray:
    """(steps * rows_per_step, 4) int64: (source, row, partner source, partner row) of every
    KTO mismatched pair of steps [0, steps), in step and batch order."""
    n = batches.layout.rows_per_step
    pairs = np.empty((steps, n, 4), dtype=np.int64)
    for step in range(steps):  # one step's tuples at a time: a long run lists millions of pairs
        pairs[step] = np.asarray(batches.kl_pairs(step), dtype=np.int64).reshape(n, 4)
    return pairs.reshape(-1, 4)


def _fingerprint(pairs: np.ndarray, sources: list[Source], max_len) -> str:
    h = hashlib.sha256(np.ascontiguousarray(pairs, dtype=np.int64).tobytes())
    h.update(repr(([s.store.folder.name for s in sources], max_len)).encode())
    return h.hexdigest()[:16]


def precompute_kl_reference(plan, batches: GlobalBatches, eval_sources: list[Source], run_dir: Path, steps: int,
                            micro_batch_size: int, pad_id: int, eval_max_len: int | None) -> None:
    """KTO with method=full: the reference log-probs of the mismatched pair of every row of
    every training step (`batches.kl_reference`, shape (steps, rows_per_step)) and of every
    held-out row (`source.kl_reference`), from the run directory or computed now."""
    pairs = training_kl_pairs(batches, steps)
    path = Path(run_dir) / "reference" / f"kl-{_fingerprint(pairs, batches.sources, batches.max_len)}.npy"
    values = _stored(plan, path, len(pairs))
    if values is None:
        values = compute_mismatched(plan, batches.sources, pairs, micro_batch_size, pad_id, batches.max_len)
        _save(plan, path, values)
        if plan.env.is_main:
            log.info("reference: log-probs of KTO's mismatched pairs of %d steps x %d rows computed once",
                     steps, batches.layout.rows_per_step)
    batches.kl_reference = values.reshape(steps, batches.layout.rows_per_step)
    for source in eval_sources:
        pairs = _heldout_pairs(len(source))
        path = _path(run_dir, source).with_name(
            f"{source.store.folder.name}.kl-{_fingerprint(pairs, [source], eval_max_len)}.npy")
        values = _stored(plan, path, len(pairs))
        if values is None:
            values = compute_mismatched(plan, [source], pairs, micro_batch_size, pad_id, eval_max_len)
            _save(plan, path, values)
        source.kl_reference = values


def _heldout_pairs(n: int) -> np.ndarray:
    """A held-out KTO set's mismatched pairs: each row with its fixed rotated partner."""
    rows = np.arange(n)
    return np.stack([np.zeros(n), rows, np.zeros(n), heldout_partners(rows, n)], axis=1).astype(np.int64)


def heldout_reference(plan, sources: list[Source], micro_batch_size: int, pad_id: int, kto: bool,
                      max_len: int | None) -> None:
    """Set the held-out sets' reference log-probs (and KTO's mismatched ones) from the model
    `plan` runs, computed now and kept in memory only: how a merge scores plain model
    folders of a dpo/ipo/kto run against that run's reference, its model.path
    (launch/merging/scoring.py), as the run's own evaluation did."""
    for source in sources:
        source.reference = compute(plan, source, micro_batch_size * source.per_row, pad_id)
        if kto:
            source.kl_reference = compute_mismatched(plan, [source], _heldout_pairs(len(source)), micro_batch_size,
                                                     pad_id, max_len)
