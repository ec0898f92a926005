"""Memory per GPU, estimated from the architecture alone (no weights are loaded).

The architecture comes from `model.arch` (presets: 1b ... 70b) or, for a local model
directory, from its config.json. What a plan does with the state comes from the plan's
static spec (`plan_spec(name).layout(cfg, world)`, parallel/specs.py and layout.py); nothing
here names a plan. The estimate
is what one rank holds at its peak, the larger of training and loading:

    train = params + optimizer + grads & activations + buffers + overhead
    load  = what the rank keeps + what loading holds on top of it + overhead

  P          parameter count: per decoder layer q,o = h*h; k,v = h*kv (kv = kv_heads *
             h/heads); gate,up,down = h*I; two RMSNorms 2h. Plus embeddings V*h, lm_head
             V*h (0 if tied) and the final norm h.
  T          trainable parameters: full = P; LoRA (r, targets) = sum over targeted
             linears of r*(in+out) (+ out per module for DoRA's magnitude); IA3, prompt
             and prefix tuning are a few vectors (counted, but tiny).
  c          compute bytes per element: 2 under bf16 (train.precision=bf16, or auto, which
             assumes a bf16 GPU), 4 in fp32.
  params     as trainers/model/load.py builds them: a frozen base in the compute dtype (c B);
             trained weights (method=full) as fp32 masters (4 B); QLoRA: the decoder's
             linear weights in NF4 = 0.5 B/param + double-quantized absmax constants
             (~0.127 bit/param), everything else in bf16 (2 B); adapters fp32 (4 B).
             method.quantize=int8 (bitsandbytes LLM.int8, Int8Params): the decoder's
             linear weights as int8 codes (CB, 1 B/param) + one fp32 absmax per output row
             (SCB), the embeddings, norms and lm_head in bf16 (2 B); adapters fp32 (4 B).
             Checked against the loaded 8-bit model (tests/test_estimate.py, within 5 %).
  grads      4 B per trainable parameter (fp32), twice where the plan also keeps them in
             communication buckets (DDP). With one forward per step they peak after the
             activations are freed (grads & activations = kept buffers + the larger of
             the rest); with accumulation or a pipeline, on top of them.
  optimizer  8 B per trainable parameter (AdamW's two fp32 moments), + 4 B of fp32
             master copy where the plan keeps one beside the model (DeepSpeed; the model's
             own trained weights are then in the compute dtype). The step itself holds
             transients beside the gradients: torch's foreach AdamW (GPU) one fp32 temporary
             of the rank's trainable size; a plan that steps one flat tensor per rank
             (layout.flat_step, DeepSpeed) a flat copy of the gradient partition and a
             temporary of that size (per sub-group); CPU AdamW one parameter's worth.
  sharding   params / grads / optimizer are divided by the data-parallel world size where
             the plan's layout shards them; offloaded parts live in host RAM (on a GPU only
             working buffers remain; the CPU estimate counts them). A pipeline of S stages
             holds 1/S of the layers' state.
  activations  for one micro-batch of t = rows * max_seq_len tokens (rows: the plan's rows
             per forward), per layer and token (6h + 2kv + 4I) elements: attention saves
             the norm and projection inputs, q, k, v and the attention output (sdpa: no s^2
             term); the SwiGLU MLP its two inputs and gate, up, act(gate), product
             (Korthikanti et al. 2022, adapted to GQA + SwiGLU, no dropout); + 3h when all
             weights train (their inputs are kept for the weight gradients). Checked by
             counting the tensors autograd saves on transformers' Llama (within 3 %). A pipeline
             stage holds them for its layers and its micro-batches in flight. With
             train.activation_checkpointing each layer keeps only its input (h per token)
             and one layer's activations are alive while it is recomputed.
             + logits: k*V*(c + 8) bytes (logits, fp32 log-softmax and its gradient) for
             k = t tokens, or k = train.loss_chunk_tokens when the loss is chunked.
             objective=grpo: a row is a prompt (data.max_seq_len) plus its completion
             (objective.max_completion_length), and the rollout before the step's forwards
             holds, for one generate call of the rank's micro_batch_size x grad_accum
             sequences (the rank's whole step batch, as TRL generates), the KV cache
             (2 * kv * layers elements per token) and fp32 scores of V per row: the larger
             of that and the training activations counts (the reference pass, no grad,
             holds less than either). With objective.merged_generation (plain LoRA, unquantized,
             a plan that keeps whole parameters) the rollout also holds a merged copy of the
             adapted linears' weights, in the compute dtype.
  buffers    plans that gather parameters unit by unit (layout.gathers_units): the largest
             unit (the root: embeddings + lm_head + final norm, or one decoder layer) + one
             prefetched decoder layer, in the compute dtype, or what the plan may keep
             gathered at once if that is more (layout.live_gathered: ZeRO-3's live
             and prefetched parameters once it has recorded the module order), + one
             layer's unsharded fp32 gradients before the reduce-scatter. QLoRA dequantizes one linear at a time
             (h*I elements in bf16); an 8-bit base one linear's codes x scales in the
             compute dtype (backward's dequantized weight). The plan's own gradient communication buffers
             (layout.buckets, DeepSpeed) in the compute dtype.
  load       what the rank keeps (params) + layout.load_transient: one tensor in flight
             (the largest, V*h), one module's full tensors (ZeRO-3: the largest module,
             V*h), or the whole unsharded model (4-bit bases under sharding plans, which
             transformers quantizes whole before the plan shards them).
  overhead   GPU: CUDA context + NCCL (1.5 GiB) + 10 % allocator fragmentation. The CPU
             estimate (device="cpu", what bench/memory_estimate.py compares with
             measured RSS) has no overhead term: the process's fixed overhead is measured
             separately and subtracted.

It is an estimate: it exists to refuse what cannot fit before anything is queued, and to
say what would. bench/memory_estimate.py holds it to measurement on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from omegaconf import DictConfig, OmegaConf

from parallel import optim_state
from parallel.layout import StateLayout
from trainers.errors import UserError

GIB = 2**30
CUDA_OVERHEAD = 1.5 * GIB
FRAGMENTATION = 0.10
NF4_BYTES = 0.5 + 0.127 / 8
INT8_SCALE_BYTES = 4  # LLM.int8: one fp32 absmax (SCB) per output row of a quantized linear
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_linear_rows(self) -> int:
        """Output rows of a decoder layer's linears (LLM.int8 keeps one scale per row)."""
        return sum(out for _, out in self.linear_shapes().values())

    @property
    def root_params(self) -> int:
        """Embeddings + lm_head + final norm (FSDP2's root unit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * (self.layer_linear_params + 2 * self.hidden) + self.root_params


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on (so suggestions can vary one thing)."""
    method: str          # method name, for messages
    peft: str | None
    quantized: bool      # a 4-bit NF4 base (method.quantize=nf4)
    lora_r: int
    lora_targets: tuple[str, ...]
    dora: bool
    virtual_tokens: int
    plan: str            # for messages only
    layout: StateLayout
    world: int
    nodes: int
    tokens: int          # per forward (micro-batch, or pipeline micro-batch)
    act_bytes: int       # compute bytes per element (c)
    activation_checkpointing: bool = False
    loss_chunk_tokens: int | None = None
    device: str = "gpu"  # "gpu": overhead and offload apply; "cpu": one memory for all
    forwards_per_step: int = 1  # micro-batches (pipeline: pipeline micro-batches) per rank per step
    rollout_rows: int = 0  # objective=grpo: sequences per generate call (0: no rollout): the rank's step batch
    merged_generation: bool = False  # objective=grpo: the rollout holds a merged copy of the adapted linears
    optimizer: str = "adamw"  # optim.name; optim_moments: SGD's momentum / Adafactor's beta1 (0: none), Lion's bits
    optim_moments: float = 0.0
    optim_bits: int = 32
    optim_min_8bit: int = 0  # 8-bit optimizers: tensors under this many elements keep 32-bit state
    int8: bool = False   # an 8-bit LLM.int8 base (method.quantize=int8)


