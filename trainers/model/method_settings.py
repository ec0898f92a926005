"""The PEFT methods' settings checked before launch, and the plans each runs under. No
torch here: the launcher refuses a bad method setting (and prints a dry run) without
importing the training side (tests/test_static_half.py)."""
from __future__ import annotations

import re

from omegaconf import ListConfig

from trainers.errors import UserError

# method.init_lora_weights values that run here; pissa_niter_N (N >= 1) is pissa's fast
# randomized SVD with N subspace iterations.
INIT_LORA_WEIGHTS = (True, "gaussian", "pissa", "olora")
INIT_REFUSED = {
    "loftq": (
        "LoftQ initialises the adapter so that a quantized base plus the adapter approximates the "
        "full-precision base: PEFT does it on its own path (replace_lora_weights_loftq on a loaded "
        "bitsandbytes 4-bit model, or a LoftQ-quantized base saved as a new model first), not as an "
        "initialisation of adapters on the base this launcher loads. Quantize the base with "
        "method=qlora and init_lora_weights=true, or start from PiSSA (method.init_lora_weights=pissa)"
    ),
    "eva": (
        "EVA initialises the adapter from the SVD of activations over a pass of training data "
        "(peft.initialize_lora_eva_weights with a data loader) before training, which this launcher "
        "does not run. Use method.init_lora_weights=pissa (from the weights, no data pass) or true"
    ),
    "corda": (
        "CorDA initialises the adapter from activation covariances collected over a data pass before "
        "training, which this launcher does not run. Use method.init_lora_weights=pissa or true"
    ),
}
# init_lora_weights values that read and rewrite the base weights (the residual W - B A)
FROM_BASE = re.compile(r"^(olora|pissa(_niter_[1-9][0-9]*)?)$")
# plans that hold every base weight whole on every rank when the adapter is initialised
WHOLE_BASE_PLANS = ("none", "ddp", "zero1", "zero2")
# AdaLoRA: its rank allocator reads every adapter weight and gradient whole and masks them in
# place on every rank, between the optimizer step and zero_grad
ADALORA_PLANS = ("none", "ddp")
# method.quantize=int8: bitsandbytes' Int8Params (int8 codes plus per-row scales in a
# separate SCB buffer) loaded whole by transformers; the plans that shard or load part by
# part build the base from NF4 placeholders and DeepSpeed casts the module's weights
INT8_PLANS = ("none", "ddp")


def init_from_base(m) -> bool:
    return m.peft == "lora" and isinstance(m.init_lora_weights, str) and bool(FROM_BASE.match(m.init_lora_weights))


def check_method(m) -> None:
    """The method's own settings (one paragraph per bad value)."""
    if m.peft in ("lora", "adalora", "vera"):
        names = m.modules_to_save
        if not isinstance(names, (list, tuple, ListConfig)) or not all(isinstance(n, str) for n in names):
            raise UserError(f"method.modules_to_save={names!r} must be a list of module names trained in full "
                            f"beside the adapter, e.g. [lm_head, embed_tokens], or [] for none.")
    if m.quantize == "int8" and m.peft != "lora":
        raise UserError(
            f"method.quantize=int8 with method={m.name} is refused: an 8-bit base is frozen int8 codes (bitsandbytes "
            f"LLM.int8), trained through LoRA-family adapters on top. Use method=lora (or dora, rslora, loraplus) "
            f"with method.quantize=int8, or method.quantize=null for method={m.name}.")
    if m.quantize and m.peft in ("adalora", "vera"):
        raise UserError(
            f"method.quantize={m.quantize} with method={m.name} is refused: this launcher's quantized bases are "
            f"built and exported for LoRA-family adapters only (PEFT's {m.name} layers on bitsandbytes weights are "
            f"untested here). Use method=qlora (or method=lora method.quantize=int8), or method.quantize=null "
            f"for method={m.name}.")
    if m.peft == "lora":
        check_init(m)
    if m.peft == "adalora":
        check_adalora(m)
    if m.peft == "vera" and (not isinstance(m.r, int) or isinstance(m.r, bool) or m.r < 1):
        raise UserError(f"method.r={m.r!r} must be a positive integer (VeRA's shared projection rank, e.g. 256).")


