"""One chunk of raw rows -> validated, tokenized, loss-masked examples as flat arrays.

Each row is staged by its kind (SFT rows in trainers/data/rows.py, preference rows in
trainers/data/preference_rows.py); the whole chunk is then encoded in one batched tokenizer
call per flavour, and the encoded texts are assembled into examples, truncated or
refused. The token cache (trainers/data/token_cache.py) appends the result."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainers.data.formats import LOOP_FORMAT, to_loop_row
from trainers.data.preference_rows import check_preference, stage_cpo_style, stage_dpo_style
from trainers.data.prompt_rows import stage_prompt
from trainers.data.rows import BadRow, Staged, assemble, check_kind, decode, row_format, row_pieces


def stage_row(tokenizer, row: Any, kind: str, fmt_wanted: str) -> Staged:
    """Validate one decoded row of `kind` and stage it for tokenization (raises BadRow)."""
    if kind == "sft":
        pieces = row_pieces(tokenizer, row, fmt_wanted)
        split = row_format(row) == "text"  # row_pieces accepted it: a dict
        return Staged([p.text for p in pieces], False, lambda enc: [assemble(tokenizer, pieces, enc)], split=split)
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("missing_field", "row is not a JSON object")
    if kind == "prompts":
        return stage_prompt(tokenizer, row)
    check_kind(row, kind)
    check_preference(row, kind)
    if kind == "pairs_text":
        return stage_cpo_style(tokenizer, row)
    answers = ("completion",) if kind == "unpaired" else ("chosen", "rejected")
    staged = stage_dpo_style(tokenizer, row, answers)
    staged.desirable = int(kind == "unpaired" and row["label"])
    staged.margin = float(row.get("margin", 0.0)) if kind == "pairs" else 0.0
    return staged


@dataclass
class EncodedChunk:
    """The kept rows of one chunk as flat arrays (what the cache appends), plus what was
    dropped. A row is one example, or two (chosen then rejected) for pairs. `error` is the
    first bad row when bad rows stop the run: (row number, why, kind of bad row)."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    row_numbers: np.ndarray
    desirable: np.ndarray
    margin: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    rows: int = 0
    error: tuple[int, str, str] | None = None


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def blocks(ids: list[int], mask: list[int], size: int) -> list[tuple[list[int], list[int]]]:
    """A plain-text example cut into consecutive blocks of `size` tokens (transformers'
    `group_texts` for one document); a last block with nothing to predict is dropped."""
    out = [(ids[i : i + size], mask[i : i + size]) for i in range(0, len(ids), size)]
    return [b for b in out if sum(b[1][1:]) > 0]


def encode_chunk(tokenizer, chunk: list[tuple[int, Any]], data_cfg, kind: str = "sft",
                 fmt: str | None = None) -> EncodedChunk:
    """Validate, render and tokenize a chunk of raw rows (see `read_raw`) of `kind`. `fmt`:
    the file's format (trainers/data/formats.file_format); default data.format, where
    `auto` detects each row's."""
    fmt, max_len = fmt or data_cfg.format, int(data_cfg.max_seq_len)
    columns = data_cfg.columns
    skip = data_cfg.on_bad_row == "skip"
    skipped: Counter = Counter()
    error: tuple[int, str, str] | None = None
    staged: list[tuple[int, Staged]] = []
    rows = 0

    def bad(n: int, b: BadRow) -> bool:
        """Count a bad row; True when it stops the chunk (a row of the wrong kind always does)."""
        nonlocal error
        if skip and b.kind != "wrong_kind":
            skipped[b.kind] += 1
            return False
        error = (n, str(b), b.kind)
        return True

    for n, raw in chunk:
        row = decode(raw)
        if row is None:
            continue
        rows += 1
        try:
            row = to_loop_row(row, fmt, columns)
            staged.append((n, stage_row(tokenizer, row, kind, LOOP_FORMAT.get(fmt, fmt))))
        except BadRow as b:
            if bad(n, b):
                break
    # one batched tokenizer call per flavour (with / without the tokenizer's special tokens)
    encoded: dict[bool, list[list[int]]] = {}
    for special in (False, True):
        encoded[special] = _encode(tokenizer, [t for _, st in staged if st.special == special for t in st.texts], special)
    cursor = {False: 0, True: 0}
    ids: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    numbers: list[int] = []
    desirable: list[int] = []
    margin: list[float] = []
    truncated = 0
    for n, st in staged:
        k = cursor[st.special]
        cursor[st.special] = k + len(st.texts)
        if error is not None and n > error[0]:
            break
        examples = st.finish(encoded[st.special][k : k + len(st.texts)])
        try:
            cut = False
            if st.split:
                examples = [b for ex_ids, ex_mask in examples for b in blocks(ex_ids, ex_mask, max_len)]
            for j, (ex_ids, ex_mask) in enumerate(examples):
                if len(ex_ids) > max_len:
                    if not data_cfg.truncation:
                        raise BadRow(
                            "too_long",
                            f"{len(ex_ids)} tokens, longer than data.max_seq_len={max_len} with data.truncation=false",
                        )
                    if kind == "prompts":  # a prompt cut short asks another question
                        raise BadRow("too_long", f"the prompt has {len(ex_ids)} tokens, more than "
                                                 f"data.max_seq_len={max_len}")
                    ex_ids, ex_mask = ex_ids[:max_len], ex_mask[:max_len]
                    if sum(ex_mask[1:]) == 0:
                        raise BadRow("too_long", "no answer token left after truncation")
                    examples[j] = (ex_ids, ex_mask)
                    cut = True
            truncated += cut
        except BadRow as b:
            if bad(n, b):
                break
            continue
        for ex_ids, ex_mask in examples:
            ids += ex_ids
            mask += ex_mask
            lengths.append(len(ex_ids))
            numbers.append(n)
            desirable.append(st.desirable)
            margin.append(st.margin)
    return EncodedChunk(
        ids=np.asarray(ids, dtype=np.int32), mask=np.asarray(mask, dtype=np.uint8),
        lengths=np.asarray(lengths, dtype=np.int32), row_numbers=np.asarray(numbers, dtype=np.int64),
        desirable=np.asarray(desirable, dtype=np.uint8), margin=np.asarray(margin, dtype=np.float32),
        skipped=skipped, truncated=truncated, rows=rows, error=error,
    )
