"""End-of-run export: the adapter in PEFT format and a merged HF model (safetensors).

Nothing is ever gathered whole: the plan hands the trained state to rank 0's CPU one
tensor at a time (`Plan.export_tensors`), and `SafetensorsShards` writes it out in files of
at most `train.export_shard_mib`, so rank 0's peak is one file's worth plus one tensor, whatever
the model's size. A full fine-tune is written that way. For adapters the adapter state is
small; the merged model is then built tensor by tensor: each base weight is read from the
checkpoint, its adapter delta merged by PEFT's own `merge()` on the module that owns it,
and it goes to the same writer. Rank 0 never holds the trained model and a second full
base at once.

For QLoRA each 4-bit-trained weight goes through the same NF4 quantize/dequantize as
training saw (and the other weights through bf16, as transformers loads them), so the merged model computes what the trained (quantized base + adapter)
model computed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainers.files import write_json
from trainers.model.peft_methods import MERGEABLE, init_from_base_weights

log = logging.getLogger(__name__)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What a bf16 weight becomes once bitsandbytes has stored it in NF4 with double
    quantization (trainers.model.load.quantization_config), back in fp32."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    return bnbf.dequantize_4bit(packed, state).float()


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What a bf16 weight becomes once bitsandbytes has stored it as LLM.int8's row-wise
    absmax int8 (Int8Params), back in fp32: the weight the 8-bit base multiplies with."""
    import bitsandbytes.functional as bnbf

    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.bfloat16).to(torch.float16))
    return codes.float() * scales.float().unsqueeze(1) / 127


ROUNDTRIPS = {"nf4": nf4_roundtrip, "int8": int8_roundtrip}


def quantized_keys(model: torch.nn.Module) -> set[str]:
    """Checkpoint keys of the weights transformers stores in 4 bits: every nn.Linear but the
    output embedding (transformers' get_keys_to_not_convert)."""
    from trainers.model.weights import checkpoint_key

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = set()
    for name, module in model.named_modules():
        if module is out_emb or not isinstance(module, torch.nn.Linear):
            continue
        if ".lora_" in name:  # the adapters' own linears
            continue
        keys.add(checkpoint_key(f"{name}.weight"))
    return keys


def merged_weight(module: torch.nn.Module, base_weight: torch.Tensor, reinit=None) -> torch.Tensor:
    """`base_weight` with `module`'s adapter merged in by PEFT itself (LoRA, DoRA, rsLoRA,
    IA3, AdaLoRA, VeRA alike); the module gets its placeholder back so nothing accumulates.
    `reinit(module)` (PiSSA/OLoRA): the training started from the residual of this weight,
    so it is redone first (the trained factors are kept) and the merge lands on that residual."""
    from trainers.model.weights import make_placeholder

    base = module.get_base_layer()
    placeholder = base.weight
    base.weight = torch.nn.Parameter(base_weight, requires_grad=False)
    if reinit is not None:
        trained = {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in f".{k}"}
        reinit(module)
        module.initial_factors = {k: v.detach().clone() for k, v in module.state_dict().items() if k in trained}
        module.load_state_dict(trained, strict=False)
    module.merge(safe_merge=True)
    merged = base.weight.data
    base.weight = make_placeholder(placeholder.shape, placeholder.dtype)
    module.merged_adapters = []
    return merged


def as_plain_lora(inner, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]):
    """A PiSSA/OLoRA adapter as a plain LoRA adapter on the original base, PEFT's own
    conversion (LoraModel.subtract_mutated_init): dW = B A - B0 A0 = [B | -B0] [A ; A0], so
    rank 2r with alpha doubled (alpha x sqrt 2 under rsLoRA) keeps the scale. Returns
    (PEFT-format state dict, its config)."""
    import copy
    import math

    from peft.utils import get_peft_model_state_dict

    out = {}
    for key, value in trained.items():
        if ".lora_A." in key:
            out[key] = torch.cat([value, initial[key]], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -initial[key]], dim=1)
        else:
            out[key] = value
    config = copy.deepcopy(inner.peft_config[inner.active_adapter])
    config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    config.r *= 2
    config.init_lora_weights = True
    return get_peft_model_state_dict(inner, state_dict=out), config


