"""What the launcher knows about each plan without building it: which method x plan x world
combinations it refuses, which checkpoints it can resume, and how it lays the model state out
per rank (parallel/layout.py). Plain Python, no torch: the estimator (launch/estimate.py) and
the checks before launch (launch/validate.py) read only this; the runtime plan a worker builds
(parallel/base.py and one module per plan) is named by `runtime` and imported on demand.
"""
from __future__ import annotations

import importlib

from parallel.layout import STATE_PARTS, Elements, StateLayout
from trainers.model.method_settings import plan_refusal as method_plan_refusal


class PlanSpec:
    """A plan as the launcher sees it. Subclasses answer for one family of plans; the
    defaults are the torch-native ones (replicas, DCP checkpoints)."""

    def __init__(self, name: str, runtime: str):
        self.name = name
        self.runtime = runtime  # "module:Class" of the runtime plan (parallel/base.py's interface)

    def runtime_class(self):
        module, attribute = self.runtime.split(":")
        return getattr(importlib.import_module(module), attribute)

    def refuse(self, cfg, world_size: int) -> str | None:
        """A reason this plan cannot run `cfg` (checked before any process starts)."""
        return None

    def layout(self, cfg, world_size: int) -> StateLayout:
        """How this plan lays out the model state per rank: replicas."""
        return StateLayout()

    def checkpoint_format(self, cfg) -> str:
        """What this plan's checkpoints hold, as far as another plan could load them: DCP
        state dicts under the unwrapped model's names reshard between world sizes and
        between none, ddp and fsdp2."""
        return "dcp"

    def refuse_resume(self, cfg, written: dict) -> str | None:
        """A reason this run cannot resume a checkpoint whose trainer_state.json is `written`
        (checked before any process starts)."""
        theirs, ours = written.get("checkpoint_format"), self.checkpoint_format(cfg)
        plan, method = written.get("plan"), written.get("method")
        if theirs is None:  # written before these fields existed: the load itself checks
            return None
        if theirs != ours:
            return (
                f"it was written by parallel={plan} ({theirs} checkpoint), which "
                f"parallel={cfg.parallel.name} ({ours}) cannot load. Resume with parallel={plan} "
                f"(at any world size), or start a new run in another hydra.run.dir."
            )
        if method != cfg.method.name:
            return (
                f"it was written by method={method}, and method={cfg.method.name} trains other "
                f"parameters. Resume with method={method}, or start a new run in another hydra.run.dir."
            )
        return None


def loads_4bit_whole(cfg) -> bool:
    """QDoRA (a 4-bit base with method.use_dora) loads the whole 4-bit model before a plan
    shards or prunes it: PEFT initialises DoRA from the quantized weights while it wraps
    them (ModelSource.loads_in_parts, trainers/model/load.py)."""
    m = cfg.method
    return bool(m.quantize) and m.peft == "lora" and bool(m.use_dora)


class SingleDeviceSpec(PlanSpec):
    """parallel=none: one process, one device; the reference every other plan is tested against."""

    def refuse(self, cfg, world_size: int) -> str | None:
        if world_size > 1:
            return (
                f"parallel=none runs one process, but {world_size} were requested; "
                f"use parallel=ddp, fsdp2 or a zero* plan for several processes."
            )
        return None


class DDPSpec(PlanSpec):
    """parallel=ddp: full replicas, gradients all-reduced."""

    def layout(self, cfg, world_size: int) -> StateLayout:
        # DDP all-reduces from buckets that hold a copy of every gradient
        return StateLayout(grad_buckets=world_size > 1)


class FSDP2Spec(PlanSpec):
    """parallel=fsdp2: parameters, gradients and optimizer state sharded over ranks."""

    def refuse(self, cfg, world_size: int) -> str | None:
        # Measured with 2 ranks: full lora qlora dora rslora loraplus prefix prompt ia3 all
        # train, evaluate, checkpoint, resume and export under fsdp2. What fails:
        m = cfg.method
        if m.quantize and m.peft is None:
            return (
                f"full fine-tuning of a 4-bit base (method.quantize={m.quantize}) does not work under "
                f"FSDP2: its sharded NF4 weights carry only packed data, without their quantization "
                f"state, and gathering the full state dict for export fails after training. Train "
                f"adapters on the 4-bit base with method=qlora under parallel=fsdp2, fine-tune all "
                f"weights with method.quantize=null, or keep this combination on parallel=ddp."
            )
        return method_plan_refusal(cfg, self.name)

    def layout(self, cfg, world_size: int) -> StateLayout:
        offload = frozenset(STATE_PARTS) if cfg.parallel.cpu_offload else frozenset()
        # a 4-bit base is quantized from whole tensors, one FSDP unit at a time
        transient = ("whole" if loads_4bit_whole(cfg) else "module") if cfg.method.quantize else "tensor"
        return StateLayout(shards=frozenset(STATE_PARTS), offload=offload, gathers_units=True,
                           load_transient=transient)


