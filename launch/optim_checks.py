"""Pre-launch checks of the run's length (train.max_steps or train.epochs), its warmup and
schedule knobs, and the optimizer (its knobs, whether it runs on this device and under
the chosen plan), plus turning train.epochs into steps once the data is prepared.

No torch: the optimizer table and warmup arithmetic come from trainers/optim.py, which
imports torch only where an optimizer is built.
"""
from __future__ import annotations

import logging
from importlib import metadata

from omegaconf import DictConfig

from trainers.errors import UserError
from trainers.optim import BITSANDBYTES, OPTIMIZERS

log = logging.getLogger("launch")

# bitsandbytes' optimizers ran on CPU (8-bit blockwise, paged, Lion) from this version:
# measured with 0.50.2 (tests/test_optimizers.py); older ones need CUDA.
BNB_CPU_SINCE = (0, 50)
# The plans each optimizer trains and resumes exactly under (tests/test_optimizers.py: a
# one-process checkpoint of adamw8bit and of Adafactor resumes bit for bit under ddp over 2
# ranks). Measured and refused: bitsandbytes' kernels fail on FSDP2's DTensors; DeepSpeed
# steps a client optimizer on flat fp32 partitions, so Adafactor there would keep an
# unfactored second moment, and its universal checkpoint (another world size) expects
# AdamW's exp_avg (KeyError with adamw8bit under ZeRO-2, which resumes at the same world).
PLANS = {"adamw": ("none", "ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3_offload", "pipeline")}
PLANS.update({name: ("none", "ddp") for name in (*BITSANDBYTES, "adafactor", "sgd")})


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def on_cpu(cfg: DictConfig) -> bool:
    """The workers train on this machine's CPU (launcher=local without a GPU driver)."""
    from launch.host_memory import uses_gpu

    return cfg.launcher.name == "local" and not uses_gpu()


def bitsandbytes_refusal(name: str, version: tuple[int, int] | None, cpu: bool) -> str | None:
    """Why bitsandbytes' optimizer `name` cannot run (None: it can): not installed, or a
    version whose optimizers need CUDA on a CPU run. Names the optimizers that do run."""
    runs_here = "|".join(n for n in OPTIMIZERS if n not in BITSANDBYTES)
    if version is None:
        return (f"optim={name} is bitsandbytes' optimizer, and bitsandbytes is not installed. Install it "
                f"(pip install bitsandbytes), or use optim={runs_here}.")
    if cpu and version < BNB_CPU_SINCE:
        return (f"optim={name} needs CUDA with the installed bitsandbytes {'.'.join(map(str, version))}, and this "
                f"run trains on CPU. On CPU use optim={runs_here}, or install bitsandbytes >= "
                f"{'.'.join(map(str, BNB_CPU_SINCE))}, whose optimizers all run on CPU.")
    return None


def check_length(cfg: DictConfig) -> None:
    t = cfg.train
    steps, epochs = t.max_steps, t.epochs
    if steps is not None and epochs is not None:
        raise UserError(f"train.max_steps={steps} and train.epochs={epochs} are both set; the run's length is one "
                        f"of them. Give train.epochs=N alone (it turns max_steps off) or train.max_steps=N alone.")
    if steps is None and epochs is None:
        raise UserError("train.max_steps and train.epochs are both null: set the run's length with "
                        "train.max_steps=N (optimizer steps) or train.epochs=N (passes over the training rows).")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise UserError(f"train.max_steps={steps!r} must be a positive integer.")
    if epochs is not None and (not _number(epochs) or epochs <= 0):
        raise UserError(f"train.epochs={epochs!r} must be a number above 0 (passes over the training rows, "
                        f"e.g. 3 or 0.5).")


