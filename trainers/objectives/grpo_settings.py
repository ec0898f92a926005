"""GRPO's settings checked before launch, without torch: its knobs (TRL 1.16 GRPOConfig's
names and ranges), what it asks of the other groups, and the reward entries (each function
imported, each reward model folder present), so a bad reward is refused before any process
starts. trainers/objectives/grpo.py and reward.py use them at run time."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Callable

from trainers.errors import UserError

SPEC_HELP = ("objective.rewards is a list of {fn: 'package.module:function', weight: 1.0} or {model: PATH, "
             "weight: 1.0} entries, e.g. "
             "objective.rewards='[{fn: trainers.objectives.reverse_rewards:partial_credit}]'")



def reward_entries(specs) -> list[dict]:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(specs, (DictConfig, ListConfig)):
        specs = OmegaConf.to_container(specs, resolve=True)
    if not isinstance(specs, list) or not specs:
        raise UserError(f"objective.rewards={specs!r} is not accepted: GRPO needs at least one reward. {SPEC_HELP}.")
    out = []
    for e in specs:
        if isinstance(e, str):
            e = {"fn": e}
        if not isinstance(e, dict) or len({"fn", "model"} & set(e)) != 1 or set(e) - {"fn", "model", "weight"}:
            raise UserError(f"objective.rewards entry {e!r} is not accepted. {SPEC_HELP}.")
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UserError(f"objective.rewards entry {e!r} has weight {w!r}; a weight is a number.")
        out.append(e)
    return out


def import_function(spec: str) -> Callable:
    """'package.module:function' -> the function (the working directory is importable, as
    for `python -m`); a clear UserError otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UserError(f"objective.rewards fn {spec!r} is not accepted: write 'package.module:function'.")
    module_name, attr = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module itself failing
        raise UserError(f"objective.rewards fn {spec!r}: module {module_name!r} cannot be imported "
                        f"({type(e).__name__}: {e}). Put it on PYTHONPATH (or in the working directory).") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"objective.rewards fn {spec!r}: {module_name!r} has no function {attr!r}.")
    return fn


def reward_names(specs) -> list[str]:
    """TRL's names: a function's __name__, a model's folder name."""
    names = []
    for e in reward_entries(specs):
        names.append(e["fn"].split(":")[-1] if "fn" in e else Path(str(e["model"])).name)
    return names


def check_reward_specs(specs, weights=None) -> None:
    """Before launch: every function imports, every model folder exists, weights fit."""
    entries = reward_entries(specs)
    for e in entries:
        if "fn" in e:
            import_function(e["fn"])
        elif not (Path(str(e["model"])) / "config.json").exists():
            raise UserError(f"objective.rewards model {e['model']!r} is not a folder with a config.json: give the "
                            f"path of a sequence classifier with one label (e.g. an objective=reward run's "
                            f"export/merged).")
    if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != len(entries)
                                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise UserError(f"objective.reward_weights={weights!r} must be null or one number per reward "
                        f"({len(entries)}: {', '.join(reward_names(specs))}).")


LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


# --------------------------------------------------------------------------- checks
def check_knobs(k: dict) -> None:
    """The objective's own settings (one paragraph per bad value)."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise UserError(f"objective.{key}={k.get(key)!r} is not accepted: {what} (objective=grpo).")

    def num(key):
        v = k.get(key)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(key):
        v = k.get(key)
        return isinstance(v, int) and not isinstance(v, bool)

    need(integer("num_generations") and k["num_generations"] >= 2, "num_generations",
         "completions per prompt, an integer of 2 or more (advantages compare a prompt's completions)")
    need(integer("max_completion_length") and k["max_completion_length"] >= 1, "max_completion_length",
         "a positive number of tokens")
    need(num("temperature") and k["temperature"] > 0, "temperature", "a number above 0")
    need(num("top_p") and 0 < k["top_p"] <= 1, "top_p", "a number in (0, 1]")
    need(integer("top_k") and k["top_k"] >= 0, "top_k", "an integer, 0 (off) or more")
    need(num("beta") and k["beta"] >= 0, "beta", "a number, 0 (no reference pass, TRL's default) or more")
    need(num("epsilon") and k["epsilon"] > 0, "epsilon", "a positive clipping range, e.g. 0.2")
    need(k["epsilon_high"] is None or (num("epsilon_high") and k["epsilon_high"] > 0), "epsilon_high",
         "null (= epsilon) or a positive number, e.g. 0.28")
    need(k["loss_type"] in LOSS_TYPES, "loss_type", f"use one of {', '.join(LOSS_TYPES)}")
    need(k["scale_rewards"] in SCALE_REWARDS, "scale_rewards", f"use one of {', '.join(SCALE_REWARDS)}")
    need(integer("num_iterations") and k["num_iterations"] >= 1, "num_iterations",
         "a positive integer (optimizer steps per generation)")
    need(k["importance_sampling_level"] in IS_LEVELS, "importance_sampling_level",
         f"use one of {', '.join(IS_LEVELS)}")
    need(isinstance(k["mask_truncated_completions"], bool), "mask_truncated_completions", "true or false")
    need(isinstance(k["merged_generation"], bool), "merged_generation", "true or false")
    need(isinstance(k["use_bias_correction_kl"], bool), "use_bias_correction_kl", "true or false")
    check_reward_specs(k["rewards"], k["reward_weights"])


def check_run(cfg) -> None:
    """Settings of other groups that GRPO constrains."""
    g = int(cfg.objective.num_generations)
    per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum
    if per_rank % g:
        raise UserError(
            f"objective=grpo: train.micro_batch_size x train.grad_accum = {per_rank} completions per rank is not a "
            f"multiple of objective.num_generations={g}; each rank holds whole groups of a prompt's completions "
            f"(as TRL's generation batch must divide by num_generations). E.g. train.micro_batch_size={g} "
            f"train.grad_accum=2.")
    if cfg.parallel.name == "pipeline":
        raise UserError("objective=grpo generates its training data, which parallel=pipeline cannot do (its stages "
                        "hold different layers); use parallel=none, ddp, zero1, zero2, zero3 or fsdp2.")
    if cfg.objective.beta > 0 and cfg.method.peft is None:
        raise UserError(
            f"objective=grpo with objective.beta={cfg.objective.beta} and method={cfg.method.name}: the KL term needs "
            f"the reference model, which is the base with the adapter disabled under a PEFT method; with "
            f"method=full it would be a second copy of the model, which this launcher does not keep. Use a PEFT "
            f"method (e.g. method=lora) or objective.beta=0 (TRL's default).")
    if cfg.method.peft in ("prefix", "prompt"):
        raise UserError(f"objective=grpo with method={cfg.method.name}: generation with prompt-learning adapters is "
                        f"not supported here; use lora, qlora, dora, rslora, loraplus, ia3 or full.")
