"""Name -> "module:attribute" tables, imported on first use (DeepSpeed and submitit take
seconds to import, and most runs need neither)."""
from __future__ import annotations

import importlib

from trainers.errors import UserError


def resolve(registry: dict[str, str], name: str, key: str):
    if name not in registry:
        raise UserError(f"{key}={name!r} is not known; available: {', '.join(registry)}.")
    module, attribute = registry[name].split(":")
    return getattr(importlib.import_module(module), attribute)
