"""The learning-rate schedule and LoRA+ parameter groups (trainers/optim.py), in-process."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from trainers.errors import UserError
from trainers.optim import SCHEDULES, build_optimizer, build_scheduler, lr_factor, param_groups


def optim_cfg(**kw):
    base = dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, schedule="cosine", warmup_steps=4,
                min_lr_ratio=0.1)
    return OmegaConf.create({**base, **kw})


def test_warmup_is_linear_from_one_step_to_the_full_rate():
    """warmup_steps=4: the first four steps run at 1/5 .. 4/5 of the lr, the fifth at the full lr
    (under every schedule: the decay starts after the warmup)."""
    for schedule in SCHEDULES:
        cfg = optim_cfg(schedule=schedule)
        assert [lr_factor(s, cfg, 20) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0], abs=1e-12)


@pytest.mark.parametrize("schedule, expected", [
    # max_steps=14, warmup 4: progress p = (step - 4) / 10, floor 0.1
    ("linear", lambda p: 0.1 + 0.9 * (1 - p)),
    ("cosine", lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))),
    ("constant", lambda p: 1.0),
])
def test_decay_after_warmup_reaches_the_floor_at_max_steps_and_stays(schedule, expected):
    cfg = optim_cfg(schedule=schedule)
    for step in range(4, 14 + 1):
        assert lr_factor(step, cfg, 14) == pytest.approx(expected((step - 4) / 10), abs=1e-12), step
    assert lr_factor(9, cfg, 14) == pytest.approx({"linear": 0.55, "cosine": 0.55, "constant": 1.0}[schedule])
    # past max_steps (a resumed run with a longer horizon asks): clamped, never below the floor
    assert lr_factor(100, cfg, 14) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_no_warmup_and_warmup_as_long_as_the_run():
    assert lr_factor(0, optim_cfg(warmup_steps=0, schedule="linear"), 10) == 1.0
    assert lr_factor(10, optim_cfg(warmup_steps=0, schedule="linear"), 10) == pytest.approx(0.1)
    # max_steps == warmup: no division by zero, the step after the warmup is already the floor's end
    cfg = optim_cfg(warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(9, cfg, 10) == pytest.approx(10 / 11)
    assert lr_factor(10, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(11, cfg, 10) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_applies_the_factor_to_every_param_group():
    """What the loop sees: the optimizer's lr after `step` optimizer steps is base x
    lr_factor(step), LoRA+'s B group included at its own base."""
    model = torch.nn.Linear(2, 2)
    cfg = optim_cfg(schedule="linear", warmup_steps=2, min_lr_ratio=0.0)
    groups = [{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 4e-3}]
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, max_steps=6)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [a for a, _ in seen] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0], abs=1e-15)
    assert all(b == pytest.approx(4 * a, abs=1e-15) for a, b in seen)


def test_unknown_schedule_is_a_user_error():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim_cfg())
    with pytest.raises(UserError, match="optim.schedule='wavy' is unknown; use one of cosine, linear, constant"):
        build_scheduler(opt, optim_cfg(schedule="wavy"), 10)


class TwoAdapters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.Linear(3, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, 3, bias=False)
        self.lora_embedding_B = torch.nn.Parameter(torch.zeros(4, 2))
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_loraplus_puts_b_matrices_in_a_group_at_lr_times_ratio():
    model = TwoAdapters()
    groups = param_groups(model, optim_cfg(lr=2e-4), OmegaConf.create({"peft": "lora", "loraplus_lr_ratio": 16}))
    assert [g["lr"] for g in groups] == [2e-4, pytest.approx(32e-4)]
    assert [id(p) for p in groups[0]["params"]] == [id(model.lora_A.weight)]
    assert {id(p) for p in groups[1]["params"]} == {id(model.lora_B.weight), id(model.lora_embedding_B)}
    # without the ratio: one group of the trainable parameters only
    (plain,) = param_groups(model, optim_cfg(lr=2e-4), OmegaConf.create({"peft": None}))
    assert len(plain["params"]) == 3 and plain["lr"] == 2e-4
    model.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameter"):
        param_groups(model, optim_cfg(), OmegaConf.create({"peft": None}))
