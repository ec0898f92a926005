"""Rows on disk: reading them (JSONL, parquet, datasets folders), what kind of row the
objective reads, validating SFT rows and cutting them into text pieces at the points where
the loss mask changes.

Every row goes through this once per dataset version (trainers/data/encoding.py tokenizes a
chunk of staged rows in one batched call; the token cache in trainers/data/token_cache.py
stores the output). Preference rows are validated and staged in trainers/data/preference_rows.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainers.errors import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "prompt_completion", "preference", "unpaired_preference", "prompt_only",
           "alpaca", "sharegpt", "text")

# What a row holds, which follows from the objective (trainers/objectives/catalog.py):
#   sft        messages, or prompt/completion: one example, loss on the answers
#   pairs      prompt/chosen/rejected, tokenized as TRL's DPOTrainer does: two examples
#              (chosen, rejected) one after the other in the cache
#   pairs_text the same rows, tokenized as TRL's CPOTrainer/ORPOTrainer do (chat template
#              rendered to text, then tokenized; BOS/EOS added when missing)
#   unpaired   prompt/completion/label (KTO), tokenized as TRL's KTOTrainer does: one
#              example with its desirable flag
#   prompts    prompt rows with no answer (GRPO): the prompt as the model will be asked it
#              (chat template with the generation prompt), other columns go to the rewards
ROW_KINDS = ("sft", "pairs", "pairs_text", "unpaired", "prompts")
KIND_FORMATS = {"sft": ("messages", "prompt_completion", "alpaca", "sharegpt", "text"), "pairs": ("preference",),
                "pairs_text": ("preference",), "unpaired": ("unpaired_preference",),
                "prompts": ("prompt_only",)}
KIND_ROWS = {
    "sft": "`messages` or `prompt`/`completion` rows (objective=sft)",
    "pairs": "`prompt`/`chosen`/`rejected` rows (objective=dpo, ipo, simpo, orpo, reward)",
    "unpaired": "`prompt`/`completion`/`label` rows (objective=kto)",
    "prompts": "`prompt` rows with no answer, plus any columns the rewards read (objective=grpo)",
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


HF_PREFIX = "hf:"


def is_hf(path: str) -> bool:
    return str(path).startswith(HF_PREFIX)


def hf_name_split(path: str) -> tuple[str, str | None]:
    """hf:NAME[:SPLIT] -> (NAME, SPLIT or None)."""
    name, _, split = str(path)[len(HF_PREFIX):].partition(":")
    return name, split or None


def source_exists(path: str) -> bool:
    """A Hub dataset is looked up when it is read; a local file or folder must exist."""
    if is_hf(path):
        name = hf_name_split(path)[0]
        return bool(name) and (Path(name).exists() or not name.startswith(("/", ".", "~")))
    return Path(path).exists()


def hf_dataset(path: str):
    """data.train=hf:NAME[:SPLIT]: a folder saved with save_to_disk (a Dataset, or a
    DatasetDict's SPLIT, default train), or else datasets.load_dataset(NAME, split=SPLIT): a
    Hub dataset (from the local Hub cache when HF_DATASETS_OFFLINE=1) or a local folder of
    data files laid out as a Hub dataset repository."""
    import datasets

    name, split = hf_name_split(path)
    try:
        if any((Path(name) / f).is_file() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    raise UserError(f"{path!r}: the saved DatasetDict has splits {list(ds)}, not "
                                    f"{split or 'train'!r}; name one as hf:{name}:SPLIT.")
                return ds[split or "train"]
            if split:
                raise UserError(f"{path!r}: {name!r} holds one Dataset, without splits; drop ':{split}'.")
            return ds
        return datasets.load_dataset(name, split=split or "train")
    except UserError:
        raise
    except Exception as e:  # not found, offline without a cached copy, unknown split...
        raise UserError(
            f"Could not read {path!r} with datasets ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"hf:NAME[:SPLIT] takes a folder saved with save_to_disk or a Hub dataset in the local cache "
            f"(set HF_DATASETS_OFFLINE=1 on a machine without internet)."
        ) from None


def read_raw(path: str, batch: int = 2000) -> Iterator[list[tuple[int, Any]]]:
    """Batches of (row_number, raw) with row numbers 1-based (JSONL: the line number).

    JSONL rows stay undecoded bytes here, so the JSON parsing happens in the (parallel)
    workers, not in the one process that reads the file."""
    if is_hf(path):
        yield from _iter_dataset(hf_dataset(path), batch)
        return
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
    except (OSError, ValueError) as e:  # not a saved dataset (missing or unreadable files, bad JSON)
        raise UserError(f"Could not load the datasets folder {str(p)!r}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(
            f"{str(p)!r} is a DatasetDict with splits {list(ds)}; point data.train / data.eval "
            f"at one split's folder, e.g. {p}/{next(iter(ds))}."
        )
    yield from _iter_dataset(ds, batch)


def _iter_dataset(ds, batch: int) -> Iterator[list[tuple[int, Any]]]:
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
    if "text" in row:
        return "text"
    raise BadRow("missing_field", f"row has neither 'messages' nor 'prompt'/'completion' nor 'text' (keys: "
                                  f"{sorted(row)}); a file of another layout can name its columns with "
                                  f"data.columns={{prompt: YOUR_COLUMN, completion: YOUR_COLUMN}}")


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


# ------------------------------------------------------------------------- tokenizing
@dataclass
class Piece:
    """A span of text that is tokenized on its own: the cut points are exactly where the
    loss mask changes, so a token never straddles prompt and answer."""

    text: str
    target: bool
    bos: bool = False  # prepend the tokenizer's BOS
    eos: bool = False  # an answer: append EOS unless the template already ended it


def render(tokenizer, messages: list[dict], **kw) -> str:
    if tokenizer.chat_template is None:  # not a bad row: no conversation of the file can be rendered
        raise UserError(
            "The data holds conversations but the tokenizer of model.path has no chat template. Set one "
            "with data.chat_template=NAME_OR_PATH (a jinja file, or one of the shipped templates: "
            "chatml, llama3, zephyr), or use prompt/completion or text rows."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def message_pieces(tokenizer, messages: list[dict]) -> list[Piece]:
    """The rendered conversation cut at the boundaries the template itself produces for
    `messages[:i]` with a generation prompt, so the prompt part of the last turn is
    tokenized exactly as it will be at generation time."""
    full = render(tokenizer, messages)
    pieces: list[Piece] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
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
    if fmt == "text":  # continued pre-training: every token is a target
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BadRow("empty_answer", "'text' is empty or not a string")
        return [Piece(row["text"], True, bos=True, eos=True)]
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
class Staged:
    """A validated row waiting for the chunk's batched tokenization: its texts, whether
    the tokenizer adds its special tokens to them, and how the encoded texts become the
    row's examples [(ids, target mask)]."""

    texts: list[str]
    special: bool
    finish: Any  # (list of encoded texts) -> list[(ids, mask)]
    desirable: int = 0
    margin: float = 0.0  # a preference pair's optional `margin` column (objective=reward)
    # plain text: an example longer than data.max_seq_len is cut into consecutive blocks of
    # that many tokens (every token trained once) instead of truncated
    split: bool = False


def labels_of(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shifted targets of one example: labels[t] = ids[t+1] where t+1 is an answer token."""
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
    return labels
