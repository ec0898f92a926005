"""`python -m launch.doctor` on what real runs wrote: tests/data/doctor/<case>/ holds the
metrics.jsonl, summary.json and config (objective, optim) of short runs of the bundled
model made to show one thing each (scripts/make_doctor_cases.py regenerates them; `overfit`
has tests/test_evaluation.py's settings without early stopping)."""
from __future__ import annotations

import subprocess
import sys

from launch.doctor import diagnose
from tests.helpers import REPO

CASES = REPO / "tests/data/doctor"


def names(case: str) -> list[str]:
    return [f.name for f in diagnose(CASES / case)]


def test_a_healthy_run_gets_no_finding():
    assert names("healthy") == []
    out = subprocess.run([sys.executable, "-m", "launch.doctor", str(CASES / "healthy")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "nothing wrong found" in out.stdout


def test_divergence_names_the_exploding_grad_norm_and_the_lr():
    found = diagnose(CASES / "diverge")
    div = [f for f in found if f.name.startswith("divergence")]
    assert div and "grad norm up to" in div[0].evidence and "optim.lr (now 0.9)" in div[0].advice


def test_overfitting_says_where_it_started():
    found = {f.name: f for f in diagnose(CASES / "overfit")}
    assert "overfitting" in found and "lowest at step 4" in found["overfitting"].evidence
    assert "forgetting" in found  # two rows at lr 1e-2 also wreck the general probe


def test_underfitting():
    assert names("underfit") == ["underfitting"]


def test_loss_collapsing_to_zero():
    assert "loss collapsed to zero" in names("collapse")


def test_likelihood_displacement_in_a_preference_run():
    found = {f.name: f for f in diagnose(CASES / "dpo")}
    assert "likelihood displacement" in found and "chosen log-probs fell" in found["likelihood displacement"].evidence


def test_the_command_line_prints_evidence_and_advice():
    out = subprocess.run([sys.executable, "-m", "launch.doctor", str(CASES / "diverge")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "finding(s)" in out.stdout and "try: lower optim.lr" in out.stdout


def test_grpo_run_without_reward_variance():
    """TRL's GRPOTrainer on the bundled model with a reward that is the same for every
    completion: every group has zero reward std."""
    assert names("grpo_flat") == ["GRPO: no reward variance"]
