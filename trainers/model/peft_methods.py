"""Method name -> peft configuration. One table, so adding a method is one entry."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from trainers.errors import UserError


def _target_modules(value):
    if value is None or isinstance(value, str):
        return value
    return list(value)


def lora_config(m, task_type="CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=_target_modules(m.target_modules),
        use_dora=bool(m.use_dora),
        use_rslora=bool(m.use_rslora),
        bias="none",
    )


def prefix_config(m, task_type="CAUSAL_LM"):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=m.num_virtual_tokens)


def prompt_config(m, task_type="CAUSAL_LM"):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=m.num_virtual_tokens)


def ia3_config(m, task_type="CAUSAL_LM"):
    from peft import IA3Config

    kw = {}
    if m.target_modules is not None:
        kw["target_modules"] = _target_modules(m.target_modules)
        kw["feedforward_modules"] = _target_modules(m.feedforward_modules) or []
    return IA3Config(task_type=task_type, **kw)


PEFT_BUILDERS = {"lora": lora_config, "prefix": prefix_config, "prompt": prompt_config, "ia3": ia3_config}

# Methods whose adapters change weights (mergeable) vs. add virtual tokens (not).
MERGEABLE = {"lora", "ia3"}
# Virtual-token methods ignore position_ids, so packed rows would attend across rows.
SUPPORTS_PACKING = {None, "lora", "ia3"}


def apply_method(model: torch.nn.Module, m, task_type: str = "CAUSAL_LM"):
    """`task_type` is PEFT's: SEQ_CLS (a reward model) also trains the fresh `score` head
    in full, PEFT's modules_to_save, beside the adapter."""
    if m.peft is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if m.peft not in PEFT_BUILDERS:
        raise UserError(f"method.peft={m.peft!r} is unknown; available: {', '.join(PEFT_BUILDERS)}.")
    from peft import get_peft_model

    for p in model.parameters():
        # Frozen weights stay in the dtype they were loaded in: bf16 beside a 4-bit base.
        # (peft's prepare_model_for_kbit_training would upcast embeddings, lm_head and norms
        # to fp32: 4 GiB more on an 8B model, for norms that compute in fp32 anyway.)
        p.requires_grad_(False)
    return get_peft_model(model, PEFT_BUILDERS[m.peft](m, task_type))


def method_summary(m) -> str:
    keys = [k for k in ("r", "alpha", "dropout", "num_virtual_tokens", "loraplus_lr_ratio") if k in m and m[k] is not None]
    extra = ", ".join(f"{k}={OmegaConf.select(m, k)}" for k in keys)
    return f"{m.name}" + (f" ({extra})" if extra else "")
