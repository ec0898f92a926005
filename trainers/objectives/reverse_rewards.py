"""Built-in rewards for the bundled reverse task (data=reverse_rl), written with TRL's
reward signature, so they are referenced like any user's reward:
objective.rewards='[{fn: trainers.objectives.reverse_rewards:partial_credit}]'.

Each reads the `answer` column and the completion's text (a chat completion is a list with
one assistant message, as TRL passes it; a text completion a string).
"""
from __future__ import annotations


def _text(completion) -> str:
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1 when the answer, stripped, is exactly the reversed string, else 0."""
    return [float(_text(c).strip() == a) for c, a in zip(completions, answer)]


def partial_credit(completions, answer, **kwargs) -> list[float]:
    """The share of the answer's positions the completion gets right, minus the share of
    extra characters: a smooth signal a model that is almost right can climb."""
    out = []
    for c, a in zip(completions, answer):
        t = _text(c).strip()
        hits = sum(x == y for x, y in zip(t, a))
        out.append(max(0.0, (hits - max(0, len(t) - len(a))) / len(a)))
    return out


def length_format(completions, answer, **kwargs) -> list[float]:
    """1 for a single lowercase word as long as the answer, less the further its length is."""
    out = []
    for c, a in zip(completions, answer):
        t = _text(c).strip()
        well_formed = t.isalpha() and t.islower() and " " not in t
        out.append(float(well_formed) * max(0.0, 1 - abs(len(t) - len(a)) / len(a)))
    return out
