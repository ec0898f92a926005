"""Parity with TRL's trainers (issue 11): for dpo, ipo, simpo, orpo and kto, with LoRA and
with full fine-tuning, our loop's per-step loss and rewards/margins equal TRL 1.16's
trainer on the same job within 1e-4 relative for 10 steps: the bundled tiny model, fp32
CPU, the same rows in the same order (we hand TRL our (seed, step) order and TRL reads it
sequentially), the same global batch in one micro-batch, our lr schedule, no dropout, and
the same initial adapter (ours, loaded into TRL's peft model).

The full fine-tuning cases compare two different reference mechanisms: TRL keeps a second
copy of the initial model, we precompute its log-probs before training
(trainers/objectives/reference.py), for kto also those of the mismatched KL pairs of every step.

Both sides run in this process (ours through `trainers.loop.train`, TRL's through
tests/trl_preference_reference.py); each case runs once per module and both tests read it.
With method=full the training file is the first FULL_ROWS rows of the bundled one (10
steps of 4 rows use 40 of them): our reference pass covers every row of the file before
training, and 2000 rows made it most of a full case's time. The LoRA cases keep the whole
file: on the 48-row cut (measured unpacked, before data.packing) kto/lora drifted to
1.6e-4 by step 10 from a 1.8e-5 jump at an all-undesirable step 5, not understood yet; on
the whole file its worst step is 1.1e-5.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.trl_preference_reference import REPO, rows_in_our_order
from tests.trl_preference_reference import run as run_trl

pytestmark = pytest.mark.slow

MODEL = REPO / "assets/tiny-llama"
STEPS, BATCH, FULL_ROWS = 10, 4, 48
# Full fine-tuning at the tiny model's default lr (method.lr=1e-3) clips every step (grad
# norm 11-22 against max_grad_norm 1) and Adam turns the 3e-7 rounding difference of our
# precomputed reference (see scale_of) into a 1.1e-4 relative difference of dpo's loss by
# step 6 (measured); at 1e-4 the worst of 10 steps is 7e-7 and the loss still falls from
# 0.69 to 0.38.
FULL_LR = 1e-4
CASES = [(objective, method) for method in ("lora", "full") for objective in ("dpo", "ipo", "simpo", "orpo", "kto")]
# Variants of an objective: (objective, our extra overrides, TRL keyword arguments).
# dpo+rpo: objective.rpo_alpha, TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha]
# (issue 25); at the bundled SFT demo's alpha, so the NLL term weighs as in docs/dpo-after-sft.md.
# kto+file_order: TRL's own setting, reproduced (issue 25): the file read in order
# (data.shuffle=false, so TRL's sequential sampler reads the same rows, not our order handed
# to it) and each row's KL completion from its file neighbour (objective.kl_pairs=file_order).
VARIANTS = {"dpo+rpo": ("dpo", ["objective.rpo_alpha=1.0"], {"rpo_alpha": 1.0}),
            "kto+file_order": ("kto", ["objective.kl_pairs=file_order", "data.shuffle=false"], {})}
CASES += [("dpo+rpo", "lora"), ("kto+file_order", "lora")]


def our_cfg(objective: str, method: str, run_dir, train_file, extra=()):
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers

    register_resolvers()
    data = "reverse_kto" if objective == "kto" else "reverse_pref"
    overrides = [
        f"objective={objective}", f"data={data}", f"data.train={train_file}", f"method={method}",
        f"model.path={MODEL}", "data.eval=null",
        f"train.max_steps={STEPS}", f"train.micro_batch_size={BATCH}", "train.grad_accum=1",
        "train.save_every=1000", "train.eval_every=1000", "optim.warmup_steps=2", "train.precision=fp32",
    ] + (["method.dropout=0"] if method != "full" else ["data.packing=false", f"optim.lr={FULL_LR}"]) + list(extra)
    # Full fine-tuning runs in TRL's layout (one sequence per padded row): Adam turns the
    # fp32 rounding differences of a packed layout (same sums, other order: measured 6e-6
    # of a log-prob near -30) into 1.5e-4 of the margins by step 10, over the 1e-4 asked.
    # LoRA cases run packed, our default; tests/test_preference_data.py checks packed =
    # padded per sequence directly.
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return finalize(compose("config", overrides=overrides), str(run_dir))


def initial_adapter(cfg, path) -> None:
    """Our initial LoRA weights (the loop's own ModelSource), for TRL to start from."""
    from safetensors.torch import save_file

    from trainers.model.load import ModelSource
    from trainers.rng import seed_everything

    seed_everything(cfg.seed)
    model = ModelSource(cfg.model, cfg.method, torch.float32, cfg.seed, cfg.train).whole(torch.device("cpu"))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers import metrics
    from parallel import build_plan
    from trainers.loop import train

    done: dict = {}
    files = tmp_path_factory.mktemp("data")
    for name in ("reverse_pref", "reverse_kto"):
        lines = (REPO / "data" / name / "train.jsonl").read_text().splitlines(keepends=True)[:FULL_ROWS]
        (files / f"{name}.jsonl").write_text("".join(lines))

    def get(case: str, method: str):
        if (case, method) not in done:
            objective, extra, trl_extra = VARIANTS.get(case, (case, [], {}))
            root = tmp_path_factory.mktemp(f"{objective}-{method}")
            name = "reverse_kto" if objective == "kto" else "reverse_pref"
            data = files / f"{name}.jsonl" if method == "full" else REPO / "data" / name / "train.jsonl"
            cfg = our_cfg(objective, method, root / "ours", data, extra)
            init = None
            if method != "full":
                init = root / "init.safetensors"
                initial_adapter(cfg, init)
            o = cfg.optim
            trl = run_trl(MODEL, rows_in_our_order(cfg, STEPS), objective, method=method, batch_size=BATCH, steps=STEPS,
                          lr=float(o.lr), schedule=o.schedule, warmup_steps=o.warmup_steps,
                          min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, betas=tuple(o.betas),
                          eps=float(o.eps), max_grad_norm=o.max_grad_norm, init_from=init,
                          lora_r=cfg.method.get("r", 16), lora_alpha=cfg.method.get("alpha", 32), **trl_extra,
                          **{k: cfg.objective[k] for k in ("beta", "gamma", "desirable_weight", "undesirable_weight")
                             if k in cfg.objective})
            train(cfg, build_plan)
            ours = [r for r in metrics(root / "ours") if "loss" in r]
            done[(case, method)] = (ours, trl)
        return done[(case, method)]

    return get


def close(a: float, b: float, tol: float = 1e-4, scale: float = 0.0) -> bool:
    """|a - b| <= tol * max(|b|, scale, 1e-3). `scale` for a difference of two larger
    numbers (rewards/margins = rewards/chosen - rewards/rejected): its error is relative
    to the terms, and fp32 rounding, amplified by Adam over the steps, reaches 1e-4 of a
    margin that happens to be near zero (measured: up to 1.2e-4 of a -0.079 margin whose
    rewards are 0.4)."""
    return abs(a - b) <= tol * max(abs(b), scale, 1e-3)


# metric -> the metrics it is a difference of
DIFFERENCES = {"rewards/margins": ("rewards/chosen", "rewards/rejected"),
               "log_odds_chosen": ("logps/chosen", "logps/rejected")}


# metric -> factor: quantities of the form factor x (policy - reference summed log-probs)
REFERENCE_DIFFERENCES = {"rewards/chosen": "beta", "rewards/rejected": "beta", "rewards/margins": "beta", "kl": 1.0}


def scale_of(rec: dict, key: str, beta: float) -> float:
    """What `key`'s rounding error is relative to: the terms it is a difference of and, for
    the rewards (and KTO's kl), 1e-2 of (beta x) the summed log-probs whose difference with
    the reference they are. At step 1 of full fine-tuning policy = reference and TRL's
    rewards are 0.0; ours are 2e-7, one fp32 rounding of beta x a log-prob near -30 (the
    precomputed reference scored the sequences in other batches than the policy pass does)."""
    terms = [abs(rec.get(k, 0.0)) for k in DIFFERENCES.get(key, ())]
    if key in REFERENCE_DIFFERENCES:
        factor = beta if REFERENCE_DIFFERENCES[key] == "beta" else REFERENCE_DIFFERENCES[key]
        terms += [1e-2 * factor * abs(rec.get(k, 0.0)) for k in ("logps/chosen", "logps/rejected")]
    return max(terms, default=0.0)


def objective_beta(objective: str) -> float:
    from omegaconf import OmegaConf

    objective = VARIANTS.get(objective, (objective,))[0]
    return float(OmegaConf.load(REPO / "conf" / "objective" / f"{objective}.yaml").get("beta", 0.0))


@pytest.mark.parametrize("objective,method", CASES)
def test_per_step_loss_and_margins_equal_trl(runs, objective, method):
    ours, trl = runs(objective, method)
    assert [r["step"] for r in ours] == [r["step"] for r in trl] == list(range(1, STEPS + 1))
    worst = 0.0
    for o, t in zip(ours, trl):
        for key in ("loss", "rewards/margins"):
            if key not in t:
                continue
            scale = scale_of(t, key, objective_beta(objective))
            assert math.isfinite(o[key]) and close(o[key], t[key], scale=scale), (
                objective, method, o["step"], key, o[key], t[key])
            worst = max(worst, abs(o[key] - t[key]) / max(abs(t[key]), scale, 1e-3))
    assert any("rewards/margins" in t for t in trl)
    print(f"{objective}/{method}: worst relative difference {worst:.2e}")


@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("dpo+rpo", "lora"), ("orpo", "lora"), ("kto", "lora"),
                                              ("kto", "full")])
def test_every_trl_metric_we_log_equals_trl(runs, objective, method):
    """rewards/chosen, rejected, accuracies, logps/* (and ORPO's nll_loss, log_odds_ratio,
    KTO's kl): the same names and values as TRL's logs."""
    ours, trl = runs(objective, method)
    for o, t in zip(ours, trl):
        shared = [k for k in t if k not in ("step", "learning_rate", "grad_norm")]
        for key in shared:
            assert key in o, (objective, key)
            assert close(o[key], t[key], scale=scale_of(t, key, objective_beta(objective))), (
                objective, o["step"], key, o[key], t[key])
        assert close(o["lr"], t["learning_rate"], 1e-9)
