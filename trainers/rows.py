"""Rows on disk -> validated, tokenized, loss-masked token runs.

This is the one pass every row goes through, once per dataset version (the token cache
in `trainers/token_cache.py` stores its output). It works a chunk of rows at a time so
the tokenizer encodes every text piece of the chunk in one batched call: rendering the
chat template and cutting it at turn boundaries is per row, but the encoding is not.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainers.errors import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "prompt_completion")


class BadRow(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ----------------------------------------------------------------------------- reading
def missing_file_error(path: str) -> UserError:
    return UserError(
        f"Data file {path!r} does not exist. Point data.train / data.eval at a JSONL or "
        f"parquet file or a folder saved with datasets' save_to_disk."
    )


def read_raw(path: str, batch: int = 2000) -> Iterator[list[tuple[int, Any]]]:
    """Batches of (row_number, raw) with row numbers 1-based (JSONL: the line number).

    JSONL rows stay undecoded bytes here, so the JSON parsing happens in the (parallel)
    workers, not in the one process that reads the file."""
    p = Path(path)
    if not p.exists():
        raise missing_file_error(path)
    if p.is_dir():
        yield from _read_datasets_folder(p, batch)
        return
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for rb in pq.ParquetFile(p).iter_batches(batch_size=batch):
            rows = rb.to_pylist()
            yield list(enumerate(rows, start=n + 1))
            n += len(rows)
        return
    if p.suffix not in (".jsonl", ".json"):
        raise UserError(f"Unsupported data file {path!r}: use .jsonl, .parquet or a datasets folder.")
    with open(p, "rb") as f:
        out: list[tuple[int, Any]] = []
        for i, raw in enumerate(f, start=1):
            out.append((i, raw))
            if len(out) == batch:
                yield out
                out = []
        if out:
            yield out


def _read_datasets_folder(p: Path, batch: int) -> Iterator[list[tuple[int, Any]]]:
    try:
        import datasets

        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - any loading failure is reported to the user as-is
        raise UserError(f"Could not load the datasets folder {str(p)!r}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(
            f"{str(p)!r} is a DatasetDict with splits {list(ds)}; point data.train / data.eval "
            f"at one split's folder, e.g. {p}/{next(iter(ds))}."
        )
    n = 0
    for cols in ds.iter(batch_size=batch):
        rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        yield list(enumerate(rows, start=n + 1))
        n += len(rows)


def decode(raw: Any) -> Any:
    """A JSONL line -> its object (or a BadRow; None for a blank line). Other readers
    already give objects."""
    if not isinstance(raw, bytes):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("undecodable", f"text is not valid UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow("invalid_json", f"not valid JSON ({e.msg})")


def read_rows(path: str, numbers: set[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(row_number, object) one at a time; with `numbers`, only those rows, stopping at
    the last one (the evaluator reads back its few generation rows this way)."""
    last = max(numbers) if numbers else None
    for chunk in read_raw(path):
        for n, raw in chunk:
            if numbers is not None and n not in numbers:
                continue
            row = decode(raw)
            if row is not None:
                yield n, row
            if last is not None and n >= last:
                return


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
@dataclass
class Piece:
    """A span of text that is tokenized on its own: the cut points are exactly where the
    loss mask changes, so a token never straddles prompt and answer."""

    text: str
    target: bool
    bos: bool = False  # prepend the tokenizer's BOS
    eos: bool = False  # an answer: append EOS unless the template already ended it


def _render(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def message_pieces(tokenizer, messages: list[dict]) -> list[Piece]:
    """The rendered conversation cut at the boundaries the template itself produces for
    `messages[:i]` with a generation prompt, so the prompt part of the last turn is
    tokenized exactly as it will be at generation time."""
    full = _render(tokenizer, messages)
    pieces: list[Piece] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto):
            raise UserError(
                "The tokenizer's chat template is not prefix-stable (rendering the first turns "
                "is not a prefix of rendering all turns), so assistant tokens cannot be located. "
                "Use a template without look-ahead, or prompt/completion rows."
            )
        pieces += [Piece(full[pos:start], False), Piece(full[start : len(upto)], True, eos=True)]
        pos = len(upto)
    return pieces


