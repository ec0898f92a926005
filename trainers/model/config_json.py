"""The architecture a run will train, as plain values, for the estimate and pre-launch checks.

A local `model.path` is described by its own config.json, read as JSON: `model=8b
model.path=DIR` with a Qwen or Mistral in DIR is estimated and checked as that model, not
as the preset's Llama, and nothing here imports transformers (the static half of a launch
stays fast). A hub id falls back to the preset's `model.arch` (no network before launch).
"""
from __future__ import annotations

import json
from pathlib import Path

from trainers.errors import UserError

# Fields the estimate and the pipeline's checks read; a multimodal config keeps them under
# text_config.
FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def local_config_json(model_cfg) -> dict | None:
    """config.json of a local model.path (None for a hub id). Refuses one that is not a JSON
    object or names no model_type, which transformers could not load either."""
    path = Path(str(model_cfg.path)).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model.path={str(model_cfg.path)!r}: {path} is not readable JSON ({e}). "
                        f"Point model.path at a Hugging Face model folder (config.json, safetensors, tokenizer).") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str) or not values["model_type"]:
        raise UserError(
            f"model.path={str(model_cfg.path)!r}: {path} names no model_type, so no model class can be "
            f"chosen for it (transformers reads `\"model_type\": \"llama\"`, \"qwen2\", \"mistral\", ...). "
            f"Point model.path at a Hugging Face model folder saved by save_pretrained, or add its model_type.")
    return values


def architecture(model_cfg) -> dict | None:
    """The model's config values: a local config.json, else the preset's model.arch, else None."""
    values = local_config_json(model_cfg)
    if values is None:
        if "arch" not in model_cfg:
            return None
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(model_cfg.arch, resolve=True)
    text = values.get("text_config")
    if isinstance(text, dict) and not all(k in values for k in FIELDS):
        values = {**text, "model_type": values["model_type"]}
    missing = [k for k in FIELDS if k not in values]
    if missing:
        raise UserError(f"model.path={str(model_cfg.path)!r}: its config lacks {', '.join(missing)}, which the "
                        f"memory estimate and the plans' checks need (a decoder-only language model has them).")
    return values
