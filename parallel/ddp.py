"""parallel=ddp: torch DistributedDataParallel, full replicas, gradients all-reduced."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.base import Plan


class DDP(Plan):
    name = "ddp"

    @classmethod
    def layout(cls, cfg, world_size: int):
        from parallel.layout import StateLayout

        # DDP all-reduces from buckets that hold a copy of every gradient
        return StateLayout(grad_buckets=world_size > 1)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.env.distributed:
            return model
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def no_sync(self, accumulating: bool):
        if accumulating and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.inner
