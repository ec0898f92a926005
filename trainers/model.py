"""Build the model a run trains: load (optionally 4-bit), then apply the PEFT method.

Plans receive the result and only wrap it; nothing here knows about parallelism except
that a sharded plan may ask for the model on CPU first.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trainers.errors import UserError
from trainers.peft_methods import apply_method

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 on a GPU that supports it, fp32 on CPU unless asked."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in table:
        raise UserError(f"train.precision={precision!r} is not supported; use auto, fp32 or bf16.")
    return table[precision]


def _check_path(path: str) -> None:
    looks_local = path.startswith(("/", ".", "~")) or Path(path).exists()
    if looks_local and not (Path(path).expanduser() / "config.json").exists():
        raise UserError(
            f"model.path={path!r} is not a Hugging Face model directory (no config.json). "
            f"Point it at a folder written by save_pretrained, or a hub id such as "
            f"meta-llama/Llama-3.2-1B."
        )


def load_tokenizer(model_cfg):
    _check_path(model_cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"Could not load a tokenizer from model.path={model_cfg.path!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        log.warning("the tokenizer has no chat template: only prompt/completion rows can be used")
    return tok


def load_config(model_cfg):
    _check_path(model_cfg.path)
    try:
        return AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"Could not load a model config from model.path={model_cfg.path!r}: {e}") from None


def quantization_config(method_cfg):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights in place on avx512-bf16 CPUs during no-grad
    forwards; under FSDP2 the next all-gather then brings back unpacked data and every
    later forward is silently wrong. Turn the repacking off before any eval."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_base_model(model_cfg, method_cfg, device: torch.device):
    """The pre-trained model, on `device`, in fp32 (4-bit NF4 for quantized methods)."""
    kwargs = dict(
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    _check_path(model_cfg.path)
    try:
        if method_cfg.quantize == "nf4":
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.path,
                quantization_config=quantization_config(method_cfg),
                device_map={"": device.index if device.type == "cuda" else "cpu"},
                dtype=torch.bfloat16,
                **kwargs,
            )
            disable_cpu_weight_repacking(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=torch.float32, **kwargs)
            model.to(device)
    except OSError as e:
        raise UserError(f"Could not load model weights from model.path={model_cfg.path!r}: {e}") from None
    model.train()  # from_pretrained returns eval mode (dropout off; see bnb note above)
    return model


def build_model(model_cfg, method_cfg, device: torch.device):
    model = load_base_model(model_cfg, method_cfg, device)
    model = apply_method(model, method_cfg)
    model.train()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size,
    ZeRO-3-partitioned ones (DeepSpeed leaves them empty) as their full size."""
    trainable = total = 0
    # An FSDP2-sharded 4-bit weight (a DTensor) has no quant_state; its Linear4bit keeps it.
    module_states = {id(m.weight): m.quant_state for m in model.modules()
                     if getattr(m, "quant_state", None) is not None and isinstance(getattr(m, "weight", None), torch.Tensor)}
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        state = getattr(p, "quant_state", None)
        state = module_states.get(id(p)) if state is None else state
        if state is not None:
            n = int(torch.Size(state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