class SafetensorsShards:
    """A state dict that arrives one tensor at a time, written as Hugging Face's sharded
    safetensors: a file is written once the next tensor would take it past `max_bytes`,
    then released. Files are numbered once their count is known (`close`):
    model.safetensors alone, or model-0000i-of-0000n.safetensors plus the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        out.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.dtype: torch.dtype | None = None  # of the floating-point weights

    def add(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = value.contiguous()
        self.pending_bytes += size
        if value.is_floating_point() and self.dtype is None:
            self.dtype = value.dtype

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".part-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n, weight_map = len(self.written), {}
        for i, (path, keys) in enumerate(self.written):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            write_json(self.out / "model.safetensors.index.json",
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})


def merge_streaming(cfg, adapter_sd: dict[str, torch.Tensor], out: Path) -> dict[str, torch.Tensor]:
    """Write base + adapter merged, one tensor at a time. Returns the adapters' initial
    factors where they came from the base weights (PiSSA/OLoRA), under adapter_sd's names."""
    from trainers.model.peft_methods import init_from_base_weights, init_layer_from_base
    from omegaconf import OmegaConf

    from trainers.model.load import ModelSource
    from trainers.model.weights import checkpoint_key

    from trainers.objectives.catalog import get_objective

    method = OmegaConf.merge(cfg.method, {"quantize": None})
    source = ModelSource(cfg.model, method, torch.float32, cfg.seed, head=get_objective(cfg.objective).head)
    model = source.skeleton()
    # (a 4-bit base adds its quantization state under .base_layer.: not adapter weights)
    trained = {k: v for k, v in adapter_sd.items() if ".base_layer." not in k}
    from trainers.model.weights import is_placeholder, replace_parameter

    for name, p in list(model.named_parameters()):  # modules trained in full: their trained copy, not a placeholder
        if name in trained and is_placeholder(p):
            replace_parameter(model, name, torch.nn.Parameter(trained[name].to(p.dtype), requires_grad=False))
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise RuntimeError(f"adapter keys the model does not have: {unexpected[:3]}")
    files = source.files()
    from_base = init_from_base_weights(cfg.method)
    four_bit = quantized_keys(model) if cfg.method.quantize else set()

    def convert(key: str, value: torch.Tensor) -> torch.Tensor:
        if key in four_bit:
            return ROUNDTRIPS[cfg.method.quantize](value)
        if cfg.method.quantize:  # the 4-bit model holds the rest in bf16
            return value.to(torch.bfloat16).float()
        return value

    reinit_for = (lambda mname: lambda layer: init_layer_from_base(layer, mname, cfg.method, cfg.seed)) if from_base \
        else None
    writer = SafetensorsShards(out, shard_bytes(cfg))
    # modules trained in full beside the adapter (method.modules_to_save, a reward model's
    # score head): written from their trained copy below, not from the base
    trained_in_full = {checkpoint_key(n) for n, _ in model.named_parameters() if ".modules_to_save." in n}
    initial = write_merged(model, files, writer, convert, reinit_for, skip=trained_in_full)
    for name, p in model.named_parameters():  # trained in full beside the adapter (a reward model's score head)
        if ".modules_to_save." in name:
            writer.add(checkpoint_key(name), p.detach().float())
    writer.close()
    config = source.config()
    if cfg.model.special_tokens is not None:  # the grown vocabulary and the run's pad/eos ids
        from trainers.memory import hf_model

        config = hf_model(model).config
        hf_model(model).generation_config.save_pretrained(out)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(out)
    source.close()
    return initial


def write_merged(model: torch.nn.Module, files, writer: SafetensorsShards, convert=None, reinit_for=None,
                 skip=frozenset()) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of `model`'s placeholders (its base weights), read from `files`
    one at a time (`convert(key, value)` first, if given) and handed to `writer`, each PEFT
    layer's weight with its active adapter merged in (`merged_weight`). Shared by a run's
    export and the merge of combined adapters (launch/merging/adapters.py): the peak is one
    tensor plus the writer's pending file, never the model. Returns the initial factors
    `reinit_for(module name)` redid (PiSSA/OLoRA), under the model's names."""
    from trainers.model.weights import checkpoint_key, checkpoint_names

    names = checkpoint_names(model, files)  # parameter name -> checkpoint key
    owner = {}  # checkpoint key -> (the PEFT layer whose base weight it is, its name)
    for mname, module in model.named_modules():
        if hasattr(module, "merge") and hasattr(module, "get_base_layer"):
            owner[checkpoint_key(f"{mname}.base_layer.weight")] = (module, mname)
    wanted = set(names.values())
    initial: dict[str, torch.Tensor] = {}
    for key in files.keys():
        if key not in wanted or key in skip:
            continue  # e.g. a tied lm_head saved twice: the model does not own it
        value = files.read(key, torch.float32)
        if convert is not None:
            value = convert(key, value)
        module, mname = owner.get(key, (None, None))
        if module is None:
            writer.add(key, value)
            continue
        writer.add(key, merged_weight(module, value, reinit_for(mname) if reinit_for is not None else None))
        initial.update({f"{mname}.{k}": v for k, v in getattr(module, "initial_factors", {}).items()})
    return initial


