"""Rewards for objective=grpo: Python functions named 'package.module:function' and frozen
sequence classifiers, called as TRL's GRPOTrainer calls them, so a reward written for
TRL works here unchanged.

A function receives `prompts`, `completions` and `completion_ids` (one entry per
completion; a prompt is repeated for each of its generations), every other column of the
prompt rows as a keyword list in the same order, and `trainer_state` (with `global_step`
and `max_steps`); it returns one float or None per completion (None: this reward does not
apply; a completion that no reward scores gets advantage 0, as in TRL).

What TRL broadcasts or raises deep in a step, this refuses early with the function's name,
the data row and the value: a function that cannot be imported is refused before launch
(`check_reward_specs`), one that raises, returns the wrong count or a non-number stops the
run at the step that called it, before the optimizer step, so the last committed
checkpoint stays the newest.

A `{model: PATH}` reward is an AutoModelForSequenceClassification with one label (an
`objective=reward` run's export, for example), loaded once, frozen, in the run's compute
dtype on the run's device, scoring the chat-rendered prompt + completion with its own
tokenizer: never a second copy of the policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from trainers.errors import TrainingError
from trainers.objectives.grpo_settings import import_function, reward_entries, reward_names

@dataclass
class Reward:
    name: str
    weight: float
    fn: Callable | None = None  # a Python reward
    model: torch.nn.Module | None = None  # a sequence classifier
    tokenizer: object = None


_LOADED: dict[str, list[Reward]] = {}


def load_rewards(specs, weights, dtype: torch.dtype, device: torch.device) -> list[Reward]:
    """The rewards, loaded once per process (the loop's objective and the evaluator's share
    them: a reward model is never held twice)."""
    key = repr((reward_entries(specs), None if weights is None else list(weights), dtype, str(device)))
    if key not in _LOADED:
        _LOADED[key] = _load(specs, weights, dtype, device)
    return _LOADED[key]


def _load(specs, weights, dtype: torch.dtype, device: torch.device) -> list[Reward]:
    entries = reward_entries(specs)
    names = reward_names(specs)
    out = []
    for i, (e, name) in enumerate(zip(entries, names)):
        w = float(weights[i]) if weights is not None else float(e.get("weight", 1.0))
        if "fn" in e:
            out.append(Reward(name, w, fn=import_function(e["fn"])))
            continue
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(e["model"]), num_labels=1, dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        tok = AutoTokenizer.from_pretrained(str(e["model"]))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        out.append(Reward(name, w, model=model, tokenizer=tok))
    return out


def _model_scores(r: Reward, prompts: list, completions: list, device: torch.device) -> list[float]:
    if isinstance(prompts[0], list):  # conversational: render prompt + completion as one chat
        texts = [r.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    enc = r.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        return r.model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().tolist()


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list, columns: dict,
          row_names: list[str], step: int, max_steps: int, device: torch.device) -> torch.Tensor:
    """(completions, rewards) float32, NaN where a function returned None. Any misbehaviour
    stops the run naming the function, the row and the value."""
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    out = torch.full((len(prompts), len(rewards)), float("nan"), dtype=torch.float32)
    for j, r in enumerate(rewards):
        if r.model is not None:
            out[:, j] = torch.tensor(_model_scores(r, prompts, completions, device), dtype=torch.float32)
            continue
        where = f"reward function {r.name!r} (objective.rewards) at step {step + 1}"
        try:
            values = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          trainer_state=state, **columns)
        except Exception as e:
            raise TrainingError(f"The {where} raised {type(e).__name__}: {e} (on the completions of rows "
                                f"{', '.join(sorted(set(row_names))[:8])}). Training stopped before the optimizer "
                                f"step; the last committed checkpoint is untouched.") from e
        try:
            values = list(values)
        except TypeError:
            values = None
        if values is None or len(values) != len(prompts):
            got = "a non-list" if values is None else f"{len(values)} values"
            raise TrainingError(f"The {where} returned {got} for {len(prompts)} completions; a reward returns one "
                                f"float or None per completion (it is never broadcast). Training stopped before "
                                f"the optimizer step.")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TrainingError(f"The {where} returned {v!r} for completion {i} (row {row_names[i]}, completion "
                                    f"{completions[i]!r}); a reward is a finite number or None. Training stopped "
                                    f"before the optimizer step.")
            out[i, j] = float(v)
    return out
