"""End-of-run export: the adapter in PEFT format and a merged HF model (safetensors).

The full state is gathered to rank 0's CPU by the plan (never to one accelerator), then
rank 0 writes it. For QLoRA the 4-bit base is dequantized before merging, so the merged
model computes what the trained (quantized base + adapter) model computed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainers.peft_methods import MERGEABLE

log = logging.getLogger(__name__)


def dequantized_base(model_cfg, method_cfg):
    """The base model as trained, in fp32 on CPU: 4-bit layers replaced by their
    dequantized nn.Linear equivalents."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight

    from trainers.model import load_base_model

    model = load_base_model(model_cfg, method_cfg, torch.device("cpu"))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = dequantize_module_weight(child).float().cpu()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.float().cpu()
                setattr(module, child_name, linear)
    # Drop the quantized markers first: transformers refuses .float() on a quantized model.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    model.float()
    return model


def plain_base(model_cfg, method_cfg):
    if method_cfg.quantize:
        return dequantized_base(model_cfg, method_cfg)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_cfg.path, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code
    )


def export(plan, cfg, tokenizer, run_dir: Path) -> dict:
    """Write export/adapter and export/merged; returns what was written (rank 0)."""
    out = Path(run_dir) / "export"
    method = cfg.method
    written: dict = {}
    if method.peft is None:
        sd = plan.full_state_dict(trainable_only=False)
        if plan.env.is_main:
            merged = out / "merged"
            plan.inner.save_pretrained(merged, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(merged)
            written["merged"] = str(merged)
        return written

    sd = plan.full_state_dict(trainable_only=True)
    if not plan.env.is_main:
        return written
    adapter = out / "adapter"
    plan.inner.save_pretrained(adapter, state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(adapter)
    written["adapter"] = str(adapter)
    if method.peft not in MERGEABLE:
        written["merged_skipped"] = f"{method.name} adds virtual tokens, not weight deltas: nothing to merge"
        log.info("export: %s", written["merged_skipped"])
        return written
    from peft import PeftModel

    base = plain_base(cfg.model, method)
    merged_model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = out / "merged"
    merged_model.save_pretrained(merged, safe_serialization=True)
    tokenizer.save_pretrained(merged)
    written["merged"] = str(merged)
    return written
