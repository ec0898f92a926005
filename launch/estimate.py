"""Memory per GPU, estimated from the architecture alone (no weights are loaded).

The architecture comes from `model.arch` (presets: 1b ... 70b) or, for a local model
directory, from its config.json. The estimate is what one rank holds at its peak:

    total = params + grads + optimizer + activations + buffers + overhead

  P          parameter count: per decoder layer q,o = h*h; k,v = h*kv (kv = kv_heads *
             h/heads); gate,up,down = h*I; two RMSNorms 2h. Plus embeddings V*h, lm_head
             V*h (0 if tied) and the final norm h.
  T          trainable parameters: full = P; LoRA (r, targets) = sum over targeted
             linears of r*(in+out) (+ out per module for DoRA's magnitude); IA3, prompt
             and prefix tuning are a few vectors (counted, but tiny).
  params     as trainers/model.py loads them: fp32 = 4 B/param; QLoRA: the decoder's
             linear weights in NF4 = 0.5 B/param + double-quantized absmax constants
             (~0.127 bit/param), everything else (embeddings, lm_head, norms) fp32 after
             prepare_model_for_kbit_training; adapters fp32 (4 B).
  grads      4 B per trainable parameter (fp32).
  optimizer  8 B per trainable parameter (AdamW's two fp32 moments).
  sharding   each of params / grads / optimizer is divided by the data-parallel world
             size when the plan shards it (Plan.shards: ddp none, zero1 optim, zero2
             optim+grads, zero3 and fsdp2 all three). Offloaded state (zero3_offload,
             fsdp2 cpu_offload) lives in CPU RAM: the GPU keeps only working buffers.
             A pipeline (parallel.stages = S) holds 1/S of the layers' state, and the
             activations of its layers for min(S, parallel.microbatches) micro-batches.
  activations  no recomputation (the loop does not enable gradient checkpointing), for
             one micro-batch of t = micro_batch_size * max_seq_len tokens, a bytes per
             element (2 under bf16 autocast - train.precision auto assumes a bf16 GPU -,
             4 in fp32):
                 per layer and token (6h + 2kv + 4I) elements: attention saves the norm
                 and projection inputs, q, k, v and the attention output (sdpa: no s^2
                 term); the SwiGLU MLP its two inputs and gate, up, act(gate), product
                 (Korthikanti et al. 2022, "Reducing Activation Recomputation", adapted
                 from GPT's 34 s*b*h bytes to GQA + SwiGLU, no dropout)
                 + logits: t*V*(a + 8) bytes (logits, fp32 log-softmax and its gradient).
  buffers    plans that shard parameters gather whole units to compute: the largest
             unit (the root: embeddings + lm_head + final norm, or one decoder layer) +
             one prefetched decoder layer, in the compute dtype, + one layer's unsharded
             fp32 gradients before the reduce-scatter. QLoRA dequantizes one linear at a
             time (h*I elements in bf16).
  overhead   CUDA context + NCCL (1.5 GiB) + 10 % allocator fragmentation.

It is an estimate (+-20 % is typical): it exists to refuse what cannot fit before
anything is queued, and to say what would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainers.errors import UserError

GIB = 2**30
CUDA_OVERHEAD = 1.5 * GIB
FRAGMENTATION = 0.10
NF4_BYTES = 0.5 + 0.127 / 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Sharding of plans that are suggested (the current plan's comes from its class).
PLAN_SHARDS = {
    "none": frozenset(), "ddp": frozenset(), "zero1": frozenset({"optim"}),
    "zero2": frozenset({"optim", "grads"}), "zero3": frozenset({"params", "grads", "optim"}),
    "zero3_offload": frozenset({"params", "grads", "optim"}), "fsdp2": frozenset({"params", "grads", "optim"}),
}


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
    quantized: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    dora: bool
    virtual_tokens: int
    plan: str
    shards: frozenset
    offload: frozenset   # subset of {"params", "grads", "optim"} kept in CPU RAM
    world: int
    nodes: int
    tokens: int          # per micro-batch
    act_bytes: int
    stages: int = 1      # pipeline stages (parallel=pipeline): layers split over them
    in_flight: int = 1   # micro-batches whose activations a stage holds at once (1F1B)


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

    @property
    def total(self) -> float:
        """Bytes."""
        return self.params + self.grads + self.optim + self.activations + self.buffers + self.overhead

    def fits(self, gpu_mem_gb: float) -> bool:
        return self.total <= gpu_mem_gb * GIB

    def table(self, gpu_mem_gb: float | None) -> str:
        s = self.setup
        lines = [
            f"memory per GPU (estimate; formula in launch/estimate.py), {s.world} rank(s):",
            f"  parameters   {_bytes(self.params)}   {_count(self.total_params)} params"
            + (", 4-bit base" if s.quantized else "") + _sharded("params", s),
            f"  gradients    {_bytes(self.grads)}   {_count(self.trainable)} trainable" + _sharded("grads", s),
            f"  optimizer    {_bytes(self.optim)}   AdamW, 8 B/trainable param" + _sharded("optim", s),
            f"  activations  {_bytes(self.activations)}   {s.tokens} tokens/micro-batch, {s.act_bytes} B/element",
            f"  buffers      {_bytes(self.buffers)}   gathered units / dequantization",
            f"  overhead     {_bytes(self.overhead)}   CUDA context + fragmentation",
            f"  total        {_bytes(self.total)}"
            + (f"   of launcher.gpu_mem_gb={gpu_mem_gb:g}" if gpu_mem_gb else "   (launcher.gpu_mem_gb not set: not checked)"),
        ]
        return "\n".join(lines)


def _bytes(b: float) -> str:
    return f"{b / GIB:8.1f} GiB" if b >= GIB or b == 0 else f"{b / 2**20:8.1f} MiB"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _sharded(part: str, s: Setup) -> str:
    if part in s.offload:
        return " (offloaded to CPU)"
    pipeline = f" (1/{s.stages} of the layers per stage)" if s.stages > 1 else ""
    return (f" (sharded /{s.world})" if part in s.shards and s.world > 1 else "") + pipeline


# ----------------------------------------------------------------------- inputs
def arch_of(model_cfg) -> Arch | None:
    """From `model.arch`, else the config.json of a local model directory (no weights)."""
    src = model_cfg.get("arch")
    if src is None:
        path = Path(str(model_cfg.path)).expanduser() / "config.json"
        if not path.is_file():
            return None
        src = json.loads(path.read_text())
    heads = int(src["num_attention_heads"])
    return Arch(
        hidden=int(src["hidden_size"]), layers=int(src["num_hidden_layers"]), heads=heads,
        kv_heads=int(src.get("num_key_value_heads") or heads), intermediate=int(src["intermediate_size"]),
        vocab=int(src["vocab_size"]), tied=bool(src.get("tie_word_embeddings", False)),
    )


def plan_sharding(parallel_cfg) -> tuple[frozenset, frozenset]:
    """(sharded, offloaded) parts of the model state for this plan's config."""
    from parallel import plan_class

    cls = plan_class(parallel_cfg.name)
    if hasattr(cls, "shards_for") and parallel_cfg.get("stage") is not None:
        shards = cls.shards_for(parallel_cfg.stage)
    else:
        shards = cls.shards
    offload = set()
    if parallel_cfg.get("offload_param") or parallel_cfg.get("cpu_offload"):
        offload |= {"params", "grads", "optim"} if parallel_cfg.get("cpu_offload") else {"params"}
    if parallel_cfg.get("offload_optimizer"):
        offload |= {"optim", "grads"}
    return frozenset(shards), frozenset(offload)


