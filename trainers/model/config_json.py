"""The model's architecture as the launcher's checks read it, without transformers: the
config.json of a local `model.path` when there is one (a user's Qwen or Mistral is checked
as itself, even under a Llama preset), else the preset's `model.arch`. None for a hub id
with no preset: nothing can be read offline, and the workers' own load checks it."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from trainers.errors import UserError


def model_config_values(model_cfg) -> dict | None:
    path = Path(str(model_cfg.path)).expanduser() / "config.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"model.path={str(model_cfg.path)!r}: its config.json is unreadable ({e}).") from None
        if not isinstance(values, dict):
            raise UserError(f"model.path={str(model_cfg.path)!r}: its config.json is not a JSON object.")
        return values
    arch = model_cfg.get("arch")
    if arch:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(arch, resolve=True)
    return None


def config_for_checks(model_cfg) -> SimpleNamespace | None:
    """Attribute access like a transformers config (`config.num_hidden_layers`); missing
    keys read as None."""
    values = model_config_values(model_cfg)
    if values is None:
        return None
    return SimpleNamespace(**{"model_type": None, "layer_types": None, "tie_word_embeddings": False, **values})