def check_schedule(o: DictConfig) -> None:
    if o.warmup_steps is not None and o.warmup_ratio is not None:
        raise UserError(f"optim.warmup_steps={o.warmup_steps} and optim.warmup_ratio={o.warmup_ratio} are both set; "
                        f"give optim.warmup_ratio=R alone (it turns warmup_steps off) or optim.warmup_steps=N alone.")
    if o.warmup_ratio is not None and (not _number(o.warmup_ratio) or not 0 <= o.warmup_ratio < 1):
        raise UserError(f"optim.warmup_ratio={o.warmup_ratio!r} must be a number in [0, 1): the share of the run's "
                        f"steps spent warming up (transformers rounds it up to whole steps), e.g. 0.03.")
    if o.warmup_ratio is None and (not isinstance(o.warmup_steps, int) or isinstance(o.warmup_steps, bool)
                                   or o.warmup_steps < 0):
        raise UserError(f"optim.warmup_steps={o.warmup_steps!r} must be a whole number of steps >= 0.")
    if not isinstance(o.num_cycles, int) or isinstance(o.num_cycles, bool) or o.num_cycles < 1:
        raise UserError(f"optim.num_cycles={o.num_cycles!r} must be a positive integer (cosine restarts).")
    if not _number(o.power) or o.power <= 0:
        raise UserError(f"optim.power={o.power!r} must be a number above 0 (polynomial decay).")
    if not _number(o.lr_end) or o.lr_end < 0 or (o.schedule == "polynomial" and o.lr_end >= o.lr):
        raise UserError(f"optim.lr_end={o.lr_end!r} must be a number >= 0 and below optim.lr={o.lr} (the polynomial "
                        f"schedule decays from optim.lr to it; transformers refuses otherwise), e.g. 1e-7.")


def check_optimizer(cfg: DictConfig) -> None:
    o, name = cfg.optim, cfg.optim.name
    if o.lr_embeddings is not None:
        if not _number(o.lr_embeddings) or not 0 < o.lr_embeddings < 1:
            raise UserError(f"optim.lr_embeddings={o.lr_embeddings!r} must be a number between 0 and 1, or null.")
        if cfg.method.peft is not None:
            raise UserError(f"optim.lr_embeddings={o.lr_embeddings} sets the lr of the embeddings and LM head in full "
                            f"fine-tuning (method=full); method={cfg.method.name} does not train them. Drop it, or "
                            f"use method=full.")
    if name == "sgd" and (not _number(o.momentum) or o.momentum < 0 or (o.nesterov and o.momentum == 0)):
        raise UserError(f"optim.momentum={o.momentum!r} must be a number >= 0, and above 0 with optim.nesterov=true.")
    if name == "adafactor" and o.beta1 is not None and (not _number(o.beta1) or not 0 <= o.beta1 < 1):
        raise UserError(f"optim.beta1={o.beta1!r} must be null (no first moment) or a number in [0, 1).")
    if name in BITSANDBYTES:
        try:
            version = tuple(int(x) for x in metadata.version("bitsandbytes").split(".")[:2])
        except metadata.PackageNotFoundError:
            version = None
        reason = bitsandbytes_refusal(name, version, on_cpu(cfg))
        if reason:
            raise UserError(reason)
    plan = cfg.parallel.name
    if plan not in PLANS[name]:
        works = [n for n, plans in PLANS.items() if plan in plans]
        raise UserError(
            f"optim={name} under parallel={plan} is not supported: "
            + _why_not(name, plan)
            + f"optim={name} runs under parallel={'|'.join(PLANS[name])}; under parallel={plan} use "
              f"optim={'|'.join(works)}.")


def _why_not(name: str, plan: str) -> str:
    if name == "adafactor" and plan.startswith("zero"):
        return ("DeepSpeed steps a client optimizer on flat fp32 partitions, where Adafactor's factored second "
                "moment becomes an unfactored one (another optimizer, 4 bytes per parameter). ")
    if name in BITSANDBYTES and plan == "fsdp2":
        return ("bitsandbytes' update kernels take plain tensors and FSDP2's parameters are DTensors (measured: "
                "'got mixed torch.Tensor and DTensor' at the first step). ")
    if name != "adafactor" and plan.startswith("zero"):
        return ("DeepSpeed's universal checkpoint, which resuming under another world size needs, reads "
                "AdamW's exp_avg from the optimizer state (measured: KeyError 'exp_avg' with adamw8bit). ")
    return "its state was not trained and resumed under this plan here. "


def check(cfg: DictConfig) -> None:
    check_length(cfg)
    check_schedule(cfg.optim)
    check_optimizer(cfg)


def apply_epochs(cfg: DictConfig) -> str | None:
    """train.epochs -> cfg.train.max_steps, from the prepared data (cfg.data.prepared); the
    line saying how (None without train.epochs)."""
    if cfg.train.epochs is None:
        return None
    from launch.config import world_size
    from trainers.data.epochs import dp_world_of, epoch_plan

    plan = epoch_plan(cfg, dp_world_of(cfg, world_size(cfg)))
    cfg.train.max_steps = plan.steps
    return plan.line()
