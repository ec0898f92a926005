"""Method name -> peft configuration. One table, so adding a method is one entry."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from trainers.errors import UserError


def _target_modules(value):
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _modules_to_save(m, task_type):
    """Modules trained in full beside the adapter (PEFT's modules_to_save): the user's list;
    a reward model's `score` head PEFT adds itself for SEQ_CLS."""
    names = list(m.modules_to_save or [])
    return names or None


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
        # PiSSA/OLoRA start from the base weights, which a skeleton does not have yet:
        # the adapter is built with the default init and `init_from_base` redoes it once
        # the weights are loaded (trainers/model/load.py ModelSource.load).
        init_lora_weights=True if init_from_base_weights(m) else init_lora_weights(m),
        modules_to_save=_modules_to_save(m, task_type),
    )


def adalora_config(m, task_type="CAUSAL_LM"):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type=task_type,
        init_r=m.init_r,
        target_r=m.target_r,
        tinit=m.tinit,
        tfinal=m.tfinal,
        deltaT=m.deltaT,
        beta1=m.beta1,
        beta2=m.beta2,
        orth_reg_weight=m.orth_reg_weight,
        total_step=m.total_step,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=_target_modules(m.target_modules),
        bias="none",
        modules_to_save=_modules_to_save(m, task_type),
    )


def vera_config(m, task_type="CAUSAL_LM"):
    from peft import VeraConfig

    return VeraConfig(
        task_type=task_type,
        r=m.r,
        target_modules=_target_modules(m.target_modules),
        projection_prng_key=m.projection_prng_key,
        save_projection=True,
        vera_dropout=m.dropout,
        d_initial=m.d_initial,
        bias="none",
        modules_to_save=_modules_to_save(m, task_type),
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


PEFT_BUILDERS = {"lora": lora_config, "prefix": prefix_config, "prompt": prompt_config, "ia3": ia3_config,
                 "adalora": adalora_config, "vera": vera_config}

# Methods whose adapters change weights (mergeable) vs. add virtual tokens (not).
MERGEABLE = {"lora", "ia3", "adalora", "vera"}
# Virtual-token methods ignore position_ids, so packed rows would attend across rows.
SUPPORTS_PACKING = {None, "lora", "ia3", "adalora", "vera"}


def init_lora_weights(m):
    """method.init_lora_weights as PEFT takes it (true, gaussian, pissa, pissa_niter_N, olora)."""
    return m.init_lora_weights if m.peft == "lora" else True


def init_from_base_weights(m) -> bool:
    """Whether the adapter starts from the base weights and rewrites them (PiSSA, OLoRA)."""
    value = init_lora_weights(m)
    return isinstance(value, str) and (value == "olora" or value.startswith("pissa"))


def init_from_base(model: torch.nn.Module, m, seed: int) -> None:
    """PiSSA / OLoRA on the loaded base weights, by PEFT's own per-layer initialisers: each
    LoRA layer's A and B become the base weight's principal (PiSSA: SVD) or QR (OLoRA)
    factors and its base weight the residual W - scale B A. pissa_niter_N's randomized SVD
    draws from a generator seeded per layer (run seed, layer name), so a resume and the
    export's merge (trainers/model/export.py) redo exactly the same residual."""
    if not init_from_base_weights(m):
        return
    for name, module in model.named_modules():
        init_layer_from_base(module, name, m, seed)


def init_layer_from_base(module: torch.nn.Module, name: str, m, seed: int) -> bool:
    """`module`'s adapter re-initialised from its (loaded) base weight; False if it has none."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return False
    value = init_lora_weights(m)
    for adapter in module.lora_A:
        if value == "olora":
            module.olora_init(adapter)
        else:
            import zlib

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                module.pissa_init(adapter, value)
    return True


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
    keys = [k for k in ("r", "init_r", "target_r", "alpha", "dropout", "num_virtual_tokens", "loraplus_lr_ratio")
            if k in m and m[k] is not None]
    extra = ", ".join(f"{k}={OmegaConf.select(m, k)}" for k in keys)
    return f"{m.name}" + (f" ({extra})" if extra else "")
