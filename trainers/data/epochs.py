"""train.epochs as optimizer steps: from the training rows the launcher prepared (after
packing: a row is a packed bin, an example or a pair) and the global batch.

One epoch is as many rows as the training sources hold together. A single file (or an
unweighted list, however its rows are dealt) is then seen once per epoch; a weighted
mixture draws those rows at its shares, so source k is seen epochs x share_k x total /
rows_k times (an up-weighted small file more than once). Steps round up: the last step
completes the last epoch. The rows of step s depend only on (seed, s) (batches.py), so
the data position is the step number and a resume mid-epoch continues exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def rows_per_step(cfg, dp_world: int) -> int:
    """Data rows in one global batch: micro x accum x data-parallel ranks (GRPO: prompts,
    each becoming objective.num_generations completions)."""
    per_rank = int(cfg.train.micro_batch_size) * int(cfg.train.grad_accum)
    if cfg.objective.name == "grpo":
        per_rank //= int(cfg.objective.num_generations)
    return per_rank * dp_world


def dp_world_of(cfg, world: int) -> int:
    """Data-parallel ranks: the pipeline's stages share one replica."""
    return world // int(cfg.parallel.stages) if cfg.parallel.name == "pipeline" else world


@dataclass
class EpochPlan:
    epochs: float
    sources: list[tuple[str, int, float]]  # (name, rows, weight)
    per_step: int

    @property
    def rows(self) -> int:
        return sum(n for _, n, _ in self.sources)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.epochs * self.rows / self.per_step - 1e-9))

    def passes(self) -> list[tuple[str, float]]:
        """How many times each source is read over the run."""
        total_w = sum(w for _, _, w in self.sources)
        drawn = self.steps * self.per_step
        return [(name, drawn * w / total_w / n) for name, n, w in self.sources]

    def line(self) -> str:
        text = (f"train.epochs={self.epochs:g}: {self.rows:,} training rows (after packing) / global batch "
                f"{self.per_step} = {self.rows / self.per_step:.4g} steps per epoch -> train.max_steps={self.steps}")
        if len(self.sources) > 1:
            text += " (passes per source: " + ", ".join(f"{n} {p:.2f}" for n, p in self.passes()) + ")"
        return text


def epoch_plan(cfg, dp_world: int) -> EpochPlan:
    """Needs cfg.data.prepared (the launcher's token caches): rows are counted there."""
    from trainers.data.sources import open_data

    data = open_data(cfg, None)
    return EpochPlan(float(cfg.train.epochs), [(s.name, len(s), s.weight) for s in data.train],
                     rows_per_step(cfg, dp_world))
