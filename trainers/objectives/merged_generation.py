"""GRPO's rollout through merged LoRA weights (objective.merged_generation).

Decoding runs one short forward per token, so a LoRA linear's three matmuls (base, A, B)
and PEFT's per-call bookkeeping cost more than its FLOPs say: a third of the generate call
on the bundled model. Inside `merged_linears`, each plain LoRA linear instead computes
x @ (W + scale * B @ A)^T + b, one matmul, from a merged copy built on entry and freed on
exit. The module's own weights are never written: PEFT's merge_adapter / unmerge_adapter
(what TRL does before pushing weights to vLLM) would not give W back bit for bit, so the
frozen base would drift step after step (by an ulp of W + delta each time: 0.4 % of a bf16
weight) and a relaunch, which reads the clean base, would not resume exactly.

The copy costs the adapted linears' weights once more while the rollout runs (the memory
estimate counts it, and `objective.merged_generation=false` turns it off). It is built only
where every rank holds whole parameters (none, ddp, zero1, zero2): under zero3 and fsdp2 a
layer's weights exist only while the plan gathers them, and merging them would hold the
whole model at once; there, and for DoRA, quantized bases and the other PEFT methods, the
rollout goes through the adapter as before. The completions differ from the adapter path's
only by float rounding (one matmul instead of a sum of two).
"""
from __future__ import annotations

import contextlib

import torch


def mergeable(module) -> bool:
    """A plain LoRA linear, one active adapter, whole (not sharded, not quantized) weights."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or module.merged or module.disable_adapters:
        return False
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.lora_A or active[0] in module.lora_variant:
        return False
    w = module.base_layer.weight
    return (type(module.base_layer) is torch.nn.Linear and type(w.data) is torch.Tensor
            and not hasattr(w, "ds_id") and w.dim() == 2)


@contextlib.contextmanager
def merged_linears(model, enabled: bool = True):
    """Inside: every mergeable LoRA linear of `model` forwards through W + delta (see above).
    Yields how many linears were merged."""
    if not enabled:
        yield 0
        return
    patched = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if mergeable(module):
                    base = module.base_layer
                    weight = base.weight + module.get_delta_weight(module.active_adapters[0]).to(base.weight.dtype)
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = _merged_forward(weight, base.bias)
        yield len(patched)
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _merged_forward(weight: torch.Tensor, bias):
    def forward(x, *args, **kwargs):
        return torch.nn.functional.linear(x, weight, bias)
    return forward
