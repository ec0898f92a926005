"""`python launch.py` with no argument trains the bundled model on the bundled task and
the held-out exact match clearly improves."""
from __future__ import annotations

import pytest

from tests.helpers import metrics, summary

pytestmark = pytest.mark.slow


def test_default_run_learns_the_bundled_task(default_run):
    run = default_run
    evals = [r for r in metrics(run) if "eval_exact_match" in r]
    before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
    assert evals[0]["step"] == 0 and before <= 0.1, evals
    assert after >= 0.6 and after >= before + 0.5, evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 2
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == 200
    assert (run / "export" / "merged" / "model.safetensors").exists()