# DeepSpeed sizes (elements) that may be left at `auto`, scaled with the model's hidden size
# h: the gradient bucket and ZeRO-3's prefetch bucket are transformers' DeepSpeed rules
# (h^2, 0.9 h^2); ZeRO-3's live-parameter cap and reuse distance are about one Llama decoder
# layer (12 h^2: 4 h^2 attention, 8 h^2 MLP), so a rank releases a module's gathered weights
# after its forward and prefetches at most one layer ahead (what FSDP2 holds), at the 360M
# bench model as at 70B (DeepSpeed's fixed 1e9 keeps every weight of a model under 1B
# parameters gathered from forward to backward).
DEEPSPEED_AUTO_PER_HIDDEN_SQ = {
    "reduce_bucket_size": 1.0,
    "stage3_prefetch_bucket_size": 0.9,
    "stage3_max_live_parameters": 12.0,
    "stage3_max_reuse_distance": 12.0,
}
ZERO3_ONLY = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")


def deepspeed_size(p, key: str) -> Elements:
    """parallel.<key> as elements: a number the user set, or `auto`'s multiple of h^2."""
    value = p[key]
    return Elements(per_hidden_sq=DEEPSPEED_AUTO_PER_HIDDEN_SQ[key]) if value == "auto" else Elements(int(value))


def deepspeed_sizes(p, stage: int, hidden: int) -> dict[str, int]:
    """The sizes DeepSpeed is given for a model of hidden size `hidden`."""
    return {key: deepspeed_size(p, key).at(hidden) for key in DEEPSPEED_AUTO_PER_HIDDEN_SQ
            if stage == 3 or key not in ZERO3_ONLY}


def _bad_deepspeed_size(p, stage: int) -> str | None:
    for key, per in DEEPSPEED_AUTO_PER_HIDDEN_SQ.items():
        if stage != 3 and key in ZERO3_ONLY:
            continue
        if key not in p:  # parallel=zero1 parallel.stage=3: zero3's own settings are missing
            return f"parallel.stage={stage} needs parallel=zero3 (or zero3_offload), which defines parallel.{key}."
        value = p[key]
        if value != "auto" and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return (
                f"parallel.{key}={value!r} must be auto (scaled to the model's hidden size h: "
                f"{per:g} x h^2 elements) or a whole number of elements >= 0."
            )
    return None


ZERO_SHARDS = {
    1: frozenset({"optim"}),
    2: frozenset({"optim", "grads"}),
    3: frozenset({"params", "grads", "optim"}),
}


