"""The learning-rate schedule and LoRA+ parameter groups (trainers/optim.py), in-process."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from trainers.errors import UserError
from trainers.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def optim_cfg(**kw):
    base = dict(name="adamw", lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, schedule="cosine",
                warmup_steps=4, warmup_ratio=None, min_lr_ratio=0.1, num_cycles=1, power=1.0, lr_end=1e-7,
                lr_embeddings=None)
    return OmegaConf.create({**base, **kw})


def test_warmup_is_linear_from_one_step_to_the_full_rate():
    """warmup_steps=4: the first four steps run at 1/5 .. 4/5 of the lr, the fifth at the full lr
    (under every schedule: the decay starts after the warmup)."""
    for schedule in ("cosine", "linear", "constant"):
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
    with pytest.raises(UserError, match="optim.schedule='wavy' is unknown; use one of cosine, linear, constant, "
                                        "cosine_with_restarts, polynomial, constant_with_warmup"):
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


def lrs(scheduler, steps: int) -> list[list[float]]:
    """Each param group's lr at steps 0..steps-1, stepping the optimizer as the loop does."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule, extra, kwargs", [
    ("cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}, {"power": 2.0, "lr_end": 1e-5}),
    ("constant_with_warmup", {}, None),
])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 5}, {"warmup_steps": None, "warmup_ratio": 0.07}])
def test_transformers_schedules_equal_get_scheduler_step_for_step(schedule, extra, kwargs, warmup):
    """Both param groups (LoRA+'s B at 4x) follow transformers' get_scheduler curve with the
    same warmup; warmup_ratio=0.07 of 40 steps is ceil(2.8) = 3 warmup steps, as
    TrainingArguments.get_warmup_steps counts them."""
    from transformers import get_scheduler

    from trainers.optim import warmup_steps

    cfg = optim_cfg(schedule=schedule, **extra, **warmup)
    assert warmup_steps(cfg, 40) == (5 if warmup.get("warmup_steps") else 3)

    def groups():
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 4e-3}]

    ours = build_scheduler(build_optimizer(groups(), cfg), cfg, max_steps=40)
    theirs = get_scheduler(schedule, torch.optim.AdamW(groups(), lr=1e-3), num_warmup_steps=warmup_steps(cfg, 40),
                           num_training_steps=40, scheduler_specific_kwargs=kwargs)
    assert lrs(ours, 45) == lrs(theirs, 45)  # past the end too (a resume with a longer horizon asks)
    got = [a for a, _ in lrs(build_scheduler(build_optimizer(groups(), cfg), cfg, max_steps=40), 41)]
    if schedule == "cosine_with_restarts":  # three cycles: the lr comes back to the top twice after warmup
        after = got[warmup_steps(cfg, 40):]
        assert sum(1 for a, b in zip(after, after[1:]) if b > a) == 2
    if schedule == "polynomial":
        assert got[-1] == pytest.approx(1e-5)


def test_warmup_ratio_feeds_the_launchers_own_schedules():
    cfg = optim_cfg(schedule="linear", warmup_steps=None, warmup_ratio=0.1, min_lr_ratio=0.0)
    # 0.1 x 20 steps = 2 warmup steps: 1/3, 2/3, then the decay from the full lr
    assert [lr_factor(s, cfg, 20) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


class TinyCausal(torch.nn.Module):
    """Embeddings, a layer and an untied LM head, with transformers' accessors."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.parametrize("tied", [False, True])
def test_lr_embeddings_puts_embeddings_and_lm_head_in_their_own_group(tied):
    model = TinyCausal(tied)
    full = OmegaConf.create({"peft": None})
    rest, emb = param_groups(model, optim_cfg(lr=1e-4, lr_embeddings=1e-5), full)
    assert (rest["lr"], emb["lr"]) == (1e-4, 1e-5)
    assert {id(p) for p in emb["params"]} == {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    assert {id(p) for p in rest["params"]} == {id(model.layer.weight), id(model.layer.bias)}
    assert len(emb["params"]) == (1 if tied else 2)  # a tied matrix is one parameter, in one group
    (one,) = param_groups(model, optim_cfg(lr=1e-4), full)  # null: one group at optim.lr
    assert len(one["params"]) == (3 if tied else 4)


@pytest.mark.parametrize("name, state_keys", [
    ("adamw8bit", {"state1", "state2", "absmax1", "absmax2"}), ("paged_adamw8bit", {"state1", "state2"}),
    ("paged_adamw32bit", {"state1", "state2"}), ("lion", {"state1"}),
    ("adafactor", {"exp_avg_sq_row", "exp_avg_sq_col"}), ("sgd", {"momentum_buffer"}),
])
def test_each_optimizer_is_its_librarys_class_built_from_optim_settings(name, state_keys):
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    extra = {"adafactor": dict(eps=[1e-30, 1e-3], clip_threshold=1.0, decay_rate=-0.8, beta1=None),
             "sgd": dict(momentum=0.9, nesterov=False), "lion": dict(bits=32, betas=[0.9, 0.99])}.get(name, {})
    cfg = optim_cfg(name=name, min_8bit_size=64, **extra)
    layer = torch.nn.Linear(16, 32)
    opt = build_optimizer(layer.parameters(), cfg)
    expected = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw32bit": bnb.optim.PagedAdamW32bit, "lion": bnb.optim.Lion, "adafactor": Adafactor,
                "sgd": torch.optim.SGD}[name]
    assert type(opt) is expected
    layer(torch.randn(3, 16)).pow(2).sum().backward()
    opt.step()
    state = opt.state_dict()["state"][0]
    state = state.get("__bnb_optimizer_quant_state__", state)
    assert state_keys <= set(state), sorted(state)
    if name == "lion":
        assert type(build_optimizer(layer.parameters(), optim_cfg(name="lion", min_8bit_size=64, bits=8,
                                                                   betas=[0.9, 0.99]))) is bnb.optim.Lion8bit
