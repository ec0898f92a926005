"""How a plan lays the model state out over ranks: what the launcher needs to know about a
plan without building it (memory estimate, suggestions). Plain data, no torch state.

Each plan's spec (parallel/specs.py) answers `layout(cfg, world_size)`; the estimator
combines the answer with the architecture and never names a plan, and the runtime plan
divides its expected state bytes by it.
"""
from __future__ import annotations

from dataclasses import dataclass

STATE_PARTS = ("params", "grads", "optim")


@dataclass(frozen=True)
class Elements:
    """A number of tensor elements, fixed or scaling with the model's hidden size h (a
    DeepSpeed size left at `auto`): fixed + per_hidden_sq x h^2."""
    fixed: int = 0
    per_hidden_sq: float = 0.0

    def at(self, hidden: int) -> int:
        return int(self.fixed + self.per_hidden_sq * hidden * hidden)

    def __add__(self, other: "Elements") -> "Elements":
        return Elements(self.fixed + other.fixed, self.per_hidden_sq + other.per_hidden_sq)

    def __mul__(self, k: int) -> "Elements":
        return Elements(self.fixed * k, self.per_hidden_sq * k)


@dataclass(frozen=True)
class StateLayout:
    # parts of the model state split over the data-parallel ranks
    shards: frozenset = frozenset()
    # parts kept in host RAM instead of on the accelerator
    offload: frozenset = frozenset()
    # pipeline stages: each rank holds the state and activations of 1/stages of the layers
    stages: int = 1
    # micro-batches whose activations a rank holds at once (1F1B: min(stages, micro-batches))
    in_flight: int = 1
    # rows of one forward: a pipeline cuts micro_batch_size x grad_accum into micro-batches
    # (None: train.micro_batch_size)
    rows_per_forward: int | None = None
    # parameters are gathered unit by unit for compute (FSDP2, ZeRO-3): one unit plus one
    # prefetched, in the compute dtype, and one unit's unsharded gradients are alive
    gathers_units: bool = False
    # elements a plan may keep gathered at once, once it knows the module order (ZeRO-3 from
    # its second step: stage3_max_live_parameters + stage3_prefetch_bucket_size); none: one
    # unit and one prefetched layer
    live_gathered: Elements = Elements()
    # gradients are also copied into communication buckets of their full size (DDP)
    grad_buckets: bool = False
    # an fp32 master copy of the trainable weights beside the model's own (DeepSpeed),
    # split like the optimizer state
    master_copy: bool = False
    # the optimizer steps one flat tensor per rank (DeepSpeed): the step first copies the
    # rank's gradient partition into a new flat fp32 tensor, and AdamW's temporaries are as
    # large; at most step_group_elements at once (ZeRO-3's sub_group_size; 0: no limit)
    flat_step: bool = False
    step_group_elements: int = 0
    # elements of the plan's own gradient communication buffers, allocated whole
    # (DeepSpeed's reduce_bucket_size, twice with ZeRO-1/2's overlap_comm)
    buckets: Elements = Elements()
    # what a rank holds while it loads, on top of what it keeps: "tensor" (one tensor in
    # flight), "module" (one module's or FSDP unit's full tensors: ZeRO-3; FSDP2 quantizing
    # a 4-bit unit before it shards it), "whole" (the whole model before it is sharded: a
    # 4-bit base under ZeRO-3, QDoRA under every plan)
    load_transient: str = "tensor"