def check_init(m) -> None:
    value = m.init_lora_weights
    if value in INIT_REFUSED:
        raise UserError(f"method.init_lora_weights={value} is not run here: {INIT_REFUSED[value]}.")
    if value not in INIT_LORA_WEIGHTS and not (isinstance(value, str) and FROM_BASE.match(value)):
        raise UserError(f"method.init_lora_weights={value!r} is not accepted; use one of: true (PEFT's default, B = 0), "
                        f"gaussian, pissa, pissa_niter_N (N >= 1, e.g. pissa_niter_4), olora.")
    if init_from_base(m) and m.quantize:
        raise UserError(
            f"method.init_lora_weights={value} with method.quantize={m.quantize} (method={m.name}) is refused: "
            f"{value} replaces each base weight by its residual W - B A, which a quantized base would store "
            f"re-quantized, so the model would no longer start from the base's outputs (PEFT's own recipe "
            f"converts a full-precision PiSSA base first). Use method.init_lora_weights=true or gaussian with "
            f"a quantized base, or method=lora (unquantized) with {value}.")


def check_adalora(m) -> None:
    for key in ("init_r", "target_r", "deltaT", "total_step"):
        v = m[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"method.{key}={v!r} must be a positive integer (method=adalora).")
    for key in ("tinit", "tfinal"):
        v = m[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"method.{key}={v!r} must be a whole number of steps >= 0 (method=adalora).")
    if m.target_r > m.init_r:
        raise UserError(f"method.target_r={m.target_r} is above method.init_r={m.init_r}: AdaLoRA prunes ranks from "
                        f"init_r down to an average of target_r; use target_r <= init_r.")
    if m.tinit >= m.total_step - m.tfinal:
        raise UserError(
            f"method.tinit={m.tinit} and method.tfinal={m.tfinal} leave no step to allocate ranks in "
            f"(method.total_step={m.total_step}, train.max_steps by default): AdaLoRA needs tinit < total_step - "
            f"tfinal. Lower tinit or tfinal, or train more steps.")
    for key in ("beta1", "beta2"):
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise UserError(f"method.{key}={v!r} must be a number between 0 and 1 (an EMA factor, e.g. 0.85).")
    v = m.orth_reg_weight
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise UserError(f"method.orth_reg_weight={v!r} must be a number >= 0 (the orthogonality term's weight, "
                        f"e.g. 0.5; 0 turns it off).")
    if not 0 <= m.dropout < 1:
        raise UserError(f"method.dropout={m.dropout!r} must be in [0, 1).")


def plan_refusal(cfg, plan: str) -> str | None:
    """Why `plan` cannot train this method's settings (None if it can)."""
    m = cfg.method
    if m.peft == "adalora" and plan not in ADALORA_PLANS:
        return (
            f"method={m.name} is refused under parallel={plan}: AdaLoRA's rank allocator (PEFT's "
            f"update_and_allocate) reads every adapter weight and its gradient whole and masks them in place "
            f"on every rank after each optimizer step, while parallel={plan} "
            + ("shards them (or keeps its own gradient buffers and master weights)" if plan != "pipeline" else
               "gives each stage only its own layers, so each would allocate its own budget")
            + f". Use parallel=ddp for method={m.name} (every rank holds the whole adapter), or method=lora "
              f"under parallel={plan}.")
    if m.quantize == "int8" and plan not in INT8_PLANS:
        return (
            f"method={m.name} with method.quantize=int8 is refused under parallel={plan}: an 8-bit base is "
            f"bitsandbytes' Int8Params (int8 codes with their row scales in a separate buffer), which "
            f"transformers loads whole; parallel={plan} "
            + ("shards parameters (FSDP2/ZeRO-3 would split codes from their scales)" if plan in ("fsdp2", "zero3", "zero3_offload")
               else "builds each stage's share from 4-bit placeholders" if plan == "pipeline"
               else "hands every weight to DeepSpeed, which casts and flattens them")
            + f". Use parallel=ddp for method.quantize=int8, or method=qlora (4-bit NF4) under parallel={plan}.")
    if init_from_base(m) and plan not in WHOLE_BASE_PLANS:
        return (
            f"method={m.name} with method.init_lora_weights={m.init_lora_weights} is refused under "
            f"parallel={plan}: it computes each adapter from the whole base weight (SVD or QR) and rewrites "
            f"that weight, while parallel={plan} loads the base already sharded over ranks. Use parallel=ddp, "
            f"zero1 or zero2 with it, or method.init_lora_weights=true (or gaussian) under parallel={plan}.")
    return None
