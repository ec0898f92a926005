"""A launch into a run dir that has a committed checkpoint resumes it: compare the run's
saved config (RUN_DIR/config.yaml, written by the launch that trained it) with the new one.

A change that makes the checkpoint unloadable is refused before anything starts: the
checkpoint holds tensors of the shapes the old settings gave (a LoRA rank, the targeted
modules, the base model's architecture, the method's parameters), and loading them into other shapes
fails deep inside torch's checkpoint planner. Plan changes are judged by the plan's spec
(parallel/specs.py refuse_resume, checked in launch/validate.py): DCP checkpoints reshard
between none, ddp and fsdp2 and any world size, DeepSpeed's keep their stage.

Every other change (learning rate, max_steps, data, batch split, world size, ...) is
accepted, and printed as one line: a resume never changes settings silently.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainers.checkpoint_files import resume_candidates
from trainers.errors import UserError

log = logging.getLogger("launch")

# Keys (or key prefixes) whose change alters which tensors the checkpoint holds or their shapes.
SHAPE_KEYS = (
    "method.name", "method.peft", "method.quantize", "method.r", "method.target_modules",
    "method.use_dora", "method.num_virtual_tokens", "method.feedforward_modules",
)
# Another base model: refused when its architecture (launch/estimate.py arch_of: model.arch or a
# local config.json) differs; the same architecture elsewhere (a moved or edited copy) resumes.
MODEL_KEYS = ("model.path", "model.name", "model.arch")
# Not settings of the training: where this launch runs and what the launcher prepared.
IGNORED = ("run_dir", "run_name", "dry_run", "data.prepared")


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def changes(old: DictConfig, new: DictConfig) -> dict[str, tuple]:
    """dotted key -> (old value, new value) for every setting that differs."""
    a = flatten(OmegaConf.to_container(old, resolve=True))
    b = flatten(OmegaConf.to_container(new, resolve=True))
    unset = "(unset)"
    return {k: (a.get(k, unset), b.get(k, unset)) for k in sorted(set(a) | set(b))
            if not _matches(k, IGNORED) and a.get(k, unset) != b.get(k, unset)}


def _show(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())


def _arch(model_cfg):
    """The model's shapes, or None where they cannot be read without loading it (a hub id)."""
    from launch.estimate import arch_of

    try:
        return arch_of(model_cfg)
    except (KeyError, ValueError, TypeError, OSError):
        return None


def _arch_text(arch) -> str:
    return (f"(hidden {arch.hidden}, {arch.layers} layers, {arch.heads}/{arch.kv_heads} heads, "
            f"intermediate {arch.intermediate}, vocab {arch.vocab})")


def check_relaunch(cfg: DictConfig) -> dict[str, tuple]:
    """Refuse (UserError) a relaunch whose changes the checkpoint cannot load; log the
    accepted ones. Returns the accepted changes (empty for a new run dir)."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    checkpoints = resume_candidates(run_dir / "checkpoints")
    if not checkpoints or not saved.is_file():
        return {}
    old = OmegaConf.load(saved)
    changed = changes(old, cfg)
    if cfg.train.epochs is not None:  # derived from the data after these checks (launch/optim_checks.py)
        changed.pop("train.max_steps", None)
    refused = {k: v for k, v in changed.items() if _matches(k, SHAPE_KEYS)}
    if any(_matches(k, MODEL_KEYS) for k in changed):
        before, after = _arch(old.model), _arch(cfg.model)
        if before is not None and after is not None and before != after:
            refused.update({k: v for k, v in changed.items() if _matches(k, MODEL_KEYS)})
            refused["model architecture"] = (_arch_text(before), _arch_text(after))
    if refused:
        raise UserError(
            f"hydra.run.dir={run_dir} holds a run with a committed checkpoint ({checkpoints[0].name}), and "
            f"this launch would resume it with settings that change the trained tensors' shapes or which "
            f"tensors are trained, so the checkpoint cannot be loaded: {_show(refused)}. Relaunch with the "
            f"run's values (in {saved}) to resume it, or start a fresh run in another directory "
            f"(hydra.run.dir=NEW_DIR, or leave hydra.run.dir unset for a new timestamped one)."
        )
    if changed:
        log.info("relaunch: resuming %s from %s with changed settings: %s", run_dir, checkpoints[0].name,
                 _show(changed))
    return changed
