"""docs/dpo-after-sft.md's command (issue 25): DPO with objective.rpo_alpha=1.0 from the
bundled SFT run's export learns the preference without destroying the model: held-out
exact match stays within 0.05 of the SFT model's while preference accuracy rises. Plain
DPO from the same export falls to exact match 0.00 in 200 steps (measured, in the doc);
this runs the fixed command for 40 steps (measured: exact match 1.00 -> 0.97, preference
accuracy 0.00 -> 0.79), starting from the SFT run tests/test_default_run.py checks."""
from __future__ import annotations

import pytest

from tests.helpers import launch, metrics

pytestmark = pytest.mark.slow


def test_dpo_with_rpo_alpha_keeps_exact_match_while_preference_accuracy_rises(default_run, tmp_path):
    run = tmp_path / "dpo"
    launch("objective=dpo", "data=reverse_pref", f"model.path={default_run / 'export' / 'merged'}",
           "objective.rpo_alpha=1.0", "train.max_steps=40", "train.eval_every=40", f"hydra.run.dir={run}",
           timeout=1800)
    evals = [r for r in metrics(run) if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [0, 40]
    before, after = evals
    sft = before["eval_exact_match"]  # the SFT export itself, on the preference set's held-out prompts
    assert sft >= 0.9, evals
    assert after["eval_exact_match"] >= sft - 0.05, (sft, evals)
    assert after["eval_rewards/accuracies"] >= before["eval_rewards/accuracies"] + 0.5, evals
