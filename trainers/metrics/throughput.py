"""Training efficiency, not only speed: tokens/s, achieved TFLOP/s per device and MFU.

FLOPs per token are counted the way torchtitan counts them (get_nparams_and_flops): 6 per
non-embedding parameter (forward 2, backward 4) plus 12 x layers x heads x head_dim x
sequence length for attention scores and values. It is the conventional model FLOPs
figure: a frozen base under LoRA still counts 6N although its weight gradients are never
computed, and activation-checkpointing recomputation is not counted, so MFU compares
runs and hardware on the same footing rather than measuring the kernels' own work.
MFU needs the device's peak: a table of dense bf16 peaks of known GPUs (torchtitan's), or
train.peak_tflops; on CPU, without train.peak_tflops, it is left out.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("train")

# Dense bf16 tensor-core peak per device, TFLOP/s; more specific names first.
PEAK_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H20", 148.0),
    ("B200", 2250.0), ("GB200", 2500.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("MI355X", 2500.0), ("MI325X", 1300.0), ("MI300X", 1300.0), ("MI250X", 191.5),
)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def flops_per_token(model_config, n_params: int, seq_len: int) -> float:
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    embedding = model_config.vocab_size * model_config.hidden_size
    return 6.0 * (n_params - embedding) + 12.0 * model_config.num_hidden_layers * heads * head_dim * seq_len


class Throughput:
    def __init__(self, cfg, device: torch.device, n_params: int, world_size: int):
        self.world_size = world_size
        self.peak = cfg.train.peak_tflops or device_peak_tflops(device)
        try:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
            model_config = getattr(model_config, "text_config", None) or model_config
            self.per_token = flops_per_token(model_config, n_params, int(cfg.data.max_seq_len))
        except Exception as e:  # noqa: BLE001 - an exotic config only costs the FLOPs figure
            log.info("throughput: no FLOPs count for this model (%s); logging tokens_per_s only", e)
            self.per_token = None

    def of(self, tokens: float, seconds: float) -> dict:
        """One step's figures from its global target-token count and duration."""
        out = {"tokens_per_s": tokens / seconds}
        if self.per_token is None:
            return out
        out["tflops"] = self.per_token * tokens / seconds / self.world_size / 1e12
        if self.peak:
            out["mfu"] = out["tflops"] / self.peak
        return out
