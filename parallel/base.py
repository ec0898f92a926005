"""The runtime plan: the interface the training loop receives, with the torch-native
defaults (none uses it as it is; ddp, fsdp2, deepspeed_zero and pipeline override what
differs). The static half, what the launcher reads without torch, is parallel/specs.py.

Checkpoints of torch-native plans go through torch.distributed.checkpoint (DCP): each
rank writes its own shard, the same code serves one process and many, and a checkpoint
written by N ranks loads into M.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from parallel import optim_state, plan_spec
from trainers.distributed import DistEnv
from trainers.model.load import resolve_precision
from trainers.optim import build_optimizer, build_scheduler, param_groups


class Plan:
    """The runtime plan every plan implements (its static half is parallel/specs.py).

    What the loop and the shared recipe call: prepare, forward_backward, step, lr, eval_model,
    inner, autocast, save / save_async / load, scheduler_state / load_scheduler_state,
    export_tensors, unsharded, expected_state_line, close; dp_rank / dp_world, compute_dtype, checkpoint_format.
    What a plan overrides to say how it differs: `build` (this rank's share of the model),
    `wrap` (around the model and the shared optimizer), and where it has them its gradient
    sync (`no_sync`), `backward`, `clip_grad_norm` and checkpoint hooks."""

    # Autocast to the compute dtype in forward passes; plans that hold the model in the
    # compute dtype themselves (DeepSpeed's bf16 mode) turn it off.
    autocasts = True

    def __init__(self, cfg, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.name = cfg.parallel.name
        spec = plan_spec(self.name)
        self.layout = spec.layout(cfg, env.world_size)
        self.checkpoint_format = spec.checkpoint_format(cfg)
        self.compute_dtype = resolve_precision(cfg.train.precision, env.device)
        self.model: torch.nn.Module | None = None  # what the loop calls forward on
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._stager: DefaultStager | None = None
        # State a method keeps outside the model and optimizer (AdaLoRA's rank allocator,
        # trainers/model/method_step.py): state_dict() / load_state_dict(), checkpointed with them.
        self.extra_state = None

    # --------------------------------------------------------------------- topology
    @property
    def dp_rank(self) -> int:
        return self.env.rank

    @property
    def dp_world(self) -> int:
        return self.env.world_size

    # ------------------------------------------------------------------------ setup
    def prepare(self, source) -> None:
        """Build this rank's share of the model, then the optimizer and LR schedule over its
        trainable parameters (AdamW with LoRA+ groups, trainers/optim.py: the same for every
        plan), then let the plan wrap both."""
        model = self.build(source)
        source.close()
        self._inner = model
        self._unsharded_bytes = self.count_state_bytes(model, self.cfg.optim)
        groups = [g for g in param_groups(model, self.cfg.optim, self.cfg.method) if g["params"]]
        optimizer = build_optimizer(groups, self.cfg.optim)
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, self.cfg.train.max_steps)
        self.model, self.optimizer = self.wrap(model, optimizer)

    def build(self, source) -> torch.nn.Module:
        """This rank's share of the model, loaded from `source` (a trainers.model.load.ModelSource).
        Plans that keep every weight on every rank load it whole; sharding plans override
        this so that no rank ever holds weights it will not keep."""
        return source.whole(self.env.device)

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(what the loop calls forward on, the optimizer that steps it)."""
        return model, optimizer

    @property
    def inner(self) -> torch.nn.Module:
        """The (peft) model, unwrapped: this rank's share of it."""
        return self._inner

    def expected_state_bytes(self) -> dict[str, int]:
        """Model-state bytes per rank this plan should hold: parameters, gradients of the
        trainable ones, and the optimizer's state, divided where the plan shards."""
        n = self.dp_world
        return {k: v // n if k in self.layout.shards else v for k, v in self._unsharded_bytes.items()}

    @staticmethod
    def count_state_bytes(model: torch.nn.Module, optim_cfg) -> dict[str, int]:
        """Unsharded bytes of the parameters, the trainable ones' gradients and the configured
        optimizer's state (the estimate's table, parallel/optim_state.py)."""
        params = grads = 0
        trained = []
        for p in model.parameters():
            shape = getattr(p, "ds_shape", None) or p.shape  # a ZeRO-3 partition's full shape
            n = getattr(p, "ds_numel", None) or p.numel()
            params += n * p.element_size()
            if p.requires_grad:
                grads += n * p.element_size()
                trained.append(tuple(shape))
        name, bits, moments, min_8bit = optim_state.settings(optim_cfg)
        optim = optim_state.state_bytes(name, trained, bits, moments, min_8bit)
        return {"params": params, "grads": grads, "optim": int(optim)}

    def expected_state_line(self) -> str:
        b = self.expected_state_bytes()
        mib = {k: v / 2**20 for k, v in b.items()}
        text = (
            f"expected model state per rank: params {mib['params']:.1f} MiB + grads {mib['grads']:.1f} MiB "
            f"+ optimizer {mib['optim']:.1f} MiB (optim={self.cfg.optim.name}) = {sum(mib.values()):.1f} MiB"
        )
        if self.layout.offload:
            text += f" ({', '.join(sorted(self.layout.offload))} offloaded to CPU memory)"
        return text

    @property
    def eval_model(self) -> torch.nn.Module:
        """The module to run evaluation / generation on (all ranks call it together): the
        unwrapped model (sharding hooks live on the module itself)."""
        return self.inner

    # ------------------------------------------------------------------- train step
    def autocast(self):
        if not self.autocasts or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.compute_dtype)

    def no_sync(self, accumulating: bool):
        """Skip gradient communication on all but the last micro-batch of a step."""
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[dict], count: int, objective) -> tuple[float, int, dict]:
        """Forward and backward over this rank's micro-batches of one optimizer step.

        `count` is what the objective's loss sum is divided by over the whole global batch
        (target tokens, pairs or rows: `objective.unit`). Returns this rank's loss sum, real
        (non-padding) token count and metric sums; the loop sums them over ranks. Plans with
        their own schedule (pipeline) override this."""
        if objective.prepare is not None:  # a global-batch quantity (ORPO, KTO): same forwards on every rank
            with self.autocast():
                objective.prepare(self.model, micro_batches, self.env.device)
        loss_sum, tokens, sums = 0.0, 0, {}
        for i, batch in enumerate(micro_batches):
            with self.no_sync(i < len(micro_batches) - 1), self.autocast():
                loss, metrics = objective(self.model, batch, self.env.device)
            self.backward(loss / count)
            loss_sum += float(loss.detach())
            tokens += batch["n_real_tokens"]
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return loss_sum, tokens, sums

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-batch's share of the global-batch mean. Plans that average
        gradients over data-parallel ranks scale it back up so the result is a true mean."""
        (loss * self.dp_world).backward()

    def clip_grad_norm(self) -> torch.Tensor:
        # clip_grad_norm_ handles DTensor gradients (FSDP2): the per-shard norms are combined
        # over the mesh, so the total (a DTensor) is the global norm on every rank.
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)

    def step(self, skip=None, after_update=None) -> float:
        """Clip, then apply the update; returns the pre-clip global gradient norm.

        `skip(norm)` (the spike guard's, trainers/spike_guard.py) decides once the norm is
        known: a skipped step zeroes the gradients instead of applying them, and the
        schedule still advances so that the lr stays a function of the step number.
        `after_update()` runs after an applied update, while the gradients are still there
        (AdaLoRA's rank allocation, trainers/model/method_step.py)."""
        norm = self.clip_grad_norm()
        value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (skip is not None and skip(value)):
            self.optimizer.step()
            if after_update is not None:
                after_update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ checkpoints
    _sd_options = StateDictOptions(ignore_frozen_params=True)

    def _checkpoint_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sd_options)
        state = {"model": model_sd, "optim": optim_sd}
        if self.extra_state is not None:
            state["extra"] = self.extra_state.state_dict()
        return state

    def save(self, directory: Path) -> None:
        """Write this plan's model + optimizer state (every rank calls this)."""
        dcp.save(self._checkpoint_state(), checkpoint_id=str(directory / "state"))

    def save_async(self, directory: Path, process_group) -> Future:
        """Stage the state to CPU now (pinned memory on a GPU) and write it from a
        background thread on `process_group`; returns the write's future."""
        if self._stager is None:
            on_gpu = self.env.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(on_gpu, False, False, on_gpu))
        return dcp.async_save(
            self._checkpoint_state(),
            checkpoint_id=str(directory / "state"),
            process_group=process_group,
            async_stager=self._stager,
            no_dist=not torch.distributed.is_initialized(),
        )

    def load(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sd_options)
        state = {"model": model_sd, "optim": optim_sd}
        if self.extra_state is not None:
            state["extra"] = self.extra_state.state_dict()
        dcp.load(state, checkpoint_id=str(directory / "state"))
        if self.extra_state is not None:
            self.extra_state.load_state_dict(state["extra"])
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=replace(self._sd_options, strict=False),
        )

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        # The optimizer's lr must be what the scheduler says for the next step (a
        # spike-guard rollback loads an older optimizer state under a newer schedule).
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def export_tensors(self, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The trained state one tensor at a time, under the unwrapped model's names:
        (name, full tensor on CPU) on rank 0, (name, None) elsewhere. Collective: every rank
        iterates to the end. One tensor at a time so that the export never holds the whole
        model gathered on one rank (a 70B model is 280 GB in fp32)."""
        frozen = {n for n, p in self.inner.named_parameters() if not p.requires_grad}
        for name, value in self.inner.state_dict().items():
            if trainable_only and name in frozen:
                continue
            if hasattr(value, "full_tensor"):  # a DTensor shard: all-gather this one tensor
                if value.device != self.env.device:  # (CPU-offloaded shards under NCCL)
                    value = value.to(self.env.device)
                value = value.full_tensor()
            yield name, (value.detach().cpu() if self.env.is_main else None)

    @contextlib.contextmanager
    def unsharded(self):
        """Parameters whole on every rank for code that calls submodules directly
        (PEFT's prompt encoder at export); a no-op where they already are."""
        yield

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