@dataclass
class Estimate:
    setup: Setup
    total_params: int
    trainable: int
    params: float
    grads: float
    optim: float
    activations: float
    buffers: float
    overhead: float
    load: float = 0.0    # load-time peak, overhead included
    grads_and_activations: float = 0.0  # what the two hold together at their peak (see `estimate`)
    step_extra: float = 0.0  # the optimizer step's transients, counted inside grads & activations
    optim_per_param: float = 8.0  # the optimizer's state bytes per trainable parameter (master copy apart)
    rollout: float = 0.0  # objective=grpo: what the rollout holds (activations is the larger of it and training's)
    merged_copy: float = 0.0  # of which the merged LoRA copy (objective.merged_generation)

    @property
    def train(self) -> float:
        return self.params + self.optim + self.grads_and_activations + self.buffers + self.overhead

    @property
    def total(self) -> float:
        """Bytes: the larger of the training and the loading peak."""
        return max(self.train, self.load)

    def fits(self, gpu_mem_gb: float) -> bool:
        return self.total <= gpu_mem_gb * GIB

    def table(self, gpu_mem_gb: float | None) -> str:
        s = self.setup
        act = f"{s.tokens} tokens/micro-batch, {s.act_bytes} B/element"
        if s.activation_checkpointing:
            act += ", recomputed per layer"
        if self.rollout:
            act += f"; the rollout holds {_bytes(self.rollout).strip()}" + (
                f" ({_bytes(self.merged_copy).strip()} of it a merged LoRA copy: objective.merged_generation)"
                if self.merged_copy else "")
        lines = [
            f"memory per GPU (estimate; formula in launch/estimate.py), {s.world} rank(s):",
            f"  parameters   {_bytes(self.params)}   {_count(self.total_params)} params"
            + (", 4-bit base" if s.quantized else ", 8-bit base" if s.int8 else "") + _sharded("params", s),
            f"  gradients    {_bytes(self.grads)}   {_count(self.trainable)} trainable" + _sharded("grads", s),
            f"  optimizer    {_bytes(self.optim)}   {optimizer_text(self.optim_per_param, s)}"
            + _sharded("optim", s),
            f"  step         {_bytes(self.step_extra)}   the optimizer step's transients (alive with the "
            f"gradients, after the activations)",
            f"  activations  {_bytes(self.activations)}   {act}",
            f"  buffers      {_bytes(self.buffers)}   gathered units / dequantization / communication buckets",
            f"  overhead     {_bytes(self.overhead)}   CUDA context + fragmentation",
            f"  training     {_bytes(self.train)}",
            f"  loading      {_bytes(self.load)}   peak while the weights are read ({s.layout.load_transient} in flight)",
            f"  total        {_bytes(self.total)}"
            + (f"   of launcher.gpu_mem_gb={gpu_mem_gb:g}" if gpu_mem_gb else "   (launcher.gpu_mem_gb not set: not checked)"),
        ]
        return "\n".join(lines)


