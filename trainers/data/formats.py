"""The formats users bring (Alpaca, ShareGPT, plain text) and their own column names, turned
into the rows the loop already trains: chat `messages`, `prompt`/`completion`, or `text`.

Users arriving from LLaMA-Factory or Axolotl have files in these layouts; converting them
row by row at tokenization time (trainers/data/encoding.py) leaves everything after it (the
token cache, packing, batches, evaluation) unchanged. A file's format is detected once, from
its first row (`data.format=auto`), so one odd row is reported as a bad row of the file's
format instead of silently trained as another one. Plain Python: the launcher's checks
import it without torch.
"""
from __future__ import annotations

from typing import Any

from trainers.data.rows import BadRow

# data.format values converted here (the others are the loop's own row formats)
CONVERTED = ("alpaca", "sharegpt", "text")
# ShareGPT speakers -> chat roles. LLaMA-Factory alternates (human | observation) with
# (gpt | function_call): a tool's output is read like a user turn, never trained; the
# model's function call is an answer, trained like one.
SHAREGPT_ROLES = {"human": "user", "user": "user", "observation": "user", "tool": "user",
                  "gpt": "assistant", "assistant": "assistant", "function_call": "assistant",
                  "function": "assistant", "system": "system"}
ANSWER_KEYS = ("messages", "prompt", "completion", "chosen", "rejected", "label")


def map_columns(row: Any, columns) -> Any:
    """data.columns={expected: file_column}: the file's own column names renamed to the ones
    the format expects (a column not named stays as it is)."""
    if not columns or not isinstance(row, dict):
        return row
    out = dict(row)
    for expected, own in columns.items():
        if own in row:
            out.pop(own)
            out[expected] = row[own]
    return out


def detect(row: Any) -> str:
    """The format of a (column-mapped) row: alpaca, sharegpt, text, or auto for the loop's
    own formats (messages, prompt/completion, TRL's preference rows), told apart per row."""
    if not isinstance(row, dict):
        return "auto"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row and not any(k in row for k in ANSWER_KEYS):
        return "text"
    return "auto"


def _text(row: dict, key: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadRow("missing_field", f"'{key}' is missing or not a string")
    return value


def from_alpaca(row: dict) -> dict:
    """instruction (+ "\\n" + input) is the user turn, output the answer; `system` and
    `history` ([[user, assistant], ...] earlier turns) as LLaMA-Factory reads them."""
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    messages = []
    system = _text(row, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2
                                                and all(isinstance(x, str) for x in t) for t in history):
        raise BadRow("missing_field", "'history' must be a list of [instruction, answer] string pairs")
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _text(row, "output")})
    return {"messages": messages}


def from_sharegpt(row: dict) -> dict:
    """`conversations` of {from, value} (human/gpt/system/function_call/observation) or of
    OpenAI's {role, content}; a top-level `system` comes first."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("missing_field", "'conversations' must be a non-empty list of turns")
    messages = []
    system = _text(row, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("missing_field", f"turn {j} is not an object")
        who = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if who not in SHAREGPT_ROLES:
            raise BadRow("bad_role", f"turn {j} is from {who!r}; accepted: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(content, str):
            raise BadRow("missing_field", f"turn {j} needs a string 'value' (or 'content')")
        messages.append({"role": SHAREGPT_ROLES[who], "content": content})
    return {"messages": messages}


def from_text(row: dict) -> dict:
    text = _text(row, "text")
    if not text.strip():
        raise BadRow("empty_answer", "'text' is empty")
    return {"text": text}


CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "text": from_text}


def to_loop_row(row: Any, fmt: str, columns=None) -> Any:
    """A decoded row of a file of format `fmt` (`auto`: this row's own) -> the row the loop
    trains (raises BadRow). Rows of the loop's own formats only have their columns renamed."""
    if isinstance(row, BadRow) or not isinstance(row, dict):
        return row
    row = map_columns(row, columns)
    if fmt == "auto":
        fmt = detect(row)
    return CONVERTERS[fmt](row) if fmt in CONVERTERS else row


def file_format(path: str, data_cfg) -> str:
    """data.format, or with `auto` the format of the file's first row: one format per file."""
    if data_cfg.format != "auto":
        return data_cfg.format
    from trainers.data.rows import decode, read_raw

    for chunk in read_raw(path, batch=16):
        for _, raw in chunk:
            row = decode(raw)
            if row is not None and not isinstance(row, BadRow):
                return detect(map_columns(row, data_cfg.columns))
    return "auto"


# what a converted format's rows are once converted (rows.row_format's names)
LOOP_FORMAT = {"alpaca": "messages", "sharegpt": "messages", "text": "text"}


def check_settings(data_cfg, has_eval: bool) -> None:
    """Pre-launch checks of data.columns, data.chat_template, data.eval_split and
    data.max_samples (no torch)."""
    from omegaconf import DictConfig

    from trainers.data.chat_template import template_file
    from trainers.data.selection import check_settings as check_selection
    from trainers.errors import UserError

    columns = data_cfg.columns
    if columns is not None and (not isinstance(columns, (dict, DictConfig)) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items())):
        raise UserError(f"data.columns={columns!r} must map the names a format expects to the file's own column "
                        f"names, e.g. data.columns='{{prompt: question, completion: answer}}' (empty: the file "
                        f"already uses the expected names).")
    template_file(data_cfg.chat_template)
    check_selection(data_cfg.eval_split, data_cfg.max_samples, has_eval)