def row_pieces(tokenizer, row: Any, fmt_wanted: str) -> list[Piece]:
    """Validate one decoded row and cut it into pieces (raises BadRow)."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("missing_field", "row is not a JSON object")
    fmt = row_format(row)
    if fmt_wanted != "auto" and fmt != fmt_wanted:
        raise BadRow("wrong_format", f"row is in {fmt} format but data.format={fmt_wanted}")
    if fmt == "messages":
        check_messages(row["messages"])
        return message_pieces(tokenizer, row["messages"])
    check_prompt_completion(row)
    return [Piece(row["prompt"], False, bos=True), Piece(row["completion"], True, eos=True)]


def assemble(tokenizer, pieces: list[Piece], encoded: list[list[int]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for piece, toks in zip(pieces, encoded):
        toks = list(toks)
        if piece.bos and bos is not None:
            toks.insert(0, bos)
        if piece.eos and eos is not None and eos not in toks[-2:]:
            toks.append(eos)
        ids += toks
        mask += [int(piece.target)] * len(toks)
    return ids, mask


def tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a target mask covering every assistant turn (plus its EOS)."""
    pieces = message_pieces(tokenizer, messages)
    enc = tokenizer([p.text for p in pieces], add_special_tokens=False)["input_ids"]
    return assemble(tokenizer, pieces, enc)


@dataclass
class EncodedChunk:
    """The kept rows of one chunk as flat arrays (what the cache appends), plus what was
    dropped. `error` is the first bad row when bad rows stop the run."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    row_numbers: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    rows: int = 0
    error: tuple[int, str] | None = None


def encode_chunk(tokenizer, chunk: list[tuple[int, Any]], data_cfg) -> EncodedChunk:
    """Validate, render and tokenize a chunk of raw rows (see `read_raw`)."""
    fmt_wanted, max_len = data_cfg.format, int(data_cfg.max_seq_len)
    skip = data_cfg.on_bad_row == "skip"
    skipped: Counter = Counter()
    error: tuple[int, str] | None = None
    staged: list[tuple[int, list[Piece]]] = []
    rows = 0

    def bad(n: int, b: BadRow) -> bool:
        """Count a bad row; True when it stops the chunk."""
        nonlocal error
        if skip:
            skipped[b.kind] += 1
            return False
        error = (n, str(b))
        return True

    for n, raw in chunk:
        row = decode(raw)
        if row is None:
            continue
        rows += 1
        try:
            staged.append((n, row_pieces(tokenizer, row, fmt_wanted)))
        except BadRow as b:
            if bad(n, b):
                break
    texts = [p.text for _, pieces in staged for p in pieces]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    numbers: list[int] = []
    truncated = 0
    k = 0
    for n, pieces in staged:
        if error is not None and n > error[0]:
            break
        row_ids, row_mask = assemble(tokenizer, pieces, encoded[k : k + len(pieces)])
        k += len(pieces)
        try:
            if len(row_ids) > max_len:
                if not data_cfg.truncation:
                    raise BadRow(
                        "too_long",
                        f"{len(row_ids)} tokens, longer than data.max_seq_len={max_len} with data.truncation=false",
                    )
                row_ids, row_mask = row_ids[:max_len], row_mask[:max_len]
                if sum(row_mask[1:]) == 0:
                    raise BadRow("too_long", "no answer token left after truncation")
                truncated += 1
        except BadRow as b:
            if bad(n, b):
                break
            continue
        ids += row_ids
        mask += row_mask
        lengths.append(len(row_ids))
        numbers.append(n)
    return EncodedChunk(
        ids=np.asarray(ids, dtype=np.int32), mask=np.asarray(mask, dtype=np.uint8),
        lengths=np.asarray(lengths, dtype=np.int32), row_numbers=np.asarray(numbers, dtype=np.int64),
        skipped=skipped, truncated=truncated, rows=rows, error=error,
    )


def labels_of(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shifted targets of one example: labels[t] = ids[t+1] where t+1 is an answer token."""
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
    return labels
