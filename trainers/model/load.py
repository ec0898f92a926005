"""Build the model a run trains: tokenizer, config, and a `ModelSource` from which each
parallel plan builds only its own share of the weights (see trainers/model/weights.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trainers.errors import UserError
from trainers.model.peft_methods import apply_method

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


def load_tokenizer(model_cfg, chat_template=None):
    """`chat_template`: data.chat_template (trainers/data/chat_template.py), set on the tokenizer."""
    _check_path(model_cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"Could not load a tokenizer from model.path={model_cfg.path!r}: {e}") from None
    from trainers.model.special_tokens import apply_to_tokenizer

    apply_to_tokenizer(tok, model_cfg.special_tokens)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from trainers.data.chat_template import apply

    apply(tok, chat_template)
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
    """method.quantize as transformers' BitsAndBytesConfig: nf4 (QLoRA's 4-bit base) or
    int8 (LLM.int8: row-wise absmax int8 weights, outlier features above 6.0 in 16 bits)."""
    from transformers import BitsAndBytesConfig

    if method_cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
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


def frozen_dtype(method_cfg, compute_dtype: torch.dtype) -> torch.dtype:
    """Frozen base weights live in the compute dtype (bf16 halves a 70B base to 140 GB);
    weights that train (method=full) keep fp32 masters and each plan casts them for compute
    (autocast, FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16 mode)."""
    return torch.float32 if method_cfg.peft is None else compute_dtype


def bnb_quantizer(method_cfg):
    """transformers' own bitsandbytes quantizer for `quantization_config`: the skeleton
    path uses its module replacement and its per-tensor quantize op, so a 4-bit base
    built from placeholders is the one `from_pretrained` loads, byte for byte."""
    from transformers.quantizers.auto import AutoHfQuantizer

    return AutoHfQuantizer.from_config(quantization_config(method_cfg), pre_quantized=False)


# What the trained model computes on top of the decoder: the causal LM's vocabulary head
# (every objective but one), or one score per sequence (objective=reward: a
# sequence-classification head with one label, as TRL's RewardTrainer trains it).
HEADS = {"lm": AutoModelForCausalLM, "score": AutoModelForSequenceClassification}
PEFT_TASKS = {"lm": "CAUSAL_LM", "score": "SEQ_CLS"}


def head_config(config, head: str):
    """The model config for `head`: a reward model has one label and needs a pad token id
    (transformers' sequence classifier refuses batches without one; load_tokenizer pads
    with EOS when the tokenizer has no pad token, so the same id here)."""
    if head == "score":
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        arch = (config.architectures or [""])[0]
        if arch.endswith("ForCausalLM"):
            config.architectures = [arch.removesuffix("ForCausalLM") + "ForSequenceClassification"]
    return config


def load_quantized_model(model_cfg, method_cfg, device: torch.device, head: str = "lm"):
    """The 4-bit NF4 (or 8-bit LLM.int8) base: transformers quantizes tensor by tensor while
    it loads (no full bf16 copy); the other weights (embeddings, lm_head, norms) stay frozen
    in bf16."""
    _check_path(model_cfg.path)
    try:
        model = HEADS[head].from_pretrained(
            model_cfg.path,
            config=head_config(load_config(model_cfg), head),
            quantization_config=quantization_config(method_cfg),
            device_map={"": device.index if device.type == "cuda" else "cpu"},
            dtype=torch.bfloat16,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except OSError as e:
        raise UserError(f"Could not load model weights from model.path={model_cfg.path!r}: {e}") from None
    disable_cpu_weight_repacking(model)
    drop_int8_state_extras(model)
    model.train()  # from_pretrained returns eval mode (dropout off; see bnb note above)
    return model


def drop_int8_state_extras(model: torch.nn.Module) -> None:
    """An 8-bit linear adds its row scales and weight format to its state dict under names
    that are no attributes (`SCB`, `weight_format`), which torch.distributed.checkpoint
    cannot resolve to a module. They belong to the frozen base, which a resume rebuilds
    from the model files: leave them out of this model's state dicts."""
    import bitsandbytes as bnb

    def drop(module, state_dict, prefix, local_metadata):
        for name in ("SCB", "weight_format"):
            state_dict.pop(prefix + name, None)

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.register_state_dict_post_hook(drop)


