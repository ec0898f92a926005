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
FORMATS = ("auto", "messages", "prompt_completion", "preference", "unpaired_preference")

# What a row holds, which follows from the objective (trainers/objectives.py):
#   sft        messages, or prompt/completion: one example, loss on the answers
#   pairs      prompt/chosen/rejected, tokenized as TRL's DPOTrainer does: two examples
#              (chosen, rejected) one after the other in the cache
#   pairs_text the same rows, tokenized as TRL's CPOTrainer/ORPOTrainer do (chat template
#              rendered to text, then tokenized; BOS/EOS added when missing)
#   unpaired   prompt/completion/label (KTO), tokenized as TRL's KTOTrainer does: one
#              example with its desirable flag
ROW_KINDS = ("sft", "pairs", "pairs_text", "unpaired")
KIND_FORMATS = {"sft": ("messages", "prompt_completion"), "pairs": ("preference",),
                "pairs_text": ("preference",), "unpaired": ("unpaired_preference",)}
KIND_ROWS = {
    "sft": "`messages` or `prompt`/`completion` rows (objective=sft)",
    "pairs": "`prompt`/`chosen`/`rejected` rows (objective=dpo, ipo, simpo, orpo)",
    "unpaired": "`prompt`/`completion`/`label` rows (objective=kto)",
}
KIND_ROWS["pairs_text"] = KIND_ROWS["pairs"]


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


def row_kind_of(row: dict) -> str:
    """Which kind of row this is by its fields (TRL's dataset types)."""
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "label" in row:
        return "unpaired"
    return "sft"


def check_kind(row: dict, kind: str) -> None:
    """A row of another kind than the objective reads is not a bad row to skip: the file
    (or the objective) is wrong, so it always stops the run (BadRow kind 'wrong_kind')."""
    found = row_kind_of(row)
    wanted = "pairs" if kind == "pairs_text" else kind
    if found != wanted:
        raise BadRow("wrong_kind", f"the row has {KIND_ROWS[found]} but the objective reads {KIND_ROWS[wanted]}; "
                                   f"choose the objective that matches the data, or other data")


def _is_conversation(value: Any) -> bool:
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
    conversational = _is_conversation(row["prompt"])
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
    check_kind(row, "sft")
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


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Staged:
    """A validated row waiting for the chunk's batched tokenization: its texts, whether
    the tokenizer adds its special tokens to them, and how the encoded texts become the
    row's examples [(ids, target mask)]."""

    texts: list[str]
    special: bool
    finish: Any  # (list of encoded texts) -> list[(ids, mask)]
    desirable: int = 0


def _render_text(tokenizer, messages: list[dict], gen: bool) -> str:
    if gen and messages[-1]["role"] == "assistant":  # TRL: continue the final message
        return _render(tokenizer, messages, continue_final_message=True)
    return _render(tokenizer, messages, add_generation_prompt=gen)


def _example(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    return list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)


def stage_dpo_style(tokenizer, row: dict, answers: tuple[str, ...]) -> Staged:
    """TRL DPOTrainer / KTOTrainer `_prepare_dataset`: conversations through
    apply_chat_template (no special tokens added on top), plain text through the tokenizer
    with its special tokens and the EOS text appended to each answer; the completion
    starts where the tokenized prompt and prompt+answer diverge (for pairs: the earlier
    of the two), so chosen and rejected share one prompt."""
    if _is_conversation(row["prompt"]):
        texts = [_render_text(tokenizer, row["prompt"], gen=True)]
        texts += [_render(tokenizer, row["prompt"] + row[a]) for a in answers]
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
    if _is_conversation(row["prompt"]):
        prompt = _render_text(tokenizer, row["prompt"], gen=True)
        full = {a: _render(tokenizer, row["prompt"] + row[a]) for a in ("chosen", "rejected")}
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


def stage_row(tokenizer, row: Any, kind: str, fmt_wanted: str) -> Staged:
    """Validate one decoded row of `kind` and stage it for tokenization (raises BadRow)."""
    if kind == "sft":
        pieces = row_pieces(tokenizer, row, fmt_wanted)
        return Staged([p.text for p in pieces], False, lambda enc: [assemble(tokenizer, pieces, enc)])
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("missing_field", "row is not a JSON object")
    check_kind(row, kind)
    check_preference(row, kind)
    if kind == "pairs_text":
        return stage_cpo_style(tokenizer, row)
    answers = ("completion",) if kind == "unpaired" else ("chosen", "rejected")
    staged = stage_dpo_style(tokenizer, row, answers)
    staged.desirable = int(kind == "unpaired" and row["label"])
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
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    rows: int = 0
    error: tuple[int, str, str] | None = None


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def encode_chunk(tokenizer, chunk: list[tuple[int, Any]], data_cfg, kind: str = "sft") -> EncodedChunk:
    """Validate, render and tokenize a chunk of raw rows (see `read_raw`) of `kind`."""
    fmt_wanted, max_len = data_cfg.format, int(data_cfg.max_seq_len)
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
            staged.append((n, stage_row(tokenizer, row, kind, fmt_wanted)))
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
    truncated = 0
    for n, st in staged:
        k = cursor[st.special]
        cursor[st.special] = k + len(st.texts)
        if error is not None and n > error[0]:
            break
        examples = st.finish(encoded[st.special][k : k + len(st.texts)])
        try:
            cut = False
            for j, (ex_ids, ex_mask) in enumerate(examples):
                if len(ex_ids) > max_len:
                    if not data_cfg.truncation:
                        raise BadRow(
                            "too_long",
                            f"{len(ex_ids)} tokens, longer than data.max_seq_len={max_len} with data.truncation=false",
                        )
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
    return EncodedChunk(
        ids=np.asarray(ids, dtype=np.int32), mask=np.asarray(mask, dtype=np.uint8),
        lengths=np.asarray(lengths, dtype=np.int32), row_numbers=np.asarray(numbers, dtype=np.int64),
        desirable=np.asarray(desirable, dtype=np.uint8), skipped=skipped, truncated=truncated, rows=rows,
        error=error,
    )


def labels_of(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shifted targets of one example: labels[t] = ids[t+1] where t+1 is an answer token."""
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
    return labels