def shard_bytes(cfg) -> int:
    return int(float(cfg.train.export_shard_mib) * 2**20)


def write_full_model(plan, out: Path) -> None:
    """The fully fine-tuned model as Hugging Face loads it, streamed from the plan (every
    rank calls this; rank 0 writes). Tied names are written once, as `save_pretrained`
    does."""
    writer = SafetensorsShards(out, shard_bytes(plan.cfg)) if plan.env.is_main else None
    tied = set(getattr(plan.inner, "all_tied_weights_keys", None) or {})
    for key, value in plan.export_tensors(trainable_only=False):
        if writer is not None and key not in tied:
            writer.add(key, value)
    if writer is None:
        return
    writer.close()
    config = plan.inner.config
    config.dtype = writer.dtype or torch.float32
    config.save_pretrained(out)
    if getattr(plan.inner, "generation_config", None) is not None:
        plan.inner.generation_config.save_pretrained(out)


def precompute_prompt_embeddings(plan) -> None:
    """PEFT saves a prompt-learning adapter (prefix, prompt) by running its prompt encoder,
    not from the state dict it is given, and export saves on rank 0 alone: under a sharding
    plan that encoder's weights are split, and gathering them from rank 0 alone would wait
    for ranks that never come. So every rank runs it now, with the plan's parameters whole,
    and rank 0's save takes the result."""
    inner = plan.inner
    config = getattr(inner, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return
    with plan.unsharded(), torch.no_grad():
        embeddings = inner.get_prompt_embedding_to_save(inner.active_adapter).float().cpu()
    inner.get_prompt_embedding_to_save = lambda adapter_name: embeddings


def export(plan, cfg, tokenizer, run_dir: Path) -> dict:
    """Write export/adapter and export/merged (collective: every rank calls it); returns
    what was written (rank 0)."""
    out = Path(run_dir) / "export"
    method = cfg.method
    written: dict = {}
    if method.peft is None:
        write_full_model(plan, out / "merged")
        if plan.env.is_main:
            tokenizer.save_pretrained(out / "merged")
            written["merged"] = str(out / "merged")
        return written

    precompute_prompt_embeddings(plan)
    sd = {k: v for k, v in plan.export_tensors(trainable_only=True) if v is not None}
    if not plan.env.is_main:
        return written
    if method.peft == "vera":  # its shared projections, under every name PEFT saves them by (a plan
        # that gives a tensor once gives them under one layer's name); buffers, the same on every rank
        sd.update({k: v.detach().cpu() for k, v in plan.inner.state_dict().items()
                   if (".vera_A." in k or ".vera_B." in k) and k not in sd})
    adapter = out / "adapter"
    from_base = init_from_base_weights(method)
    if not from_base:
        plan.inner.save_pretrained(adapter, state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(adapter)
        written["adapter"] = str(adapter)
    if method.peft not in MERGEABLE:
        written["merged_skipped"] = f"{method.name} adds virtual tokens, not weight deltas: nothing to merge"
        log.info("export: %s", written["merged_skipped"])
        return written
    merged = out / "merged"
    initial = merge_streaming(cfg, sd, merged)
    tokenizer.save_pretrained(merged)
    written["merged"] = str(merged)
    if from_base:  # the adapter as plain LoRA on the original base (it trained on the residual)
        from safetensors.torch import save_file

        state, config = as_plain_lora(plan.inner, sd, initial)
        adapter.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(adapter / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        written["adapter"] = f"{adapter} (converted to plain LoRA of rank {config.r} on the original base)"
    return written
