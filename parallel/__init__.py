"""Parallel plans, in two halves.

- The spec (parallel/specs.py, no torch): what the launcher needs before any process starts.
  `refusal` checks a method x plan x world combination, `resume_refusal` whether the run
  directory's latest checkpoint is one this plan and method can load, and
  `plan_spec(name).layout(cfg, world)` says how the model state is laid out per rank (the
  memory estimate).
- The runtime plan (parallel/base.py, one module per plan): built in each worker by
  `build_plan`, it wraps the model and optimizer and owns forward-backward, step and its
  share of checkpoint state; the training loop (trainers/loop.py) receives it and is the
  same for all of them.
"""
from __future__ import annotations

from parallel.specs import SPECS as PLANS
from parallel.specs import PlanSpec
from trainers.errors import UserError

__all__ = ["PLANS", "PlanSpec", "build_plan", "plan_spec", "refusal", "resume_refusal"]


def plan_spec(name: str) -> PlanSpec:
    if name not in PLANS:
        raise UserError(f"parallel={name!r} is not known; available: {', '.join(PLANS)}.")
    return PLANS[name]


def build_plan(cfg, env):
    """This worker's runtime plan (imports torch, and DeepSpeed for the zero* plans)."""
    return plan_spec(cfg.parallel.name).runtime_class()(cfg, env)


def refusal(cfg, world_size: int) -> str | None:
    """Why this configuration cannot run under its plan (None if it can)."""
    return plan_spec(cfg.parallel.name).refuse(cfg, world_size)


def resume_refusal(cfg) -> str | None:
    """Why the run directory's latest committed checkpoint cannot be resumed under `cfg`
    (None if there is none, or it can)."""
    from pathlib import Path

    from trainers.checkpoint_files import readable_trainer_state, resume_candidates

    # The checkpoint the resume will take (damaged ones are skipped there, with a warning).
    for checkpoint in resume_candidates(Path(cfg.run_dir) / "checkpoints"):
        written = readable_trainer_state(checkpoint)
        if written is not None:
            break
    else:
        return None
    reason = plan_spec(cfg.parallel.name).refuse_resume(cfg, written)
    return f"Cannot resume {checkpoint}: {reason}" if reason else None
