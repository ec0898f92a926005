"""Preference rows (TRL's prompt/chosen/rejected and prompt/completion/label formats):
validation, and the staging that tokenizes them exactly as TRL's trainers do, so a recipe
moves between the two with the same tokens (tests/test_trl_preference_reference.py)."""
from __future__ import annotations

from typing import Any

from trainers.data.rows import ROLES, BadRow, Staged, render


def is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_turns(messages: Any, key: str, answer: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRow("missing_field", f"'{key}' must be a non-empty list of messages (or all fields plain text)")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise BadRow("missing_field", f"'{key}' message {j} needs a 'role' ({', '.join(ROLES)}) and a string "
                                          f"'content'")
    if answer and any(m["role"] != "assistant" for m in messages):
        raise BadRow("bad_role", f"'{key}' must hold assistant messages only")


def answer_text(value: Any) -> str:
    return "".join(m["content"] for m in value) if isinstance(value, list) else value


def check_preference(row: dict, kind: str) -> None:
    """TRL's preference (prompt/chosen/rejected) or unpaired preference
    (prompt/completion/label) row, all plain text or all conversations."""
    answers = ("chosen", "rejected") if kind in ("pairs", "pairs_text") else ("completion",)
    for key in ("prompt",) + answers:
        if key not in row:
            raise BadRow("missing_field", f"'{key}' is missing (a row needs {', '.join(('prompt',) + answers)})")
    conversational = is_conversation(row["prompt"])
    for key in ("prompt",) + answers:
        if conversational:
            _check_turns(row[key], key, answer=key != "prompt")
        elif not isinstance(row[key], str):
            raise BadRow("missing_field", f"'{key}' must be a string like 'prompt' (or all fields conversations)")
    for key in answers:
        if not answer_text(row[key]).strip():
            raise BadRow("empty_answer", f"'{key}' is empty")
    if kind == "unpaired":
        if not isinstance(row.get("label"), bool):
            raise BadRow("missing_field", f"'label' must be true (desirable) or false, not {row.get('label')!r}")
    elif answer_text(row["chosen"]).strip() == answer_text(row["rejected"]).strip():
        raise BadRow("same_answers", "'chosen' equals 'rejected': the pair prefers nothing")
    if kind == "pairs" and "margin" in row:
        m = row["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m or abs(m) == float("inf"):
            raise BadRow("bad_margin", f"'margin' must be a finite number (how much more the chosen answer should "
                                       f"score, TRL's RewardTrainer column), not {m!r}")


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render_text(tokenizer, messages: list[dict], gen: bool) -> str:
    if gen and messages[-1]["role"] == "assistant":  # TRL: continue the final message
        return render(tokenizer, messages, continue_final_message=True)
    return render(tokenizer, messages, add_generation_prompt=gen)


def _example(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    return list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)


def stage_dpo_style(tokenizer, row: dict, answers: tuple[str, ...]) -> Staged:
    """TRL DPOTrainer / KTOTrainer `_prepare_dataset`: conversations through
    apply_chat_template (no special tokens added on top), plain text through the tokenizer
    with its special tokens and the EOS text appended to each answer; the completion
    starts where the tokenized prompt and prompt+answer diverge (for pairs: the earlier
    of the two), so chosen and rejected share one prompt."""
    if is_conversation(row["prompt"]):
        texts = [_render_text(tokenizer, row["prompt"], gen=True)]
        texts += [render(tokenizer, row["prompt"] + row[a]) for a in answers]
        special = False
    else:
        eos = tokenizer.eos_token or ""

        def with_eos(text: str) -> str:
            return text if text.endswith(eos) else text + eos

        texts = [row["prompt"]] + [row["prompt"] + with_eos(row[a]) for a in answers]
        special = True

    def finish(enc: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        prompt, fulls = enc[0], enc[1:]
        p = min(common_prefix_length(prompt, f) for f in fulls)
        return [_example(f[:p], f[p:]) for f in fulls]

    return Staged(texts, special, finish)


def stage_cpo_style(tokenizer, row: dict) -> Staged:
    """TRL CPOTrainer / ORPOTrainer: `maybe_apply_chat_template` renders conversations to
    text (the prompt is the longest common text prefix of the renderings), then
    `tokenize_row` tokenizes without special tokens, splits each answer off its own
    prompt (`build_tokenized_answer`: enc(prompt) + enc(prompt + answer)[len(enc(prompt)):],
    one token earlier when the last prompt token merged), prepends BOS unless the prompt
    starts with it and appends EOS unless the answer ends with it."""
    if is_conversation(row["prompt"]):
        prompt = _render_text(tokenizer, row["prompt"], gen=True)
        full = {a: render(tokenizer, row["prompt"] + row[a]) for a in ("chosen", "rejected")}
        for text in full.values():
            n = 0
            while n < min(len(prompt), len(text)) and prompt[n] == text[n]:
                n += 1
            prompt = prompt[:n]
        answers = [full[a][len(prompt):] for a in ("chosen", "rejected")]
    else:
        prompt, answers = row["prompt"], [row["chosen"], row["rejected"]]
    texts = [prompt] + [prompt + a for a in answers]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def finish(enc: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        p_ids, out = list(enc[0]), []
        for f in enc[1:]:
            start = len(p_ids) - (0 if f[: len(p_ids)] == p_ids else 1)
            prompt_part, answer = list(f[:start]), list(f[start:])
            if bos is not None and (not prompt_part or prompt_part[0] != bos):
                prompt_part.insert(0, bos)
            if eos is not None and (not answer or answer[-1] != eos):
                answer.append(eos)
            out.append(_example(prompt_part, answer))
        return out

    return Staged(texts, False, finish)
