"""Loss spike guard (train.spike_guard): the fine-tuning checklist's "skip the bad batch",
done by the loop instead of by a person reading loss curves at 3 am.

A step whose loss or pre-clip gradient norm exceeds `factor` times the median of the last
`window` applied steps is not applied: the plan zeroes the gradients instead of stepping
the optimizer (the learning-rate schedule still advances, so the lr stays a function of
the step number and a resumed run makes the same decisions). Every skipped step is logged
with the rows of its global batch, so the data can be inspected. After `max_skips`
skipped steps in a row the model itself is suspect (PaLM's recipe for spikes: restart
from a checkpoint before the spike and skip the batches around it): the run rolls back
to the newest committed checkpoint from before the streak and continues with the batch
after the last skipped one, so the offending batches are never applied.

Non-finite losses are not the guard's business: they stop the run as before (the loop
checks them first), since skipping would hide a broken configuration.
"""
from __future__ import annotations

import os
import statistics
from collections import deque

import torch

from trainers.data.rows import IGNORE


# Testing only (fault injection for the spike guard's tests), an environment variable so
# that it is no user setting: the batches of these steps (1-based, comma-separated) get
# random target tokens. Workers inherit it (torch's elastic agent, sbatch's --export=ALL).
CORRUPT_STEPS_ENV = "LAUNCH_DEBUG_CORRUPT_STEPS"


def planted_steps() -> set[int]:
    text = os.environ.get(CORRUPT_STEPS_ENV, "").strip()
    steps = {int(s) for s in text.split(",") if s.strip()}
    if any(s < 1 for s in steps):
        raise ValueError(f"{CORRUPT_STEPS_ENV}={text!r}: step numbers start at 1")
    return steps


class SpikeGuard:
    def __init__(self, cfg):
        self.enabled = bool(cfg.enabled)
        self.factor = float(cfg.factor)
        self.window = int(cfg.window)
        self.min_history = int(cfg.min_history)
        self.max_skips = int(cfg.max_skips)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.norms: deque[float] = deque(maxlen=self.window)
        self.reason: str | None = None  # why the last step was skipped (None: applied)
        self.streak: list[int] = []  # steps skipped in a row, 1-based

    # ------------------------------------------------------------- per step
    def judge(self, step: int, loss: float):
        """The `skip` callback for plan.step(): called with the step's pre-clip gradient
        norm once the plan has computed it. Every rank gets the same global loss and norm,
        so every rank decides the same."""
        self.reason = None
        if not self.enabled:
            return None

        def skip(grad_norm: float) -> bool:
            if len(self.losses) >= self.min_history:
                loss_median, norm_median = statistics.median(self.losses), statistics.median(self.norms)
                if loss > self.factor * loss_median:
                    self.reason = f"loss {loss:.4g} > {self.factor:g} x median {loss_median:.4g}"
                elif grad_norm > self.factor * norm_median:
                    self.reason = f"grad_norm {grad_norm:.4g} > {self.factor:g} x median {norm_median:.4g}"
            if self.reason is None:
                self.losses.append(loss)
                self.norms.append(grad_norm)
                self.streak = []
            else:
                self.streak.append(step)
            return self.reason is not None

        return skip

    @property
    def needs_rollback(self) -> bool:
        return self.enabled and len(self.streak) >= self.max_skips

    def end_streak(self) -> list[int]:
        """The skipped steps of the streak being rolled back; the count starts again."""
        streak, self.streak = self.streak, []
        return streak

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Saved with each checkpoint: a resumed run judges its next steps against the
        same recent history as an uninterrupted one."""
        return {"losses": list(self.losses), "grad_norms": list(self.norms)}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.losses.extend(state["losses"])
            self.norms.extend(state["grad_norms"])


def corrupt_targets(micro_batches: list[dict], vocab_size: int, seed: int) -> list[dict]:
    """LAUNCH_DEBUG_CORRUPT_STEPS (testing only): the batch keeps its inputs but every
    target token becomes a random one, a planted bad batch with a loss spike far above
    any real batch's. Each row's random targets are drawn from its own content, so the
    planted batch is the same however the step is split over micro-batches and ranks."""
    out = []
    for batch in micro_batches:
        labels = batch["labels"].clone()
        for row in labels:
            keep = row != IGNORE
            g = torch.Generator().manual_seed(seed * 1_000_003 + hash(tuple(row[keep].tolist())) % 2**31)
            row[keep] = torch.randint(0, vocab_size, (int(keep.sum()),), generator=g)
        out.append(dict(batch, labels=labels))
    return out