def optimizer_state(a: Arch, s: Setup, trainable: int) -> float:
    """The optimizer's state bytes for the trainable parameters, unsharded (the table is
    parallel/optim_state.py, shared with the runtime plan's expected-state line): AdamW
    8 B/param (two fp32 moments), 8-bit AdamW 2 x (1 + 4/256) (32-bit for tensors under
    optim.min_8bit_size), Lion one moment (4, or 8-bit), SGD a momentum buffer or nothing,
    Adafactor a row and a column vector per matrix (plus beta1's first moment when set)."""
    shapes = trainable_shapes(a, s)
    if shapes is None:  # IA3 vectors, prompt / prefix tables, VeRA, AdaLoRA: counted as large tensors
        if s.optimizer == "adafactor":
            return optim_state.adafactor([], trainable, s.optim_moments, trainable)
        return optim_state.per_param(s.optimizer, s.optim_bits, s.optim_moments) * trainable
    return optim_state.state_bytes(s.optimizer, shapes, s.optim_bits, s.optim_moments, s.optim_min_8bit)


def trainable_shapes(a: Arch, s: Setup) -> list[tuple[int, ...]] | None:
    """The shapes of the trainable tensors, where the method's layout is known: every weight
    (full), or LoRA's A (r x in) and B (out x r) per target and layer, + DoRA's magnitudes."""
    if s.peft is None:
        linears = [(out, into) for into, out in a.linear_shapes().values()] * a.layers
        return linears + [(a.vocab, a.hidden)] * (1 if a.tied else 2) + [(a.hidden,)] * (2 * a.layers + 1)
    if s.peft == "lora":
        shapes = a.linear_shapes()
        mats = [m for t in s.lora_targets for m in ((s.lora_r, shapes[t][0]), (shapes[t][1], s.lora_r))] * a.layers
        magnitudes = [(shapes[t][1],) for t in s.lora_targets] * a.layers if s.dora else []
        return mats + magnitudes
    return None