class DeepSpeedZeroSpec(PlanSpec):
    """parallel=zero1|zero2|zero3|zero3_offload: DeepSpeed ZeRO at `parallel.stage`."""

    def refuse(self, cfg, world_size: int) -> str | None:
        p = cfg.parallel
        stage = p.stage
        if stage not in (1, 2, 3):
            return f"parallel.stage={stage!r} must be 1, 2 or 3 (use parallel=zero1, zero2, zero3 or zero3_offload)."
        if p.offload_param and stage != 3:
            return (
                f"parallel.offload_param=true needs ZeRO stage 3, but parallel.stage={stage}: only "
                f"stage 3 partitions parameters, so there is nothing to offload. Use "
                f"parallel=zero3_offload, or parallel.offload_optimizer=true to offload the "
                f"optimizer state at stage {stage}."
            )
        return _bad_deepspeed_size(p, stage) or method_plan_refusal(cfg, self.name)

    def layout(self, cfg, world_size: int) -> StateLayout:
        p = cfg.parallel
        stage = int(p.stage)
        offload = set()
        if p.offload_param:
            offload.add("params")
        if p.offload_optimizer:
            offload |= {"optim", "grads"}
        transient = ("whole" if loads_4bit_whole(cfg) else "module") if stage == 3 else "tensor"
        buffers = 2 if p.overlap_comm and stage < 3 else 1
        bucket = deepspeed_size(p, "reduce_bucket_size") * buffers if p.contiguous_gradients else Elements()
        # ZeRO-3 steps its flat partition in sub-groups of parallel.sub_group_size
        group = int(p.sub_group_size) if stage == 3 else 0
        # From the second step ZeRO-3 prefetches along the recorded module order and keeps
        # gathered parameters alive up to max live + one prefetch bucket
        live = (deepspeed_size(p, "stage3_max_live_parameters") + deepspeed_size(p, "stage3_prefetch_bucket_size")
                if stage == 3 else Elements())
        return StateLayout(shards=ZERO_SHARDS[stage], offload=frozenset(offload), gathers_units=stage == 3,
                           live_gathered=live, master_copy=True, flat_step=True,
                           step_group_elements=group, buckets=bucket, load_transient=transient)

    def checkpoint_format(self, cfg) -> str:
        return f"deepspeed-zero{cfg.parallel.stage}"  # universal conversion keeps the stage


# pipeline schedules, and the virtual stages each process holds under them
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
VIRTUAL_STAGES = {"1f1b": 1, "gpipe": 1, "interleaved_1f1b": 2}
# Backbones whose forward accepts `inputs_embeds` without transforming them and applies
# the same mask to every layer: safe to run one slice of layers at a time.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
REFUSED_METHODS = {
    "prefix": (
        "prefix tuning feeds learned key/values to every layer through PeftModel.forward, "
        "which pipeline stages bypass (each stage runs only its own layers)"
    ),
    "prompt": (
        "prompt tuning prepends virtual tokens in PeftModel.forward, which pipeline stages "
        "bypass (each stage runs only its own layers)"
    ),
}


