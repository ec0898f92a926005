"""model.special_tokens: a run's own pad/eos tokens and added special tokens.

A user adding a chat marker or a tool-call token expects it to be one id, learned, and
still there in the exported model. So the tokens go into the tokenizer every process loads
(trainers/model/load.load_tokenizer), the model's embedding and LM head grow to the new
vocabulary once the base weights are loaded and before PEFT wraps the model (new rows drawn
as transformers' mean_resizing draws them), and the model's and generation config's pad/eos
ids follow, so generation stops at the new eos. Under a PEFT method the grown rows only learn
through method.modules_to_save, which is why both modules must be listed.

The checks run before launch without torch (tests/test_static_half.py); transformers is
imported only by the runtime functions.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from trainers.errors import UserError

KEYS = ("pad_token", "eos_token", "additional")
# Growing the vocabulary resizes the embedding and LM head whole, with rows drawn from the
# statistics of every existing row: the plans that hold every weight whole on every rank.
GROW_PLANS = ("none", "ddp")
# The PEFT methods with modules_to_save (trainers/model/peft_methods.py)
TRAINS_MODULES = ("lora", "adalora", "vera")
EMBEDDINGS = ("embed_tokens", "lm_head")
EXAMPLE = "model.special_tokens='{pad_token: \"<|pad|>\", eos_token: \"<|eot|>\", additional: [\"<tool>\"]}'"


def _full(spec) -> dict:
    """The spec with every key (a user gives only those they set)."""
    return {k: spec[k] if k in spec else None for k in KEYS}


def _tokens(spec) -> list[str]:
    """Every token string the spec names."""
    spec = _full(spec)
    out = [spec[k] for k in ("pad_token", "eos_token") if spec[k] is not None]
    return out + list(spec["additional"] or [])


def _known_tokens(model_path: str) -> set[str] | None:
    """The local tokenizer.json's vocabulary and added tokens (None when there is none to read:
    a hub id, or another tokenizer format; the runtime then decides)."""
    path = Path(str(model_path)).expanduser() / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    model = data["model"] if "model" in data else {}
    vocab = (model["vocab"] if "vocab" in model else None) or {}
    known = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}
    return known | {t["content"] for t in (data["added_tokens"] if "added_tokens" in data else None) or []}


def new_tokens(spec, model_path: str) -> list[str]:
    """The tokens the spec adds to the vocabulary (every one, when the vocabulary cannot be
    read without loading the tokenizer)."""
    known = _known_tokens(model_path)
    return [t for t in _tokens(spec) if known is None or t not in known]


def check(model_cfg, method, plan: str) -> None:
    """model.special_tokens before launch: its shape, and whether the run can grow the
    vocabulary with this plan and method."""
    spec = model_cfg.special_tokens
    if spec is None:
        return
    if not isinstance(spec, (dict, DictConfig)) or set(spec) - set(KEYS):
        raise UserError(f"model.special_tokens={spec!r} is not accepted: give a mapping with the keys "
                        f"{', '.join(KEYS)} (each optional), e.g. {EXAMPLE}, or null for the tokenizer's own.")
    spec = _full(spec)
    for key in ("pad_token", "eos_token"):
        value = spec[key]
        if value is not None and (not isinstance(value, str) or not value):
            raise UserError(f"model.special_tokens.{key}={value!r} must be a token string (e.g. \"<|pad|>\") or null.")
    extra = spec["additional"]
    if extra is not None and (not isinstance(extra, (list, tuple, ListConfig))
                              or not all(isinstance(t, str) and t for t in extra)):
        raise UserError(f"model.special_tokens.additional={extra!r} must be a list of token strings "
                        f"(e.g. [\"<tool>\", \"</tool>\"]) or null.")
    added = new_tokens(spec, model_cfg.path)
    if not added:
        return
    if plan not in GROW_PLANS:
        raise UserError(
            f"model.special_tokens adds {added} to the vocabulary, which parallel={plan} cannot do: the "
            f"embedding and LM head are resized whole, their new rows drawn from the mean and covariance of "
            f"every existing row, before the plan shards them. Use parallel={' or parallel='.join(GROW_PLANS)}, "
            f"or only tokens the tokenizer already has.")
    if method.quantize:
        raise UserError(
            f"model.special_tokens adds {added} with method.quantize={method.quantize}: a quantized base keeps "
            f"its embedding and LM head frozen in bf16, so the new rows could not learn. Use method.quantize=null.")
    if method.peft is None:
        return
    if method.peft not in TRAINS_MODULES:
        raise UserError(
            f"model.special_tokens adds {added} with method={method.name}, which cannot train the new "
            f"embedding rows (it has no modules_to_save). Use method=lora (or adalora, vera) with "
            f"method.modules_to_save=[embed_tokens,lm_head], or method=full.")
    missing = [m for m in EMBEDDINGS if m not in list(method.modules_to_save)]
    if missing:
        raise UserError(
            f"model.special_tokens adds {added} with method={method.name} and method.modules_to_save="
            f"{list(method.modules_to_save)}: the new tokens' embedding and LM head rows start untrained and an "
            f"adapter cannot train them. Add method.modules_to_save=[embed_tokens,lm_head] (missing: "
            f"{', '.join(missing)}).")


def apply_to_tokenizer(tokenizer, spec) -> int:
    """The spec's tokens set on `tokenizer`; returns how many the vocabulary gained."""
    if spec is None:
        return 0
    spec = _full(spec)
    special = {k: spec[k] for k in ("pad_token", "eos_token") if spec[k] is not None}
    if spec["additional"]:
        special["extra_special_tokens"] = list(spec["additional"])  # transformers 5: additional_special_tokens
    return tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)


def apply_to_model(model, tokenizer, seed: int) -> None:
    """The transformers model (weights loaded, not yet wrapped by PEFT) grown to the
    tokenizer's vocabulary, and its config's and generation config's pad/eos ids set to the
    tokenizer's."""
    from trainers.rng import seed_everything

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        seed_everything(seed)  # mean_resizing draws the new rows: the same on every rank and resume
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
