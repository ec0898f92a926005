"""parallel=ddp: torch DistributedDataParallel, full replicas, gradients all-reduced."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.base import Plan


class DDP(Plan):
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if not self.env.distributed:
            return model, optimizer
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False), optimizer

    def no_sync(self, accumulating: bool):
        if accumulating and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()
