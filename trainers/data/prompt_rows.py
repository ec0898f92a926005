"""Prompt rows (objective=grpo): validated and staged as the prompt the model will be asked.

A row is TRL's prompt-only format: `prompt` as text or as chat messages (ending with a
user turn), plus any other columns, which the reward functions receive as keyword lists
(trainers/objectives/reward.py reads them back from the file by row number). The cached
example is the prompt's token ids exactly as generation will see them: chat messages
rendered with the generation prompt, text prompts with the tokenizer's BOS, as TRL does.
Its target mask is empty: GRPO's targets are the model's own completions.
"""
from __future__ import annotations

from typing import Any

from trainers.data.rows import ROLES, BadRow, Staged, render

ANSWER_FIELDS = ("completion", "messages", "chosen", "rejected", "label")


def check_prompt(row: Any) -> None:
    if not isinstance(row, dict):
        raise BadRow("missing_field", "row is not a JSON object")
    found = [k for k in ANSWER_FIELDS if k in row]
    if found:
        raise BadRow("wrong_kind", f"the row has {', '.join(found)} but objective=grpo reads `prompt` rows with no "
                                   f"answer (the model writes the answers); drop those fields or use another objective")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("missing_field", "'prompt' is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise BadRow("missing_field", "'prompt' is missing, or neither a string nor a list of chat messages")
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow("missing_field", f"prompt message {j} needs a role ({', '.join(ROLES)}) and string content")
    if prompt[-1]["role"] != "user":
        raise BadRow("role_order", f"the prompt's last message is {prompt[-1]['role']!r}; it must be the user's")


def prompt_text(tokenizer, prompt) -> tuple[str, bool]:
    """(text to tokenize, whether the tokenizer adds its special tokens)."""
    if isinstance(prompt, list):
        return render(tokenizer, prompt, add_generation_prompt=True), False
    return prompt, True


def stage_prompt(tokenizer, row: Any) -> Staged:
    if isinstance(row, BadRow):
        raise row
    check_prompt(row)
    text, special = prompt_text(tokenizer, row["prompt"])
    return Staged([text], special, lambda enc: [(list(enc[0]), [0] * len(enc[0]))])
