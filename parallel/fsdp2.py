"""parallel=fsdp2: torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state
are sharded over data-parallel ranks (DTensor Shard(0)).

Each decoder layer is one FSDP unit (all-gathered before its forward, resharded after);
so are the input embeddings and the lm_head when untied; the root (final norm, tied
embeddings, a PEFT wrapper's own parameters such as prompt embeddings) is the last unit.
PEFT is applied before sharding, so the same layer search works through a PeftModel. QLoRA shards too: the NF4 weights are stored as bf16
(`bnb_4bit_quant_storage`), so FSDP sees ordinary tensors and bitsandbytes restores the
quantization state after the all-gather.

Gradients: FSDP2 averages them over ranks; `Plan.backward` multiplies each micro-batch's
share of the global mean by the world size, so the result is the exact global-batch
gradient (a power-of-two world size scales without rounding). During accumulation
`set_requires_gradient_sync(False)` keeps unsharded gradients local, and the last
micro-batch reduce-scatters their sum once.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from parallel.base import Plan

log = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (also inside a PEFT
    wrapper): the classes the model names in `_no_split_modules` (LlamaDecoderLayer, ...),
    else the children of the largest homogeneous nn.ModuleList."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    # keep outermost matches only (a block class never nests in a well-formed model)
    outer = [m for m in layers if not any(m is not o and m in set(o.modules()) for o in layers)]
    if outer:
        return outer
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            if sum(p.numel() for p in m.parameters()) > sum(p.numel() for b in best for p in b.parameters()):
                best = list(m)
    return best


def params_to_meta(model: torch.nn.Module) -> None:
    """Every parameter becomes a meta tensor of its shape and dtype (tied ones stay tied)."""
    from trainers.model.weights import replace_parameters

    replace_parameters(model, lambda _, p: torch.nn.Parameter(
        torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad))


def shard_rows(p: torch.Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of dim 0 this rank holds of a Shard(0) DTensor (None: all)."""
    if not hasattr(p, "device_mesh"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return (offset[0], offset[0] + shape[0]) if len(shape) else None


def vocab_units(model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """(input embeddings, output head) when they can be FSDP units of their own: both exist
    and share no weight; else () (tied ones stay in the root)."""
    lm = causal_lm(model)
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if embeddings is None or head is None:
        return ()
    if {id(p) for p in embeddings.parameters()} & {id(p) for p in head.parameters()}:
        return ()
    return embeddings, head


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward `generate` calls repeatedly (the HF *ForCausalLM)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and hasattr(m, "generate"):
            return m
    return model


class FSDP2(Plan):
    # ------------------------------------------------------------------------ setup
    def build(self, source) -> torch.nn.Module:
        """Shard first, load second: the model is built with its checkpoint weights on the
        meta device, `fully_shard` splits them, and each rank reads only the rows of its own
        shards from the safetensors files. A rank's peak is its shards plus one tensor's
        rows, never the whole model. (4-bit bases: `_build_quantized`.)"""
        from trainers.model.weights import checkpoint_names, init_dora_magnitudes

        mesh = self._mesh()
        if source.quantized:
            return self._build_quantized(source, mesh)
        model = source.skeleton()
        files = source.files()
        from_files = checkpoint_names(model, files)
        # The skeleton's own tensors (fresh adapters, buffers), kept by reference: params_to_meta
        # only swaps the modules' parameters, so no copy is needed (a copy of LoRA's
        # adapters is 34 MiB per rank at 360M, 0.8 GB at 70B).
        fresh = {n: p.detach() for n, p in model.named_parameters() if n not in from_files}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        params_to_meta(model)
        self._shard(model, mesh)
        # With CPU offload the sharded state lives in host memory (FSDP2 moves each unit's
        # parameters to the device for compute); buffers are used on the device as they are.
        offload = bool(self.cfg.parallel.cpu_offload)
        model.to_empty(device=torch.device("cpu") if offload else self.env.device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                rows = shard_rows(p)
                local = p.to_local() if hasattr(p, "to_local") else p
                if name in from_files:
                    value = files.read(from_files[name], p.dtype, rows)
                else:
                    value = fresh[name] if rows is None else fresh[name][rows[0] : rows[1]]
                local.copy_(value)
            for prefix, module in model.named_modules():
                for key, b in module._buffers.items():
                    if b is not None:
                        module._buffers[key] = buffers[f"{prefix}.{key}" if prefix else key].to(self.env.device)
            init_dora_magnitudes(model, rows_of=lambda t: t.to_local() if hasattr(t, "to_local") else t)
        return model

    def _build_quantized(self, source, mesh) -> torch.nn.Module:
        """A 4-bit weight is quantized from its whole bf16 tensor, so every rank reads every
        tensor; but each unit is sharded as soon as its weights are in: a rank holds its
        shards plus one unit's 4-bit weights and one bf16 tensor, never the whole 4-bit
        model (QDoRA, which PEFT initialises from quantized weights, loads whole first)."""
        device = self.env.device
        if not source.loads_in_parts:
            model = source.whole(device)
            self._shard(model, mesh)
            return model
        model = source.skeleton()
        self._shard(model, mesh, before=lambda unit: source.fill(model, device, within=unit))
        for module in model.modules():
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.to(device)
        return model

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            # One process (launcher.nproc_per_node=1): a one-rank group, so that the
            # same sharded code path (and checkpoint format) runs for debugging.
            dist.init_process_group(
                backend="nccl" if self.env.device.type == "cuda" else "gloo",
                store=dist.HashStore(), rank=0, world_size=1,
            )
        return init_device_mesh(self.env.device.type, (self.dp_world,), mesh_dim_names=("dp",))

    def _policies(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        p = self.cfg.parallel
        kwargs: dict = {}
        if p.mixed_precision:
            # Parameters are all-gathered in the compute dtype (no cast when it is fp32:
            # a cast would also rewrite the bf16-stored NF4 weights); gradients are
            # reduced in fp32.
            param_dtype = None if self.compute_dtype == torch.float32 else self.compute_dtype
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if p.cpu_offload:
            if self.env.device.type == "cpu" and self.env.is_main:
                log.info("parallel.cpu_offload=true on a CPU run: the state is in CPU memory already")
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        else:
            kwargs["offload_policy"] = OffloadPolicy()
        return kwargs

    def _shard(self, model: torch.nn.Module, mesh, before=lambda unit: None) -> None:
        """fully_shard each decoder layer, the untied embeddings and head, then the root;
        `before(unit)` runs right before each unit is sharded (to fill its weights)."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        kwargs = self._policies()
        layers = decoder_layers(model)
        if not layers:
            from trainers.errors import UserError

            raise UserError(
                f"parallel=fsdp2 found no repeated decoder layers in {type(model).__name__} to shard; "
                f"use parallel=ddp for this model."
            )
        reshard = bool(self.cfg.parallel.reshard_after_forward)
        for layer in layers:
            before(layer)
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, **kwargs)
        self.vocab_units = vocab_units(model)
        if self.vocab_units:
            embeddings, head = self.vocab_units
            # Own units, as torchtitan shards them: at Llama-3's vocabulary each is 0.5B
            # parameters, which the root would keep gathered for the whole step. The
            # embeddings are used once per forward; the head again right at backward.
            before(embeddings)
            fully_shard(embeddings, mesh=mesh, reshard_after_forward=True, **kwargs)
            before(head)
            fully_shard(head, mesh=mesh, reshard_after_forward=False, **kwargs)
        # The root keeps its (small) parameters gathered from forward to backward.
        before(model)
        fully_shard(model, mesh=mesh, **kwargs)
        lm = causal_lm(model)
        if lm is not model:
            # PeftModel.generate calls the inner model's forward, which no FSDP hook
            # covers: make generate itself gather/release the root's parameters.
            register_fsdp_forward_method(model, "generate")
        self.layers = layers

    # ------------------------------------------------------------------- train step
    def no_sync(self, accumulating: bool):
        if self.model is None or not hasattr(self.model, "set_requires_gradient_sync"):
            return contextlib.nullcontext()
        # Set, not restored: the next micro-batch sets it again, and the last one of a
        # step (accumulating=False) turns the reduce-scatter back on.
        self.model.set_requires_gradient_sync(not accumulating)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------- export
    @contextlib.contextmanager
    def unsharded(self):
        """The root unit (norm and PEFT's prompt encoder), the embeddings and the head
        gathered whole; the layers are their own units and stay sharded."""
        units = [self.model, *self.vocab_units]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
