"""Which rows form optimizer step s, and which of them this rank computes.

The rows of a global batch depend only on (seed, step), never on how the batch is split
into micro-batches, accumulation steps or ranks. That is what makes every parallel plan
comparable to the single-process run, and what makes resume exact: the data position is
just the step number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.data import Sequence
from trainers.errors import UserError


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    grad_accum: int
    dp_world: int

    @property
    def global_rows(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_world


class GlobalBatches:
    def __init__(self, sequences: list[Sequence], layout: BatchLayout, seed: int):
        self.sequences = sequences
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = len(sequences) // layout.global_rows
        if self.steps_per_epoch == 0:
            raise UserError(
                f"The training set has {len(sequences)} sequences but one global batch needs "
                f"{layout.global_rows} (micro_batch_size {layout.micro_batch_size} x grad_accum "
                f"{layout.grad_accum} x {layout.dp_world} data-parallel ranks). Use more data or a "
                f"smaller train.micro_batch_size / train.grad_accum."
            )

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.sequences), generator=g)

    def row_ids(self, step: int) -> list[int]:
        """Indices into the training sequences of step `step`'s global batch (0-based
        step), so a bad batch can be traced back to its data."""
        order = self._order(self.epoch_of(step))
        i = step % self.steps_per_epoch
        n = self.layout.global_rows
        return order[i * n : (i + 1) * n].tolist()

    def global_rows(self, step: int) -> list[Sequence]:
        return [self.sequences[j] for j in self.row_ids(step)]

    def micro_batches(self, step: int, dp_rank: int) -> tuple[list[list[Sequence]], int]:
        """This rank's micro-batches for `step`, and the target-token count of the whole
        global batch (every rank computes it locally: no collective needed)."""
        rows = self.global_rows(step)
        n_targets = sum(s.n_targets for s in rows)
        per_rank = self.layout.micro_batch_size * self.layout.grad_accum
        mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        mb = self.layout.micro_batch_size
        return [mine[k : k + mb] for k in range(0, per_rank, mb)], n_targets