class PipelineSpec(PlanSpec):
    """parallel=pipeline: decoder layers split over `parallel.stages` processes, data parallel
    across (parallel/pipeline.py)."""

    def refuse(self, cfg, world_size: int) -> str | None:
        p = cfg.parallel
        stages, micro, schedule = p.stages, p.microbatches, p.schedule
        if schedule not in PIPELINE_SCHEDULES:
            return f"parallel.schedule={schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}."
        for key, value in (("stages", stages), ("microbatches", micro)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"parallel.{key}={value!r} must be a positive integer."
        if stages < 2:
            return ("parallel.stages=1 is no pipeline; use parallel=ddp (or none for one process), "
                    "or parallel.stages >= 2.")
        if world_size % stages:
            return (f"the world size ({world_size} processes) must be a multiple of parallel.stages "
                    f"({stages}): the remaining dimension is data parallel. Use "
                    f"launcher.nproc_per_node (x nodes) = {stages}, {2 * stages}, ...")
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum
        if rows % micro:
            return (f"each data-parallel rank computes train.micro_batch_size x train.grad_accum = {rows} "
                    f"rows per step, which parallel.microbatches={micro} does not divide; pick "
                    f"microbatches among the divisors of {rows}.")
        if schedule == "1f1b" and micro < stages:
            return (f"schedule=1f1b needs parallel.microbatches >= parallel.stages (got {micro} < "
                    f"{stages}); raise microbatches (and train.micro_batch_size x grad_accum) or use "
                    f"schedule=gpipe.")
        if schedule == "interleaved_1f1b":
            rounds = max(1, micro // stages)
            if micro % rounds:
                return (f"schedule=interleaved_1f1b needs parallel.microbatches to be a multiple of "
                        f"max(1, microbatches // stages) = {rounds}; got {micro}. Use a multiple of "
                        f"{stages}.")
        m = cfg.method
        if method_plan_refusal(cfg, self.name):
            return method_plan_refusal(cfg, self.name)
        if m.name in REFUSED_METHODS or m.peft in REFUSED_METHODS:
            why = REFUSED_METHODS.get(m.name) or REFUSED_METHODS[m.peft]
            return (f"{why}. Use method=lora (or dora, rslora, loraplus, ia3, full) with the pipeline, "
                    f"or parallel=ddp / fsdp2 for method={m.name}.")
        if cfg.objective.name == "reward":
            return ("objective=reward is not trained by the pipeline: its stages carry a causal LM's decoder "
                    "and lm_head and its last stage computes the token cross-entropy, while a reward model "
                    "ends in a sequence-classification head scored at each sequence's last token, chosen and "
                    "rejected together. Use parallel=none, ddp, fsdp2 or zero1/zero2/zero3 for objective=reward.")
        if cfg.objective.name != "sft":
            return (f"objective={cfg.objective.name} is not trained by the pipeline: its last stage computes "
                    f"only the token cross-entropy of each pipeline micro-batch, while a preference objective "
                    f"needs per-sequence log-probs of chosen and rejected together, a reference pass (adapter "
                    f"disabled) in the same schedule and, for orpo/kto, a pre-pass over the global batch. Use "
                    f"parallel=ddp, fsdp2 or zero1/zero2/zero3 for objective={cfg.objective.name}.")
        return self._refuse_model(cfg, stages * VIRTUAL_STAGES[schedule])

    def layout(self, cfg, world_size: int) -> StateLayout:
        p = cfg.parallel
        stages, micro = int(p.stages), int(p.microbatches)
        rows = int(cfg.train.micro_batch_size) * int(cfg.train.grad_accum)
        return StateLayout(stages=stages, in_flight=min(stages, micro), rows_per_forward=max(1, rows // micro),
                           load_transient="whole" if loads_4bit_whole(cfg) else "tensor")

    def checkpoint_format(self, cfg) -> str:
        return "dcp-flat-optimizer"

    @staticmethod
    def _refuse_model(cfg, chunks: int) -> str | None:
        from types import SimpleNamespace

        from trainers.model.config_json import architecture

        values = architecture(cfg.model)  # a local config.json or the preset's arch: plain JSON
        if values is None:  # a hub id without a preset arch: transformers fetches its config
            from trainers.model.load import load_config

            config = load_config(cfg.model)
        else:
            config = SimpleNamespace(**values)
        mtype = getattr(config, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            return (f"model_type {mtype!r} is not one of the Llama-family backbones the pipeline "
                    f"split supports ({', '.join(SUPPORTED_MODEL_TYPES)}); use parallel=fsdp2.")
        layer_types = getattr(config, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            return ("the model mixes attention types per layer (sliding / full), which a stage that "
                    "runs a slice of layers cannot index correctly; use parallel=fsdp2.")
        n_layers = config.num_hidden_layers
        if chunks > n_layers:
            return (f"{chunks} pipeline stages{' (2 virtual per process)' if chunks > cfg.parallel.stages else ''} "
                    f"but the model has only {n_layers} decoder layers: every stage needs at least "
                    f"one. Use parallel.stages <= {n_layers // (chunks // cfg.parallel.stages)}.")
        if getattr(config, "tie_word_embeddings", False) and cfg.method.peft is None:
            return ("the model ties its input and output embeddings, which live on the first and "
                    "last stage: full fine-tuning would update the two copies apart. Use a LoRA-family "
                    "method (the frozen tied weights stay identical), or parallel=fsdp2 / ddp for "
                    "method=full.")
        return None


def _specs(*specs: PlanSpec) -> dict[str, PlanSpec]:
    return {s.name: s for s in specs}


# name -> spec; the runtime classes are imported on first use (DeepSpeed costs seconds).
SPECS: dict[str, PlanSpec] = _specs(
    SingleDeviceSpec("none", "parallel.base:Plan"),
    DDPSpec("ddp", "parallel.ddp:DDP"),
    DeepSpeedZeroSpec("zero1", "parallel.deepspeed_zero:DeepSpeedZero"),
    DeepSpeedZeroSpec("zero2", "parallel.deepspeed_zero:DeepSpeedZero"),
    DeepSpeedZeroSpec("zero3", "parallel.deepspeed_zero:DeepSpeedZero"),
    DeepSpeedZeroSpec("zero3_offload", "parallel.deepspeed_zero:DeepSpeedZero"),
    FSDP2Spec("fsdp2", "parallel.fsdp2:FSDP2"),
    PipelineSpec("pipeline", "parallel.pipeline:Pipeline"),
)
