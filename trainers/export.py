"""End-of-run export: the adapter in PEFT format and a merged HF model (safetensors).

The trained state is gathered to rank 0's CPU by the plan (never to one accelerator).
For adapters that is small; the merged model is then written file by file: each of the
base checkpoint's safetensors files is read, the adapter deltas of its tensors are merged
by PEFT's own `merge()` on the module that owns them, and the file is written before the
next one is read. Rank 0 never holds the trained model and a second full base at once:
its peak is one checkpoint file (in fp32) plus the adapters.

For QLoRA each 4-bit-trained weight goes through the same NF4 quantize/dequantize as
training saw (and the other weights through bf16, as transformers loads them), so the merged model computes what the trained (quantized base + adapter)
model computed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from trainers.peft_methods import MERGEABLE

log = logging.getLogger(__name__)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What a bf16 weight becomes once bitsandbytes has stored it in NF4 with double
    quantization (trainers.model.quantization_config), back in fp32."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    return bnbf.dequantize_4bit(packed, state).float()


def quantized_keys(model: torch.nn.Module) -> set[str]:
    """Checkpoint keys of the weights transformers stores in 4 bits: every nn.Linear but the
    output embedding (transformers' get_keys_to_not_convert)."""
    from trainers.weights import checkpoint_key

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = set()
    for name, module in model.named_modules():
        if module is out_emb or not isinstance(module, torch.nn.Linear):
            continue
        if ".lora_" in name:  # the adapters' own linears
            continue
        keys.add(checkpoint_key(f"{name}.weight"))
    return keys


def merged_weight(module: torch.nn.Module, base_weight: torch.Tensor) -> torch.Tensor:
    """`base_weight` with `module`'s adapter merged in by PEFT itself (LoRA, DoRA, rsLoRA,
    IA3 alike); the module gets its placeholder back so nothing accumulates."""
    from trainers.weights import make_placeholder

    base = module.get_base_layer()
    placeholder = base.weight
    base.weight = torch.nn.Parameter(base_weight, requires_grad=False)
    module.merge(safe_merge=True)
    merged = base.weight.data
    base.weight = make_placeholder(placeholder.shape, placeholder.dtype)
    module.merged_adapters = []
    return merged


def merge_streaming(cfg, adapter_sd: dict[str, torch.Tensor], out: Path) -> None:
    """Write base + adapter merged, one base checkpoint file at a time."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from trainers.model import ModelSource
    from trainers.weights import checkpoint_key, checkpoint_names

    method = OmegaConf.merge(cfg.method, {"quantize": None})
    source = ModelSource(cfg.model, method, torch.float32, cfg.seed)
    model = source.skeleton()
    # (a 4-bit base adds its quantization state under .base_layer.: not adapter weights)
    trained = {k: v for k, v in adapter_sd.items() if ".base_layer." not in k}
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise RuntimeError(f"adapter keys the model does not have: {unexpected[:3]}")
    files = source.files()
    names = checkpoint_names(model, files)  # parameter name -> checkpoint key
    owner = {}  # checkpoint key -> the PEFT layer whose base weight it is
    for mname, module in model.named_modules():
        if hasattr(module, "merge") and hasattr(module, "get_base_layer"):
            owner[checkpoint_key(f"{mname}.base_layer.weight")] = module
    four_bit = quantized_keys(model) if cfg.method.get("quantize") else set()
    by_file: dict[Path, list[str]] = {}
    for key in files.keys():
        by_file.setdefault(files.file_of[key], []).append(key)
    wanted = set(names.values())
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, (path, keys) in enumerate(sorted(by_file.items())):
        tensors = {}
        for key in keys:
            if key not in wanted:
                continue  # e.g. a tied lm_head saved twice: the model does not own it
            value = files.read(key, torch.float32)
            if key in four_bit:
                value = nf4_roundtrip(value)
            elif cfg.method.get("quantize"):  # the 4-bit model holds the rest in bf16
                value = value.to(torch.bfloat16).float()
            module = owner.get(key)
            if module is not None:
                value = merged_weight(module, value)
            tensors[key] = value.contiguous()
        # Hugging Face's names: one file is model.safetensors (no index), several are numbered
        name = ("model.safetensors" if len(by_file) == 1
                else f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors")
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(by_file) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = source.config()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(out)
    source.close()


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
    merged = out / "merged"
    merge_streaming(cfg, sd, merged)
    tokenizer.save_pretrained(merged)
    written["merged"] = str(merged)
    return written
