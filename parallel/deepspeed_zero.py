"""parallel=zero1|zero2|zero3|zero3_offload: DeepSpeed ZeRO, one class parameterized by stage.

  zero1          optimizer state sharded over data-parallel ranks
  zero2          + gradients sharded
  zero3          + parameters sharded (gathered layer by layer for forward/backward)
  zero3_offload  zero3 with optimizer state and parameters kept in CPU RAM

The DeepSpeed config is generated from the Hydra values (conf/parallel/zero*.yaml, train.*,
optim.*) and written by rank 0 to RUN_DIR/ds_config.json so it can be reused elsewhere.
Our own AdamW (with LoRA+ groups) and LR schedule are handed to deepspeed.initialize, so
the learning rate at every step is the one every other plan uses.

Numbers match parallel=none exactly (up to float summation order):
- the loop passes each micro-batch's share of the global-batch mean; DeepSpeed averages
  gradients over data-parallel ranks, so backward scales the share by the dp world size
  (as every torch plan does) and turns off DeepSpeed's own division by
  gradient_accumulation_steps (scale_wrt_gas=False);
- the loop calls step() once per optimizer step; the accumulation boundary is set
  explicitly before each micro-batch (no_sync), so DeepSpeed's micro-step counter can
  never drift from the loop's (e.g. on a resume);
- gradient_clipping is always set from optim.max_grad_norm (DeepSpeed's default is 1.0)
  and step() returns the pre-clip global norm DeepSpeed computed.

Checkpoints are DeepSpeed's own (engine.save_checkpoint into the directory the
Checkpointer commits), staged to CPU and written in the background in async mode (see
parallel/deepspeed_checkpoint.py); the LR scheduler is restored once, by the Checkpointer,
from trainer_state.json (DeepSpeed's copy is not loaded). Resuming under another world size
goes through DeepSpeed's universal checkpoint, converted once on rank 0 (another ZeRO stage
is refused with a message).
zero_to_fp32.py is copied next to them.

Precision: fp32 unless train.precision=bf16 (or auto on a bf16 GPU); then DeepSpeed's bf16
mode holds the model in bf16 with fp32 master weights in the optimizer (no autocast), so
bf16 numbers differ slightly from the autocast plans. Exports are always fp32.

Tested on 2 CPU ranks (gloo) against parallel=none: full, lora, qlora, dora, rslora,
loraplus, prefix, prompt and ia3 all train to the same losses under ZeRO-2 and ZeRO-3
(qlora also under zero1 and zero3_offload, and resumes exactly under ZeRO-3), so no method
is refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.base import Plan
from parallel.specs import deepspeed_sizes
from trainers.distributed import backend_for, free_port as _free_port
from trainers.errors import TrainingError, UserError

log = logging.getLogger(__name__)

TAG = "deepspeed"  # sub-directory of a checkpoint holding DeepSpeed's files


def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def partitioned_model(source, ds_config: dict, device: torch.device) -> torch.nn.Module:
    """The skeleton with every checkpoint weight turned into a ZeRO-3 parameter, one module
    at a time: a rank holds its partitions plus one module's full tensors, never the model.
    A 4-bit base the same way: each weight is quantized as it is read (transformers' op,
    `ModelSource.fill`) and its packed storage (bnb_4bit_quant_storage, bf16) partitioned
    like any other parameter, so no rank quantizes or holds the whole 4-bit model."""
    import deepspeed

    from trainers.model.weights import init_dora_magnitudes, is_placeholder

    model = source.skeleton()
    for module in list(model.modules()):
        if not any(is_placeholder(p) for p in module.parameters(recurse=False)):
            continue
        source.fill(model, device, within=module, recurse=False)
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
    init_dora_magnitudes(model, gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    return model


_MISSING = object()


@contextlib.contextmanager
def _patched(obj, attrs: dict):
    """Set attributes of one instance for the duration of a call, then restore them."""
    saved = {k: obj.__dict__.get(k, _MISSING) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


class DeepSpeedZero(Plan):
    # With bf16 enabled DeepSpeed holds the model in bf16 itself (fp32 master weights in the
    # optimizer): no autocast on top.
    autocasts = False
    engine = None

    @property
    def stage(self) -> int:
        return int(self.cfg.parallel.stage)

    # ------------------------------------------------------------------------ setup
    def deepspeed_config(self, hidden: int) -> dict:
        """The DeepSpeed JSON config for this run, from the Hydra values (`hidden`: the
        model's hidden size, which the `auto` sizes scale with: parallel/specs.py)."""
        p, t = self.cfg.parallel, self.cfg.train
        zero: dict = {
            "stage": self.stage,
            "overlap_comm": bool(p.overlap_comm),
            "contiguous_gradients": bool(p.contiguous_gradients),
            **deepspeed_sizes(p, self.stage, hidden),
        }
        if self.stage < 3:
            zero["allgather_bucket_size"] = int(p.allgather_bucket_size)
        else:
            zero["stage3_param_persistence_threshold"] = int(p.get("stage3_param_persistence_threshold", 100_000))
        if p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(p.pin_memory)}
        if p.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(p.pin_memory)}
        config = {
            "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
            "gradient_accumulation_steps": int(t.grad_accum),
            "gradient_clipping": float(self.cfg.optim.max_grad_norm or 0.0),
            "bf16": {"enabled": self.compute_dtype == torch.bfloat16},
            "fp16": {"enabled": False},
            "zero_optimization": zero,
            # Our AdamW (torch) is passed in; DeepSpeed only tests its own optimizers.
            "zero_allow_untested_optimizer": True,
            # ...and with offload it would otherwise insist on DeepSpeedCPUAdam (a ~3 min
            # JIT compile on first use).
            "zero_force_ds_cpu_optimizer": False,
        }
        extra = p.get("extra_config")
        if extra:
            _deep_merge(config, OmegaConf.to_container(extra, resolve=True))
        return config

    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group even for one process (in-process debug runs)."""
        if dist.is_initialized():
            return
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        dist.init_process_group(backend=backend_for(self.env.device), rank=0, world_size=1)

    def build(self, source) -> torch.nn.Module:
        """Writes the DeepSpeed config (RUN_DIR/ds_config.json) and makes sure of a process
        group first. ZeRO-1/2 keep every weight on every rank. ZeRO-3 partitions each weight
        as it is loaded: module by module, the module's tensors are read from the checkpoint
        and handed to `deepspeed.zero.Init(module=...)`, which keeps this rank's partition and
        frees the rest before the next module is read; 4-bit bases too, quantized as they
        are read (QDoRA loads whole, then deepspeed.initialize partitions it)."""
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.ds_config = self.deepspeed_config(int(source.config().hidden_size))
        if self.env.is_main:
            path = Path(self.cfg.run_dir) / "ds_config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.ds_config, indent=2) + "\n")
        self._ensure_process_group()
        if self.stage != 3 or not source.loads_in_parts:
            return source.whole(self.env.device)
        model = partitioned_model(source, self.ds_config, self.env.device)
        # DeepSpeed casts a model to its bf16 working dtype (the ZeRO optimizer keeps the fp32
        # masters), except a ZeRO-Init model, whose parameters it expects in that dtype
        # already: the checkpoint's are, the fresh adapters (fp32) are not. Cast those as
        # zero1/2 cast them; left in fp32, PEFT computes each adapted linear on an fp32 copy
        # of its input (measured: +0.3 GiB of activations per rank on the 360M bench model).
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != self.compute_dtype and not hasattr(p, "ds_id"):
                p.data = p.data.to(self.compute_dtype)
        return model

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """deepspeed.initialize with our optimizer and LR schedule: the engine, and the ZeRO
        optimizer that partitions the state."""
        import deepspeed

        from parallel.deepspeed_checkpoint import StagingCheckpointEngine  # imports deepspeed: lazily, as here

        t0 = time.perf_counter()
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=self.ds_config
        )
        if self.env.is_main:
            log.info("deepspeed.initialize (ZeRO-%d) took %.1f s", self.stage, time.perf_counter() - t0)
        self.engine = engine
        self.checkpoint_engine = StagingCheckpointEngine(engine._config, pin_memory=self.env.device.type == "cuda")
        engine.checkpoint_engine = self.checkpoint_engine
        return engine, ds_optimizer

    # ------------------------------------------------------------------- train step
    def no_sync(self, accumulating: bool):
        # Tell DeepSpeed explicitly whether this micro-batch ends the optimizer step: ZeRO-1
        # reduces gradients only at the boundary, ZeRO-2/3 reduce-scatter every micro-batch.
        self.engine.set_gradient_accumulation_boundary(not accumulating)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # `loss` is already this micro-batch's share of the global mean (no division by
        # grad_accum); DeepSpeed averages over dp ranks, so scale up by the dp world.
        self.engine.backward(loss * self.dp_world, scale_wrt_gas=False)

    def step(self, skip=None) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        if skip is None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        return self._step_or_skip(skip)

    def _step_or_skip(self, skip) -> float:
        """The spike guard's step. The engine computes the gradient norm inside its own
        step(), so it is computed here first, with the ZeRO optimizer's own function, and
        handed back to that step (computed once). A skipped step goes through DeepSpeed's
        overflow path, the engine's one clean way not to apply an update: the optimizer
        zeroes and releases its gradient buffers and resets its micro-step counter, the
        engine counts a skipped step, and leaves the lr schedule to us."""
        opt = self.engine.optimizer
        if hasattr(opt, "_wait_for_offload_copies"):  # what step() waits for before its norm
            opt._wait_for_offload_copies()
        if self.stage == 3 and hasattr(opt, "_get_norm_groups"):
            from deepspeed.runtime.utils import combine_grad_norm_groups

            scaled = combine_grad_norm_groups(opt._get_norm_groups())
            apply = {"_get_norm_groups": lambda: [scaled]}
            overflow = {"_get_norm_groups": lambda: [torch.full_like(scaled, float("inf"))]}  # always an overflow at stage 3
        elif self.stage < 3 and hasattr(opt, "scaled_global_norm"):
            scaled = opt.scaled_global_norm()
            apply = {"scaled_global_norm": lambda norm_type=2: scaled}
            overflow = {"check_grad_overflow": True, "has_overflow": lambda *args, **kwargs: True}
        else:
            raise TrainingError(
                f"train.spike_guard cannot skip steps with DeepSpeed's {type(opt).__name__} (parallel="
                f"{self.name}, precision {self.compute_dtype}). Use train.precision=fp32, parallel=fsdp2 "
                f"or ddp, or train.spike_guard.enabled=false."
            )
        norm = float(scaled) / float(opt.loss_scale)
        skipped = skip(norm)
        with _patched(opt, overflow if skipped else apply):
            self.engine.step()
        if skipped:
            self.scheduler.step()
        return norm

    # ------------------------------------------------------------------ checkpoints
    @property
    def _exclude_frozen(self) -> bool:
        return self.cfg.method.peft is not None or bool(self.cfg.method.get("quantize"))

    def save(self, directory: Path) -> None:
        from parallel.deepspeed_checkpoint import universal_checkpoint_info

        self.engine.save_checkpoint(
            str(directory), tag=TAG, client_state=universal_checkpoint_info(), save_latest=False,
            exclude_frozen_parameters=self._exclude_frozen,
        )
        if self.env.is_main:  # what wrote it: a resume under another layout converts it
            meta = {"plan": self.name, "stage": self.stage, "dp_world": self.dp_world}
            (Path(directory) / TAG / "plan.json").write_text(json.dumps(meta) + "\n")

    def save_async(self, directory: Path, process_group) -> Future:
        files = self.checkpoint_engine.stage(lambda: self.save(directory))
        return self.checkpoint_engine.write_staged(files)

    def load(self, directory: Path) -> None:
        ckpt = Path(directory) / TAG
        if not (ckpt / "plan.json").exists():
            raise UserError(
                f"The checkpoint {directory} was not written by a DeepSpeed ZeRO plan (no "
                f"{TAG}/plan.json). Resume it with the plan that wrote it (see config.yaml in the "
                f"run directory), or start this run in a new hydra.run.dir."
            )
        meta = json.loads((ckpt / "plan.json").read_text())
        if meta["stage"] != self.stage:  # (refused before launch when trainer_state says so)
            raise UserError(
                f"The checkpoint {directory} was written by parallel={meta['plan']} (ZeRO-{meta['stage']}), "
                f"but this run is ZeRO-{self.stage}; DeepSpeed checkpoints reshard to another world "
                f"size, not to another stage. Resume with parallel={meta['plan']}."
            )
        if meta["dp_world"] == self.dp_world:
            self._load(directory, TAG)
            return
        from parallel.deepspeed_checkpoint import UNIVERSAL

        if self.env.is_main:
            log.info("resharding %s: ZeRO-%s from %s to %s ranks", directory, self.stage,
                     meta["dp_world"], self.dp_world)
        self._convert_on_rank0(ckpt, Path(directory) / UNIVERSAL)
        self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
        try:
            self._load(directory, UNIVERSAL)
        finally:
            self.engine._config.load_universal_checkpoint = False

    def _convert_on_rank0(self, source: Path, target: Path) -> None:
        from parallel.deepspeed_checkpoint import to_universal

        failure = [None]
        if self.env.is_main:
            try:
                to_universal(source, target)
            except TrainingError as e:
                failure = [str(e)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(failure, src=0)  # also holds the others until it is done
        if failure[0]:
            raise TrainingError(failure[0])

    def _load(self, directory: Path, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag,
            load_module_strict=not self._exclude_frozen,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # restored once, by load_scheduler_state
        )
        if load_path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint in {Path(directory) / tag}.")

    # ----------------------------------------------------------------------- export
    def export_tensors(self, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The fp32 master weights one tensor at a time (collective: every rank iterates to
        the end), with the keys of the unwrapped (peft) model's state_dict; tied names are
        given once. A 4-bit base's packed weights keep their storage dtype: their bytes are
        codes, not numbers."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        from trainers.model.weights import is_4bit

        seen: set[int] = set()
        for key, t in self.inner.state_dict(keep_vars=True).items():
            is_param = isinstance(t, torch.nn.Parameter)
            if (trainable_only and is_param and not t.requires_grad) or id(t) in seen:
                continue
            seen.add(id(t))
            value = safe_get_full_fp32_param(t) if is_param and t.requires_grad else None
            if value is None and hasattr(t, "ds_id"):  # frozen ZeRO-3 parameter
                with zero.GatheredParameters([t], modifier_rank=None):
                    value = t.detach().clone() if self.env.is_main else None
            elif value is None:
                value = t.detach()
            if not self.env.is_main:
                yield key, None
                continue
            value = value.cpu()
            yield key, (value.float() if value.is_floating_point() and not is_4bit(t) else value)

    # ------------------------------------------------------------------------ exit
    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
