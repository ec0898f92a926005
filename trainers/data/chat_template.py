"""data.chat_template: a chat template set on (or replacing) the tokenizer's, by the name of
one the project ships (trainers/data/templates/*.jinja, each as its model family publishes
it) or a jinja file of the user's. Plain Python: the launcher checks the value before
anything loads; trainers/model/load.load_tokenizer applies it, so every process (the
launcher's tokenization, the workers' evaluation and generation, the export) renders
conversations with the same template, and the token cache's key (the tokenizer's
fingerprint covers its template) changes with it."""
from __future__ import annotations

from pathlib import Path

from trainers.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"


def shipped() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def template_file(value) -> Path | None:
    """The jinja file data.chat_template names (None: keep the tokenizer's), or a UserError."""
    if value is None:
        return None
    if isinstance(value, str) and value in shipped():
        return TEMPLATES / f"{value}.jinja"
    if isinstance(value, str) and value.strip() and Path(value).expanduser().is_file():
        return Path(value).expanduser()
    raise UserError(
        f"data.chat_template={value!r} is neither a shipped template ({', '.join(shipped())}) nor a jinja file "
        f"that exists. Give one of those names or the path of a file holding a chat template "
        f"(transformers' apply_chat_template syntax), or null for the tokenizer's own."
    )


def apply(tokenizer, value) -> None:
    path = template_file(value)
    if path is not None:
        tokenizer.chat_template = path.read_text()