class ModelSource:
    """What a plan needs to build its share of the model: the architecture, the method
    and where the pre-trained tensors are. Plans call `skeleton()` and fill it from
    `files()` (whole tensors, dim-0 shards, one module at a time), or `whole(device)` when
    they keep every weight.

    Adapters are initialised right after a re-seed, so every plan (and the quantized
    path) starts from the same adapter weights whatever the loading did to the RNG. The
    train.* memory options (trainers/memory.py) are applied there too, before any plan
    wraps the model, so every plan trains the same modified model."""

    def __init__(self, model_cfg, method_cfg, compute_dtype: torch.dtype, seed: int, train_cfg=None,
                 head: str = "lm"):
        self.model_cfg = model_cfg
        self.head = head  # HEADS
        self.train_cfg = train_cfg
        self.method_cfg = method_cfg
        self.compute_dtype = compute_dtype
        # a 4-bit base keeps its other weights (embeddings, norms, head) in bf16, as
        # load_quantized_model does
        self.dtype = torch.bfloat16 if self.quantized else frozen_dtype(method_cfg, compute_dtype)
        self.seed = seed
        self._files = None
        self._quantizer = None
        self._filling = None  # (model, placeholder index, quantize op) shared by its fills
        self.read_report: tuple[int, int] | None = None  # (bytes this rank read, checkpoint bytes)

    @property
    def quantized(self) -> bool:
        return bool(self.method_cfg.quantize)

    def config(self):
        return head_config(load_config(self.model_cfg), self.head)

    def apply_method(self, model: torch.nn.Module) -> torch.nn.Module:
        from trainers.rng import seed_everything

        seed_everything(self.seed)
        model = apply_method(model, self.method_cfg, PEFT_TASKS[self.head])
        model.train()
        if self.train_cfg is not None:
            from trainers.memory import apply_memory_options, hf_model
            from trainers.data.neftune import add_neftune

            apply_memory_options(model, self.train_cfg)
            add_neftune(hf_model(model), self.train_cfg.neftune_alpha)
        return model

    def skeleton(self) -> torch.nn.Module:
        """The (PEFT) model whose checkpoint weights are zero-byte placeholders in
        `self.dtype`; adapters and buffers are real. With a 4-bit base its linears are
        bitsandbytes Linear4bit, as transformers' quantizer lays them out, and `fill`
        quantizes each weight as it is read."""
        from accelerate import init_empty_weights

        from trainers.model.weights import is_4bit, make_placeholder, replace_parameters

        with init_empty_weights(include_buffers=False):
            model = HEADS[self.head].from_config(
                self.config(), dtype=self.dtype, attn_implementation=self.model_cfg.attn_implementation,
                trust_remote_code=self.model_cfg.trust_remote_code,
            )
        fresh = self._fresh_head(model)
        if self.quantized:
            import bitsandbytes as bnb

            self._quantizer = bnb_quantizer(self.method_cfg)
            self._quantizer.preprocess_model(model, device_map=None)
            self._quantizer.postprocess_model(model)
            model.hf_quantizer = self._quantizer
            replace_parameters(model, lambda _, p: bnb.nn.Params4bit(
                make_placeholder(p.shape, self.dtype).data, requires_grad=False, **p.__dict__) if is_4bit(p) else None)
            disable_cpu_weight_repacking(model)
        replace_parameters(model, lambda _, p: None if is_4bit(p) or p is fresh else make_placeholder(p.shape, p.dtype))
        if self.model_cfg.special_tokens is not None:
            self._special_tokens(model)
        model = self.apply_method(model)
        copies_as_placeholders(model)
        return model

    def _special_tokens(self, model: torch.nn.Module) -> None:
        """model.special_tokens (trainers/model/special_tokens.py): a vocabulary that grows
        needs the embedding and LM head loaded (the new rows come from their statistics), so
        those two are read now, before PEFT wraps the model; the rest stays placeholders."""
        from trainers.model.special_tokens import apply_to_model

        tokenizer = load_tokenizer(self.model_cfg)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    self.fill(model, torch.device("cpu"), within=module)
            self._filling = None  # the resized modules are no placeholders: index the model afresh
        apply_to_model(model, tokenizer, self.seed)

    def _fresh_head(self, model: torch.nn.Module) -> torch.nn.Parameter | None:
        """A reward model built from a causal LM checkpoint has no `score` weight there:
        it starts fresh, drawn as transformers initialises it (normal, std
        initializer_range) from the run's seed, so every rank and plan starts from the same
        head. From a reward model's own checkpoint it is read like every other weight."""
        if self.head != "score" or "score.weight" in self.files():
            return None
        from trainers.rng import seed_everything

        seed_everything(self.seed)
        weight = model.score.weight
        std = getattr(self.config(), "initializer_range", 0.02)
        model.score.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype).normal_(0.0, std))
        return model.score.weight

    def fill(self, model: torch.nn.Module, device: torch.device, within: torch.nn.Module | None = None,
             recurse: bool = True) -> None:
        """Read the placeholders of `within` (default: all of `model`; its own parameters only
        with `recurse=False`) onto `device`; 4-bit
        weights are quantized by transformers' op as each arrives: a rank holds one tensor
        in bf16 at a time, never a bf16 (or 4-bit) copy of weights it does not keep."""
        from trainers.model.weights import fill_placeholders

        if self._filling is None or self._filling[0] is not model:
            self._filling = (model, *self._fill_setup(model))
        _, index, quantize = self._filling
        fill_placeholders(model, self.files(), device, within, quantize, recurse, index)

    def _fill_setup(self, model: torch.nn.Module):
        """What every fill of `model` shares, found once: its placeholders' checkpoint keys
        and, for a 4-bit base, transformers' quantize op bound to the model."""
        from trainers.model.weights import placeholder_index

        quantize = None
        if self._quantizer is not None:
            from trainers.memory import hf_model

            op, hf = self._quantizer.get_quantize_ops(), hf_model(model)
            prefix = next(n for n, m in model.named_modules() if m is hf)
            prefix = prefix + "." if prefix else ""

            def quantize(name: str, value: torch.Tensor) -> torch.nn.Parameter:
                name = name.removeprefix(prefix)  # the op looks the weight up in the transformers model
                return op.convert({name: [value]}, model=hf)[name]
        return placeholder_index(model, self.files()), quantize

    def files(self):
        """The checkpoint's tensors (a hub id is resolved to its local snapshot first)."""
        if self._files is None:
            from trainers.model.weights import CheckpointFiles

            self._files = CheckpointFiles(local_model_dir(self.model_cfg.path))
        return self._files

    @property
    def loads_in_parts(self) -> bool:
        """Whether plans can fill the skeleton part by part. Not for QDoRA (a 4-bit base with
        method.use_dora): PEFT initialises DoRA's magnitudes from the quantized weights
        while it wraps them, so that base is loaded whole first (`whole`)."""
        m = self.method_cfg
        return not (self.quantized and m.peft == "lora" and m.use_dora)

    def whole(self, device: torch.device) -> torch.nn.Module:
        """Every weight on `device`: what none, ddp and zero1/2 keep. A 4-bit base comes
        from transformers' `from_pretrained`, the reference the skeleton path is tested
        against byte for byte."""
        if self.quantized:
            return self.apply_method(load_quantized_model(self.model_cfg, self.method_cfg, device, self.head))
        return self.load(self.skeleton(), device)

    def load(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Every placeholder left in `model` read onto `device`, then DoRA's magnitudes and
        PiSSA/OLoRA's adapters (both computed from the loaded base weights)."""
        from trainers.model.peft_methods import init_from_base
        from trainers.model.weights import init_dora_magnitudes

        self.fill(model, device)
        model.to(device)
        init_dora_magnitudes(model)
        init_from_base(model, self.method_cfg, self.seed)
        return model

    def close(self) -> None:
        """Close the checkpoint files; `read_report` keeps what this rank read of them."""
        if self._files is not None:
            self.read_report = (self._files.bytes_read, self._files.total_bytes)
            self._files.close()
            self._files = None
        self._filling = None
        release_freed_host_memory()


def copies_as_placeholders(model: torch.nn.Module) -> None:
    """PEFT's modules_to_save copy of a module whose weights are still placeholders is a deep
    copy that materialises them as zeros, which `fill` would skip (an LM head trained from
    zeros): make such copies placeholders again, read from the checkpoint like their original
    (weights.checkpoint_key gives both the same key). A copy of real weights (a grown
    vocabulary's resized embedding, a reward model's fresh score head) is kept."""
    import re

    from trainers.model.weights import is_placeholder, make_placeholder, replace_parameters

    originals = {n for n, p in model.named_parameters() if ".original_module." in n and is_placeholder(p)}

    def placeholder(name, p):
        if ".modules_to_save." not in name or is_placeholder(p):
            return None
        if re.sub(r"\.modules_to_save\.[^.]+\.", ".original_module.", name) not in originals:
            return None
        return make_placeholder(p.shape, p.dtype).requires_grad_(p.requires_grad)

    replace_parameters(model, placeholder)


def release_freed_host_memory() -> None:
    """Give the host memory loading freed back to the system. Blocks under glibc's mmap
    threshold (the skeleton's fresh adapter weights once copied into their shards, one
    tensor's read buffer at a time) are freed into the heap, where RSS still counts them until
    `malloc_trim` returns their pages; measured by bench/rank_fixed.py (docs/plans-and-memory.md,
    "The fixed part of a rank"). Not glibc: its allocator decides."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def local_model_dir(path: str) -> Path:
    _check_path(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (OSError, ValueError) as e:  # hub and network errors are OSErrors; a malformed repo id is a ValueError
        raise UserError(
            f"model.path={path!r} is neither a local directory nor a reachable hub model ({type(e).__name__}: "
            f"{e}). Download it first (huggingface-cli download {path} --local-dir DIR) and set model.path=DIR."
        ) from None


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