def optimizer_text(per_param: float, s: Setup) -> str:
    master = ", + 4 B fp32 master copy" if s.layout.master_copy else ""
    factored = " (factored: a row and a column per matrix)" if s.optimizer == "adafactor" else ""
    return f"optim={s.optimizer}, {per_param:.3g} B/trainable param{factored}{master}"


def _bytes(b: float) -> str:
    return f"{b / GIB:8.1f} GiB" if b >= GIB or b == 0 else f"{b / 2**20:8.1f} MiB"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _sharded(part: str, s: Setup) -> str:
    if part in s.layout.offload:
        return " (offloaded to CPU)"
    stages = s.layout.stages
    pipeline = f" (1/{stages} of the layers per stage)" if stages > 1 else ""
    return (f" (sharded /{s.world})" if part in s.layout.shards and s.world > 1 else "") + pipeline


# ----------------------------------------------------------------------- inputs
def arch_of(model_cfg) -> Arch | None:
    """From the config.json of a local model directory (no weights), else `model.arch`."""
    from trainers.model.config_json import architecture

    src = architecture(model_cfg)
    if src is None:
        return None
    heads = int(src["num_attention_heads"])
    return Arch(
        hidden=int(src["hidden_size"]), layers=int(src["num_hidden_layers"]), heads=heads,
        kv_heads=int(src.get("num_key_value_heads") or heads), intermediate=int(src["intermediate_size"]),
        vocab=int(src["vocab_size"]), tied=bool(src.get("tie_word_embeddings", False)),
    )


def layout_of(cfg: DictConfig, world: int) -> StateLayout:
    from parallel import plan_spec

    return plan_spec(cfg.parallel.name).layout(cfg, world)