def setup_of(cfg: DictConfig) -> Setup:
    from launch.validate import world_size

    m = cfg.method
    targets = m.get("target_modules")
    if targets is None or targets == "all-linear":
        targets = LINEARS
    elif isinstance(targets, str):
        targets = (targets,)
    shards, offload = plan_sharding(cfg.parallel)
    precision = cfg.train.precision
    rows = int(cfg.train.micro_batch_size)
    stages = int(cfg.parallel.get("stages") or 1)
    in_flight = 1
    if stages > 1:  # a pipeline cuts each rank's micro_batch x grad_accum rows into microbatches
        micro = int(cfg.parallel.get("microbatches") or 1)
        rows = max(1, rows * int(cfg.train.grad_accum) // micro)
        in_flight = min(stages, micro)
    return Setup(
        method=m.name, peft=m.get("peft"), quantized=m.get("quantize") == "nf4",
        lora_r=int(m.get("r") or 0), lora_targets=tuple(t for t in targets if t in LINEARS),
        dora=bool(m.get("use_dora")), virtual_tokens=int(m.get("num_virtual_tokens") or 0),
        plan=cfg.parallel.name, shards=shards, offload=offload, world=world_size(cfg),
        nodes=int(cfg.launcher.get("nodes", 1) or 1),
        tokens=rows * int(cfg.data.max_seq_len),
        act_bytes=4 if precision == "fp32" else 2, stages=stages, in_flight=in_flight,
    )


# ------------------------------------------------------------------------ model
def trainable_params(a: Arch, s: Setup) -> int:
    if s.peft is None:
        return a.total_params
    if s.peft == "lora":
        shapes = a.linear_shapes()
        per_layer = sum(s.lora_r * sum(shapes[t]) + (shapes[t][1] if s.dora else 0) for t in s.lora_targets)
        return a.layers * per_layer
    if s.peft == "ia3":
        return a.layers * (2 * a.kv_dim + a.intermediate)
    if s.peft == "prompt":
        return s.virtual_tokens * a.hidden
    if s.peft == "prefix":
        return s.virtual_tokens * a.layers * 2 * a.kv_dim
    return 0


def estimate(a: Arch, s: Setup) -> Estimate:
    total = a.total_params
    trainable = trainable_params(a, s)
    adapters = 0 if s.peft is None else trainable
    if s.quantized:
        quantized = a.layers * a.layer_linear_params
        params = quantized * NF4_BYTES + (total - quantized) * 4 + adapters * 4
    else:
        params = total * 4 + adapters * 4
    grads, optim = trainable * 4, trainable * 8

    def per_rank(part: str, value: float) -> float:
        if part in s.offload:
            return 0.0
        return value / s.world if part in s.shards else value

    params, grads, optim = (per_rank(k, v) / s.stages for k, v in
                            (("params", params), ("grads", grads), ("optim", optim)))

    layers_here = -(-a.layers // s.stages)
    act_elems_per_token = layers_here * (6 * a.hidden + 2 * a.kv_dim + 4 * a.intermediate)
    activations = (s.in_flight * s.tokens * act_elems_per_token * s.act_bytes
                   + s.tokens * a.vocab * (s.act_bytes + 8))

    layer = a.layer_linear_params + 2 * a.hidden
    buffers = 0.0
    if "params" in s.shards and s.world > 1 or "params" in s.offload:
        unit_bytes = NF4_BYTES if s.quantized else s.act_bytes
        root_bytes = 4 if s.quantized else s.act_bytes  # QLoRA keeps the root in fp32
        buffers += max(a.root_params * root_bytes, layer * unit_bytes) + layer * unit_bytes
        layer_trainable = trainable / max(a.layers, 1) if s.peft else layer
        buffers += layer_trainable * 4
    if s.quantized:
        buffers += a.hidden * a.intermediate * 2
    subtotal = params + grads + optim + activations + buffers
    overhead = CUDA_OVERHEAD + FRAGMENTATION * subtotal
    return Estimate(s, total, trainable, params, grads, optim, activations, buffers, overhead)


# ------------------------------------------------------------------- the check
def for_config(cfg: DictConfig) -> Estimate | None:
    a = arch_of(cfg.model)
    return None if a is None else estimate(a, setup_of(cfg))


def gpu_budget(cfg: DictConfig) -> float | None:
    value = cfg.launcher.get("gpu_mem_gb")
    return float(value) if value else None


def suggestions(cfg: DictConfig, est: Estimate, budget: float) -> list[str]:
    """Nearby configurations that fit, as command-line overrides."""
    from parallel import plan_class

    a, s = arch_of(cfg.model), est.setup
    base = replace(s, stages=1, in_flight=1, tokens=int(cfg.train.micro_batch_size) * int(cfg.data.max_seq_len))
    per_node = max(1, s.world // max(s.nodes, 1))
    out: list[str] = []

    def fits(setup: Setup) -> Estimate | None:
        e = estimate(a, setup)
        return e if e.fits(budget) else None

    def allowed(plan: str) -> bool:
        """Would the plan accept this method? (asked with that plan's own settings)"""
        if plan == s.plan:
            return True
        container = OmegaConf.to_container(cfg, resolve=True)
        container["parallel"] = {"name": plan, "stage": 3 if plan.startswith("zero3") else None}
        try:
            return plan_class(plan).refuse(OmegaConf.create(container), s.world) is None
        except UserError:
            return False

    seq = int(cfg.data.max_seq_len)
    smaller_batch = (f" train.micro_batch_size=1 train.grad_accum={cfg.train.grad_accum * cfg.train.micro_batch_size}"
                     if base.tokens > seq else None)
    for plan in [p for p in ("fsdp2", "zero3") if allowed(p)]:
        # fewest nodes that fit, first with the current micro-batch, then with 1 row
        for tokens, batch in ((base.tokens, ""), (seq, smaller_batch)):
            if batch is None:
                continue
            e = next((e for nodes in range(s.nodes, 65) if (e := fits(replace(
                base, plan=plan, shards=PLAN_SHARDS[plan], offload=frozenset(), world=nodes * per_node,
                nodes=nodes, tokens=tokens)))), None)
            if e:
                nodes = e.setup.nodes
                extra = f" launcher.nodes={nodes}" if nodes != s.nodes else ""
                out.append(f"parallel={plan}{extra}{batch}  (~{e.total / GIB:.0f} GiB/GPU on {nodes * per_node} GPUs)")
                break
    if not s.quantized:
        q = replace(base, method="qlora", peft="lora", quantized=True, lora_r=s.lora_r or 16,
                    lora_targets=s.lora_targets or LINEARS, plan="fsdp2", shards=PLAN_SHARDS["fsdp2"],
                    offload=frozenset())
        e = fits(q)
        if e:
            out.append(f"method=qlora parallel=fsdp2  (~{e.total / GIB:.0f} GiB/GPU, 4-bit base)")
    if not s.quantized and "params" not in s.offload:
        e = fits(replace(base, plan="zero3_offload", shards=PLAN_SHARDS["zero3_offload"],
                         offload=frozenset({"params", "grads", "optim"})))
        if e:
            whole = estimate(a, replace(base, world=1, shards=frozenset(), offload=frozenset()))
            cpu = (whole.params + whole.grads + whole.optim) / max(s.nodes, 1) / GIB
            out.append(f"parallel=zero3_offload  (~{e.total / GIB:.0f} GiB/GPU; needs ~{cpu:.0f} GiB "
                       f"of CPU RAM per node for the offloaded state)")
    if s.stages == 1 and s.tokens > cfg.data.max_seq_len:
        e = fits(replace(s, tokens=int(cfg.data.max_seq_len)))
        if e:
            out.append(
                f"train.micro_batch_size=1 train.grad_accum={cfg.train.grad_accum * cfg.train.micro_batch_size}"
                f"  (same global batch, ~{e.total / GIB:.0f} GiB/GPU)"
            )
    return out


def check(cfg: DictConfig) -> Estimate | None:
    """Refuse (UserError) a configuration whose estimate exceeds launcher.gpu_mem_gb."""
    est = for_config(cfg)
    budget = gpu_budget(cfg)
    if est is None or budget is None or not cfg.launcher.get("check_memory", True):
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
