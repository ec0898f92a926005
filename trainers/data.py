"""Rows on disk -> tokenized, loss-masked, optionally packed training sequences.

Everything here runs before any training (and, for multi-process runs, in the launcher
before workers are spawned), so a bad row stops the run with its file and row number
instead of crashing step 4,000 on rank 7.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from trainers.errors import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized row. labels are already shifted: labels[t] is the target of position t."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Sequence:
    """What the model sees as one batch row: one example, or several packed back to back."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class DataReport:
    path: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def describe(self) -> str:
        s = f"{self.path}: {self.kept}/{self.rows} rows kept"
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.skipped:
            s += ", skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items()))
        return s


class BadRow(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ----------------------------------------------------------------------------- reading
def read_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (row_number, row or BadRow). JSONL rows are numbered by line (1-based)."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"Data file {path!r} does not exist. Point data.train / data.eval at a JSONL or "
            f"parquet file or a folder saved with datasets' save_to_disk."
        )
    if p.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - reported to the user as-is
            raise UserError(f"Could not load the datasets folder {path!r}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(
                f"{path!r} is a DatasetDict with splits {list(ds)}; point data.train / data.eval "
                f"at one split's folder, e.g. {path}/{next(iter(ds))}."
            )
        for i, row in enumerate(ds, start=1):
            yield i, row
        return
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist(), start=1):
            yield i, row
        return
    if p.suffix not in (".jsonl", ".json"):
        raise UserError(f"Unsupported data file {path!r}: use .jsonl, .parquet or a datasets folder.")
    with open(p, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, BadRow("undecodable", f"text is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, BadRow("invalid_json", f"not valid JSON ({e.msg})")


# -------------------------------------------------------------------------- validating
def row_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    raise BadRow("missing_field", f"row has neither 'messages' nor 'prompt'/'completion' (keys: {sorted(row)})")


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRow("missing_field", "'messages' must be a non-empty list")
    roles = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("missing_field", f"message {j} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow("bad_role", f"message {j} has role {m['role']!r}; accepted: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow("missing_field", f"message {j} content must be a string")
        roles.append(m["role"])
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        raise BadRow(
            "role_order",
            f"roles {roles} are out of order; expected an optional system message, then "
            f"user/assistant turns alternating, ending with assistant",
        )
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow("empty_answer", f"assistant message {j} is empty")


def check_prompt_completion(row: dict) -> None:
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise BadRow("missing_field", f"'{key}' is missing or not a string")
    if not row["completion"].strip():
        raise BadRow("empty_answer", "'completion' is empty")


# ------------------------------------------------------------------------- tokenizing
def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a target mask covering every assistant turn (plus its EOS).

    The rendered conversation is cut at the boundaries that the template itself
    produces for `messages[:i]` with a generation prompt, so the prompt part of the last
    turn is tokenized exactly as it will be at generation time.
    """
    full = _render(tokenizer, messages)
    cuts: list[tuple[int, int]] = []  # (start, end) char spans of assistant turns
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1]))
        if not full.startswith(_render(tokenizer, messages[: i + 1])):
            raise UserError(
                "The tokenizer's chat template is not prefix-stable (rendering the first turns "
                "is not a prefix of rendering all turns), so assistant tokens cannot be located. "
                "Use a template without look-ahead, or prompt/completion rows."
            )
        cuts.append((start, end))
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    eos = tokenizer.eos_token_id
    for start, end in cuts:
        prompt_ids = _encode(tokenizer, full[pos:start])
        answer_ids = _encode(tokenizer, full[start:end])
        if eos is not None and eos not in answer_ids[-2:]:
            answer_ids.append(eos)
        ids += prompt_ids + answer_ids
        mask += [0] * len(prompt_ids) + [1] * len(answer_ids)
        pos = end
    return ids, mask


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + _encode(tokenizer, prompt)
    c = _encode(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    return p + c, [0] * len(p) + [1] * len(c)


def to_example(ids: list[int], mask: list[int]) -> Example:
    labels = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(input_ids=ids, labels=labels)


def load_examples(path: str, tokenizer, data_cfg) -> tuple[list[Example], list[dict], DataReport]:
    """Validate and tokenize a file. Returns examples, the kept raw rows, and a report."""
    fmt_wanted = data_cfg.format
    report = DataReport(path=path)
    examples: list[Example] = []
    kept_rows: list[dict] = []
    for n, row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow("missing_field", "row is not a JSON object")
            fmt = row_format(row)
            if fmt_wanted != "auto" and fmt != fmt_wanted:
                raise BadRow("wrong_format", f"row is in {fmt} format but data.format={fmt_wanted}")
            if fmt == "messages":
                check_messages(row["messages"])
                ids, mask = tokenize_messages(tokenizer, row["messages"])
            else:
                check_prompt_completion(row)
                ids, mask = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
            if len(ids) > data_cfg.max_seq_len:
                if not data_cfg.truncation:
                    raise BadRow(
                        "too_long",
                        f"{len(ids)} tokens, longer than data.max_seq_len={data_cfg.max_seq_len} "
                        f"with data.truncation=false",
                    )
                ids, mask = ids[: data_cfg.max_seq_len], mask[: data_cfg.max_seq_len]
                report.truncated += 1
                if sum(mask[1:]) == 0:
                    raise BadRow("too_long", "no answer token left after truncation")
        except BadRow as bad:
            if data_cfg.on_bad_row == "skip":
                report.skipped[bad.kind] += 1
                continue
            raise UserError(
                f"Bad row in {path}, row {n}: {bad}. Fix the row, or set data.on_bad_row=skip to "
                f"drop bad rows (they are counted and reported)."
            ) from None
        examples.append(to_example(ids, mask))
        kept_rows.append(row)
        report.kept += 1
    if not examples:
        raise UserError(f"No usable rows in {path} ({report.describe()}).")
    return examples, kept_rows, report


# ---------------------------------------------------------------------------- packing
def pack(examples: list[Example], max_len: int) -> list[Sequence]:
    """Greedy in-order packing; positions restart per example so attention stays inside it."""
    out: list[Sequence] = []
    cur = Sequence([], [], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_len:
            out.append(cur)
            cur = Sequence([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        out.append(cur)
    return out


def unpacked(examples: list[Example]) -> list[Sequence]:
    return [Sequence(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


def collate(seqs: list[Sequence], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Packed batches pass position_ids and no attention mask,
    which makes transformers build a block-diagonal causal mask (no cross-row attention)."""
    width = max(len(s.input_ids) for s in seqs)
    ids, labels, pos, mask = [], [], [], []
    for s in seqs:
        pad = width - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE] * pad)
        pos.append(s.position_ids + list(range(pad)))
        mask.append([1] * len(s.input_ids) + [0] * pad)
    batch = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(pos),
        "n_real_tokens": sum(len(s.input_ids) for s in seqs),
    }
    if not packed:
        batch["attention_mask"] = torch.tensor(mask)
    return batch