def setup_of(cfg: DictConfig, device: str = "gpu") -> Setup:
    from launch.config import nodes, world_size

    m = cfg.method
    optimizer, bits, moments, min_8bit = optim_state.settings(cfg.optim)
    targets = m.target_modules if m.peft in ("lora", "ia3", "adalora", "vera") else None
    if targets is None or targets == "all-linear":
        targets = LINEARS
    elif isinstance(targets, str):
        targets = (targets,)
    world = world_size(cfg)
    layout = layout_of(cfg, world)
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and device == "gpu")
    rows = layout.rows_per_forward or int(cfg.train.micro_batch_size)
    seq = int(cfg.data.max_seq_len)
    on_policy = cfg.objective.name == "grpo"
    if on_policy:  # rows are prompt + completion (trainers/objectives/grpo.py)
        seq += int(cfg.objective.max_completion_length)
    chunk = cfg.train.loss_chunk_tokens
    if chunk == "auto":  # trainers/objectives/lm_loss.py: chunks whose fp32 logits stay under 128 MiB
        a = arch_of(cfg.model)
        chunk = max(1, (128 * 2**20) // (4 * a.vocab)) if a else 0
    return Setup(
        method=m.name, peft=m.peft, quantized=m.quantize == "nf4", int8=m.quantize == "int8",
        lora_r=int(m.init_r) if m.peft == "adalora" else int(m.r) if m.peft in ("lora", "vera") else 0, lora_targets=tuple(t for t in targets if t in LINEARS),
        dora=m.peft == "lora" and bool(m.use_dora),
        virtual_tokens=int(m.num_virtual_tokens) if m.peft in ("prefix", "prompt") else 0,
        plan=cfg.parallel.name, layout=layout, world=world, nodes=nodes(cfg),
        tokens=rows * seq, act_bytes=2 if bf16 else 4,
        rollout_rows=int(cfg.train.micro_batch_size) * int(cfg.train.grad_accum) if on_policy else 0,
        merged_generation=on_policy and bool(cfg.objective.merged_generation) and m.peft == "lora"
        and not m.use_dora and m.quantize is None and "params" not in layout.shards,
        activation_checkpointing=bool(cfg.train.activation_checkpointing),
        loss_chunk_tokens=int(chunk) if chunk else None, device=device,
        forwards_per_step=max(1, int(cfg.train.micro_batch_size) * int(cfg.train.grad_accum) // rows),
        optimizer=optimizer, optim_bits=bits, optim_moments=moments, optim_min_8bit=min_8bit,
    )


# ------------------------------------------------------------------------ model
def trainable_params(a: Arch, s: Setup) -> int:
    if s.peft is None:
        return a.total_params
    if s.peft == "lora":  # A (r x in), B (out x r) per target and layer, + DoRA's magnitudes
        return sum(math.prod(shape) for shape in trainable_shapes(a, s))
    if s.peft == "adalora":  # P (r x in), Q (out x r) and the r singular values, at init_r
        shapes = a.linear_shapes()
        return a.layers * sum(s.lora_r * (sum(shapes[t]) + 1) for t in s.lora_targets)
    if s.peft == "vera":  # per layer: d (r) and b (out); the shared projections are frozen buffers
        shapes = a.linear_shapes()
        return a.layers * sum(s.lora_r + shapes[t][1] for t in s.lora_targets)
    if s.peft == "ia3":
        return a.layers * (2 * a.kv_dim + a.intermediate)
    if s.peft == "prompt":
        return s.virtual_tokens * a.hidden
    if s.peft == "prefix":
        return s.virtual_tokens * a.layers * 2 * a.kv_dim
    return 0


def estimate(a: Arch, s: Setup) -> Estimate:
    L = s.layout
    total = a.total_params
    trainable = trainable_params(a, s)
    adapters = 0 if s.peft is None else trainable
    c = s.act_bytes
    if s.quantized:
        quantized = a.layers * a.layer_linear_params
        params = quantized * NF4_BYTES + (total - quantized) * 2 + adapters * 4
    elif s.int8:  # int8 codes + per-row fp32 scales; embeddings, norms and lm_head stay bf16
        quantized = a.layers * a.layer_linear_params
        scales = a.layers * a.layer_linear_rows * INT8_SCALE_BYTES
        params = quantized + scales + (total - quantized) * 2 + adapters * 4
    elif s.peft is None:
        # trained weights: fp32 masters, unless the plan keeps its own master copy
        params = total * (c if L.master_copy else 4)
    else:
        params = total * c + adapters * 4
    grads = trainable * (8 if L.grad_buckets else 4)
    optim = optimizer_state(a, s, trainable) + (trainable * 4 if L.master_copy else 0)
    optim_per_param = (optim / trainable if trainable else 0.0) - (4 if L.master_copy else 0)

    def per_rank(part: str, value: float) -> float:
        if part in L.offload and s.device == "gpu":
            return 0.0
        return (value / s.world if part in L.shards else value) / L.stages

    params, grads, optim = (per_rank(k, v) for k, v in (("params", params), ("grads", grads), ("optim", optim)))

    layers_here = -(-a.layers // L.stages)
    per_layer = 6 * a.hidden + 2 * a.kv_dim + 4 * a.intermediate  # saved elements per token
    if s.peft is None:
        per_layer += 3 * a.hidden  # trained norms and projections keep their inputs too
    if s.activation_checkpointing:
        layer_acts = L.in_flight * s.tokens * layers_here * a.hidden + s.tokens * per_layer
    else:
        layer_acts = L.in_flight * s.tokens * layers_here * per_layer
    logit_tokens = min(s.tokens, s.loss_chunk_tokens) if s.loss_chunk_tokens else s.tokens
    activations = layer_acts * c + logit_tokens * a.vocab * (c + 8)
    rollout = merged_copy = 0.0
    if s.rollout_rows:  # GRPO's generation: KV cache of one generate call + its fp32 scores
        rollout = s.tokens * s.forwards_per_step * layers_here * 2 * a.kv_dim * c + s.rollout_rows * a.vocab * 4
        if s.merged_generation:  # trainers/objectives/merged_generation.py: W + scale B A of each adapted linear
            shapes = a.linear_shapes()
            merged_copy = a.layers * sum(shapes[t][0] * shapes[t][1] for t in s.lora_targets) * c
            rollout += merged_copy
        activations = max(activations, rollout)

    layer = a.layer_linear_params + 2 * a.hidden
    buffers = 0.0
    if L.gathers_units and (s.world > 1 or "params" in L.offload):
        unit_bytes = NF4_BYTES if s.quantized else c
        root_bytes = 2 if s.quantized else c  # QLoRA keeps the root in bf16
        units = max(a.root_params * root_bytes, layer * unit_bytes) + layer * unit_bytes
        live = min(L.live_gathered.at(a.hidden), a.total_params) * unit_bytes
        buffers += max(units, live)
        layer_trainable = trainable / max(a.layers, 1) if s.peft else layer
        buffers += layer_trainable * 4
    if s.quantized:
        buffers += a.hidden * a.intermediate * 2
    elif s.int8:
        buffers += a.hidden * a.intermediate * c
    # DeepSpeed's gradient communication buffers: allocated whole on a GPU; on CPU only
    # the pages a step fills count (at most every trainable gradient, unpartitioned).
    bucket = L.buckets.at(a.hidden)
    if bucket:
        elements = bucket if s.device == "gpu" else min(bucket, trainable)
        buffers += elements * c
    # The optimizer step's transients, alive with the gradients (not with the activations):
    # a plan that steps one flat tensor per rank copies the gradient partition into it and
    # AdamW's temporaries (sqrt of the second moment) are that size; torch's foreach AdamW
    # (the default on a GPU) makes one temporary for all of a rank's parameters at once; on
    # CPU AdamW steps one parameter at a time (the largest: the embedding, when it trains).
    moment = per_rank("optim", trainable * 4)
    if L.flat_step:
        group = min(moment, L.step_group_elements * 4) if L.step_group_elements else moment
        step_extra = 2 * group
    elif s.device == "gpu":
        step_extra = moment
    else:
        step_extra = per_rank("params", a.vocab * a.hidden * 4) if s.peft is None else 0.0
    # With one forward per step, backward frees each layer's activations as it creates that
    # layer's gradients, and the gradients are freed again after the optimizer step
    # (zero_grad(set_to_none=True)): the two peak one after the other, not together
    # (measured: full fine-tuning at one micro-batch per step peaks at params + grads +
    # AdamW state, its activations nowhere). Only buffers the plan keeps across steps
    # (DDP's communication buckets; DeepSpeed's gradient partitions) add to the activations,
    # and with accumulation the earlier micro-batches' gradients are alive during the next
    # one's forward.
    kept = grads / 2 if L.grad_buckets else grads if L.master_copy else 0.0
    if s.forwards_per_step > 1:
        grads_and_activations = grads + max(activations, step_extra)
    else:
        grads_and_activations = kept + max(activations, grads - kept + step_extra)
    subtotal = params + optim + grads_and_activations + buffers
    overhead = CUDA_OVERHEAD + FRAGMENTATION * subtotal if s.device == "gpu" else 0.0

    # Loading: what the rank keeps + what is in flight while the checkpoint is read.
    largest_tensor = a.vocab * a.hidden * (4 if s.peft is None else 2 if s.quantized or s.int8 else c)
    if L.load_transient == "whole":
        in_flight = estimate(a, replace(s, layout=StateLayout(), world=1)).params - params + largest_tensor
    else:  # "tensor" or "module": the largest module is the embedding (one V x h tensor)
        in_flight = largest_tensor
    load_state = params + in_flight
    load = load_state + (CUDA_OVERHEAD + FRAGMENTATION * load_state if s.device == "gpu" else 0.0)
    return Estimate(s, total, trainable, params, grads, optim, activations, buffers, overhead, load,
                    grads_and_activations, step_extra, optim_per_param, rollout, merged_copy)


# ------------------------------------------------------------------- the check
def for_config(cfg: DictConfig, device: str = "gpu") -> Estimate | None:
    a = arch_of(cfg.model)
    return None if a is None else estimate(a, setup_of(cfg, device))


def gpu_budget(cfg: DictConfig) -> float | None:
    value = cfg.launcher.gpu_mem_gb if cfg.launcher.name == "slurm" else None  # local: nothing to check against
    return float(value) if value else None


def variant(cfg: DictConfig, parallel: str | None = None, method: str | None = None, **keys) -> DictConfig:
    """`cfg` with another plan or method (their own config files) and dotted keys changed."""
    from launch.config import group_option

    container = OmegaConf.to_container(cfg, resolve=True)
    if parallel:
        container["parallel"] = group_option("parallel", parallel)
    if method:
        container["method"] = group_option("method", method)
    out = OmegaConf.create(container)
    for dotted, value in keys.items():
        OmegaConf.update(out, dotted.replace("__", "."), value, force_add=True)
    return out


def suggestions(cfg: DictConfig, est: Estimate, budget: float) -> list[str]:
    """Nearby configurations that fit, as command-line overrides: every plan that accepts
    the method (fewest nodes first, then one row per micro-batch), the 4-bit base, and
    activation checkpointing."""
    from launch.config import nodes as nodes_of
    from parallel import PLANS, plan_spec

    a, s = arch_of(cfg.model), est.setup
    per_node = max(1, s.world // max(s.nodes, 1))
    rows = int(cfg.train.micro_batch_size)
    one_row = {"train__micro_batch_size": 1, "train__grad_accum": int(cfg.train.grad_accum) * rows} if rows > 1 else None
    out: list[str] = []

    def fitting(c: DictConfig) -> Estimate | None:
        world = per_node * nodes_of(c)
        try:
            if plan_spec(c.parallel.name).refuse(c, world) is not None:
                return None
        except (UserError, KeyError, TypeError, ValueError):
            return None
        e = estimate(a, setup_of(c))
        return e if e.fits(budget) else None

    def flags(c: DictConfig, changed: dict) -> str:
        parts = [f"parallel={c.parallel.name}"] if c.parallel.name != cfg.parallel.name else []
        if c.method.name != cfg.method.name:
            parts.insert(0, f"method={c.method.name}")
        parts += [f"{k.replace('__', '.')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items()]
        return " ".join(parts)

    def fit_note(e: Estimate) -> str:
        note = ""
        if e.setup.layout.offload:
            host = estimate(a, replace(e.setup, device="cpu"))
            node = (host.params + host.grads + host.optim) * per_node / GIB
            note = f"; needs ~{node:.0f} GiB of CPU RAM per node for the offloaded state"
        return f"  (~{e.total / GIB:.0f} GiB/GPU on {e.setup.world} GPUs{note})"

    for same_plan in ({"objective__merged_generation": False} if s.merged_generation else None,
                      {"train__activation_checkpointing": True} if not s.activation_checkpointing else None,
                      one_row):
        if same_plan and (e := fitting(variant(cfg, **same_plan))):
            out.append(flags(cfg, same_plan) + fit_note(e))
            break
    for plan in [p for p in PLANS if p != cfg.parallel.name]:
        if layout_of(variant(cfg, parallel=plan), s.world) == s.layout:
            continue  # e.g. ddp for a one-GPU job under none: nothing would change
        for batch in ({}, one_row):
            if batch is None:
                continue
            found = None
            for nodes in range(s.nodes, 65):
                keys = {**batch, **({"launcher__nodes": nodes} if nodes != s.nodes else {})}
                c = variant(cfg, parallel=plan, **keys)
                if (e := fitting(c)):
                    found = flags(c, keys) + fit_note(e)
                    break
            if found:
                out.append(found)
                break
    if not s.quantized:  # an 8-bit base may fit as a 4-bit one
        for plan in [cfg.parallel.name, *[p for p in PLANS if p != cfg.parallel.name]]:
            c = variant(cfg, parallel=None if plan == cfg.parallel.name else plan, method="qlora")
            if (e := fitting(c)):
                out.append(flags(c, {}) + fit_note(e) + " 4-bit base")
                break
    return out


def check(cfg: DictConfig) -> Estimate | None:
    """Refuse (UserError) a configuration whose estimate exceeds launcher.gpu_mem_gb."""
    est = for_config(cfg)
    budget = gpu_budget(cfg)
    if est is None or budget is None or not cfg.launcher.check_memory:
        return est
    if est.fits(budget):
        return est
    s = est.setup
    ideas = suggestions(cfg, est, budget)
    hint = ("Configurations that fit by the same estimate:\n    " + "\n    ".join(ideas)) if ideas else (
        "No nearby configuration fits: use GPUs with more memory (launcher.gpu_mem_gb), more nodes, "
        "or a smaller model.")
    raise UserError(
        f"model={cfg.model.name} method={s.method} parallel={s.plan} on {s.world} GPU(s) needs about "
        f"{est.total / GIB:.0f} GiB per GPU, more than launcher.gpu_mem_gb={budget:g}; nothing was "
        f"submitted.\n{est.table(budget)}\n{hint}\n(Override the check with launcher.check_memory=false.)"
    )
