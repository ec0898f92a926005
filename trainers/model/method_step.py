"""What a PEFT method adds to each optimizer step beyond the optimizer itself, called by the
loop at one point (`MethodStep.step`, in place of `plan.step`). Only AdaLoRA has anything:

- its orthogonality regulariser. PEFT adds `orth_reg_weight x R` to `outputs.loss` in
  AdaLoraModel.forward, but only when the model computes the loss from labels; the
  objectives here compute their own sums from the logits, so the term would be silently
  missing. Its gradient is added once per optimizer step, after the data-parallel gradient
  sync: R depends only on the adapter weights, which every rank of the plans AdaLoRA runs
  under (none, ddp) holds whole and identical, so `grad(R)` is the same on every rank and
  summing it into each rank's averaged gradient is what putting it in the loss would give
  (and what PEFT's Trainer path does, before clipping).
- `update_and_allocate(step)` after the optimizer step and before `zero_grad` (PEFT's
  documented place: it reads the gradients for its sensitivity scores and masks lora_E).

The rank allocator's state (its sensitivity and uncertainty averages, PEFT keeps them in
plain dicts outside any state dict) and the rank pattern travel with the plan's checkpoint
(`state_dict` / `load_state_dict`, registered as the plan's `extra_state`), so a resume
continues the budget schedule exactly.
"""
from __future__ import annotations

import torch

from trainers.objectives.catalog import peft_model


class MethodStep:
    """A no-op for every method but AdaLoRA: `step` is `plan.step`."""

    def __init__(self, method_cfg, plan):
        self.plan = plan
        peft = peft_model(plan.inner) if method_cfg.peft == "adalora" else None
        self.tuner = peft.base_model if peft is not None else None
        self.last_orth_reg: float | None = None
        if self.tuner is None:
            return
        self.adapter = self.tuner.trainable_adapter_name
        self.config = self.tuner.peft_config[self.adapter]
        self.factors = [(n, p) for n, p in self.tuner.model.named_parameters()
                        if ("lora_A" in n or "lora_B" in n) and self.adapter in n]
        # PEFT creates these lazily (zeros) at the first update; creating them now, the
        # same zeros, gives the checkpoint a fixed set of tensors to load into.
        self._ensure_ipt()
        plan.extra_state = self

    def step(self, global_step: int, skip=None) -> float:
        """The optimizer step of `global_step` (0-based, PEFT's convention); returns the
        pre-clip gradient norm, as `plan.step` does."""
        if self.tuner is None:
            return self.plan.step(skip=skip)
        self._add_orthogonality_grad()
        return self.plan.step(skip=skip, after_update=lambda: self._allocate(global_step))

    # ------------------------------------------------------------------ AdaLoRA
    def _add_orthogonality_grad(self) -> None:
        weight = float(self.config.orth_reg_weight)
        if weight == 0 or not self.factors:
            return
        params = [p for _, p in self.factors]
        with torch.enable_grad():
            total = 0
            for n, p in self.factors:  # AdaLoraModel.forward's R: mean Frobenius norm of (P P^T - I)
                cov = p @ p.T if "lora_A" in n else p.T @ p
                total = total + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
            reg = total / len(self.factors)
            grads = torch.autograd.grad(weight * reg, params)
        self.last_orth_reg = float(reg.detach())
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def _allocate(self, global_step: int) -> None:
        self.tuner.update_and_allocate(global_step)
        self._ensure_ipt()  # PEFT empties its dicts when the budget is final

    def _ensure_ipt(self) -> None:
        alloc = self.tuner.rankallocator
        for n, p in self.tuner.model.named_parameters():
            if "lora_" in n and self.adapter in n and n not in alloc.ipt:
                alloc.ipt[n] = torch.zeros_like(p)
                alloc.exp_avg_ipt[n] = torch.zeros_like(p)
                alloc.exp_avg_unc[n] = torch.zeros_like(p)

    def _e_names(self) -> list[str]:
        return [n for n, _ in self.tuner.model.named_parameters() if f"lora_E.{self.adapter}" in n]

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, the same names and shapes at every step (DCP loads in place)."""
        alloc = self.tuner.rankallocator
        out = {}
        for n in sorted(alloc.exp_avg_ipt):
            out[f"exp_avg_ipt/{n}"] = alloc.exp_avg_ipt[n]
            out[f"exp_avg_unc/{n}"] = alloc.exp_avg_unc[n]
        pattern = self.config.rank_pattern
        out["rank_pattern_set"] = torch.tensor(1.0 if pattern else 0.0)
        for n in self._e_names():
            keep = pattern[n] if pattern else [True] * int(self.config.init_r)
            out[f"rank_pattern/{n}"] = torch.tensor(keep, dtype=torch.float32)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        alloc = self.tuner.rankallocator
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind == "exp_avg_ipt":
                alloc.exp_avg_ipt[name] = value.clone()
            elif kind == "exp_avg_unc":
                alloc.exp_avg_unc[name] = value.clone()
        if float(state["rank_pattern_set"]):
            self.config.rank_pattern = {n: [bool(v) for v in state[f"rank_pattern/{n}"].tolist()]
                                        for n in self._e_names()}
