"""Parallel plans. A plan wraps the model and optimizer and owns backward, step and its
share of checkpoint state; the training loop is the same for all of them.

Each plan lives in its own module and registers itself in PLANS by name. Before any
process starts, `refuse` checks a method x plan combination and `refuse_resume` whether
the run directory's latest checkpoint is one this plan and method can load.
"""
from __future__ import annotations

from trainers.registry import resolve

# name -> "module:Class". Imported lazily: DeepSpeed costs seconds to import.
PLANS: dict[str, str] = {
    "none": "parallel.single:SingleDevice",
    "ddp": "parallel.ddp:DDP",
    "zero1": "parallel.deepspeed_zero:DeepSpeedZero",
    "zero2": "parallel.deepspeed_zero:DeepSpeedZero",
    "zero3": "parallel.deepspeed_zero:DeepSpeedZero",
    "zero3_offload": "parallel.deepspeed_zero:DeepSpeedZero",
    "fsdp2": "parallel.fsdp2:FSDP2",
    "pipeline": "parallel.pipeline:Pipeline",
}


def plan_class(name: str):
    return resolve(PLANS, name, "parallel")


def build_plan(cfg, env):
    return plan_class(cfg.parallel.name)(cfg, env)


def refusal(cfg, world_size: int) -> str | None:
    """Why this configuration cannot run under its plan (None if it can)."""
    return plan_class(cfg.parallel.name).refuse(cfg, world_size)


def resume_refusal(cfg) -> str | None:
    """Why the run directory's latest committed checkpoint cannot be resumed under `cfg`
    (None if there is none, or it can)."""
    from pathlib import Path

    from trainers.checkpoint import readable_trainer_state, resume_candidates

    # The checkpoint the resume will take (damaged ones are skipped there, with a warning).
    for checkpoint in resume_candidates(Path(cfg.run_dir) / "checkpoints"):
        written = readable_trainer_state(checkpoint)
        if written is not None:
            break
    else:
        return None
    reason = plan_class(cfg.parallel.name).refuse_resume(cfg, written)
    return f"Cannot resume {checkpoint}: {reason}" if reason else None
