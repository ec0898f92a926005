"""docs/grpo.md's demo with the defaults (issue 22): a 30-step SFT run of the bundled job,
then `python launch.py objective=grpo data=reverse_rl model.path=RUN/export/merged` with
nothing else but fewer steps. objective=grpo brings the batch and lr that suit it
(conf/objective_training/grpo.yaml, composed after train/ and optim/): the composed config
holds them, and the training reward rises without the collapse the shared defaults gave
(lr 3e-3 and 2 prompts per step: one repeated character within 30 steps; docs/grpo.md)."""
from __future__ import annotations

import pytest
import yaml

from tests.helpers import launch, metrics

pytestmark = pytest.mark.slow

STEPS = 20


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-demo")
    sft, grpo = root / "sft", root / "grpo"
    launch("train.max_steps=30", "data.eval=null", f"hydra.run.dir={sft}", timeout=1800)
    launch("objective=grpo", "data=reverse_rl", f"model.path={sft / 'export' / 'merged'}",
           f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", f"hydra.run.dir={grpo}", timeout=1800)
    return grpo


def test_objective_grpo_sets_its_batch_and_lr(demo):
    cfg = yaml.safe_load((demo / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 5e-4 and cfg["train"]["micro_batch_size"] == 16, (cfg["optim"], cfg["train"])
    assert cfg["train"]["grad_accum"] == 2 and cfg["objective"]["num_generations"] == 8
    assert cfg["train"]["max_steps"] == STEPS  # the command line still wins over the objective's values


def test_the_demo_with_the_defaults_raises_the_reward(demo):
    """Measured on this CPU (deterministic for a given machine): the sampled training reward,
    mean of steps 1-10 vs 11-20, 0.515 -> 0.556. Held-out reward after only 20 steps is in the
    dip the 100-step run also shows at step 50 (0.855 -> 0.831, exact match 0.62 -> 0.56; the
    full run ends at 0.891 / 0.69, docs/grpo.md), so here it is held to not collapsing: the
    shared defaults' lr 3e-3 run writes one repeated character within 30 steps (exact match 0)."""
    steps = [r for r in metrics(demo) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    half = STEPS // 2
    early = sum(r["reward"] for r in steps[:half]) / half
    late = sum(r["reward"] for r in steps[half:]) / (STEPS - half)
    assert late > early + 0.03, [round(r["reward"], 3) for r in steps]
    evals = [r for r in metrics(demo) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    assert evals[0]["eval_exact_match"] >= 0.5, evals  # the SFT export already writes the chat answer
    assert evals[-1]["eval_exact_match"] >= 0.4 and evals[-1]["eval_reward"] >= 0.7, evals
    assert min(r["entropy"] for r in steps) > 0.3, [round(r["entropy"], 3) for r in steps]
