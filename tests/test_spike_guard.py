"""The loss spike guard against planted bad batches (LAUNCH_DEBUG_CORRUPT_STEPS, a
testing-only environment variable: random target tokens), on the bundled pre-trained tiny model, where a bad batch's loss is ~30x a
real one's. One run with the guard, the same run without, and the guarded run under
DeepSpeed ZeRO-2 on 2 processes."""
from __future__ import annotations

import statistics

import pytest

from tests.helpers import launch, metrics, rel, summary

pytestmark = pytest.mark.slow

ARGS = ["train.max_steps=30", "train.save_every=5", "train.eval_every=1000", "data.metric_rows=8",
        "method.dropout=0", "train.spike_guard.min_history=5", "train.spike_guard.max_skips=2"]
PLANTED = {"LAUNCH_DEBUG_CORRUPT_STEPS": "14,18,19"}


def test_guard_skips_bad_batches_and_rolls_back_where_the_unguarded_run_takes_them(tmp_path):
    guarded, unguarded = tmp_path / "guarded", tmp_path / "unguarded"
    out = launch(*ARGS, "train.spike_guard.enabled=true", f"hydra.run.dir={guarded}", env=PLANTED)
    launch(*ARGS, f"hydra.run.dir={unguarded}", env=PLANTED)

    rows = {r["step"]: r for r in metrics(guarded) if "loss" in r}
    assert sorted(s for s, r in rows.items() if r.get("skipped")) == [14, 18, 19]
    for s in (14, 18, 19):
        assert "> 3 x median" in rows[s]["skip_reason"]
        ids = rows[s]["rows"]  # `source:line` of every data row packed into the global batch's 16 rows
        assert len(ids) >= 16 and len(set(ids)) == len(ids)
        assert all(i.startswith("reverse/train:") and int(i.split(":")[1]) >= 1 for i in ids)
        assert f"spike guard: step {s} not applied" in out.stderr
    # 18 and 19 in a row (max_skips=2): back to step_15, then on with step 20.
    rollback = [r for r in metrics(guarded) if "rolled_back_to" in r]
    assert rollback == [dict(rollback[0], step=19, rolled_back_to=15, skipped_steps=[18, 19])]
    assert "rolled back to" in out.stderr and "continuing with step 20" in out.stderr
    assert summary(guarded)["status"] == "completed"

    # Without the guard the same bad batches are applied: the loss jumps and the rest of
    # the run trains worse than with the guard.
    plain = {r["step"]: r["loss"] for r in metrics(unguarded) if "loss" in r}
    assert not any(r.get("skipped") for r in metrics(unguarded))
    assert plain[14] > 5 * statistics.median(plain[s] for s in range(9, 14))
    assert plain[15] > rows[15]["loss"]
    after = range(20, 31)
    assert statistics.mean(plain[s] for s in after) > 1.2 * statistics.mean(rows[s]["loss"] for s in after)
    assert summary(unguarded)["final_eval_loss"] > summary(guarded)["final_eval_loss"]

    # DeepSpeed computes the norm inside its own step and skips through its overflow path:
    # the same decisions, the same rollback, and then the same numbers as one process.
    zero2 = tmp_path / "zero2"
    launch(*ARGS, "train.spike_guard.enabled=true", "parallel=zero2", "launcher.nproc_per_node=2",
           "train.grad_accum=1", f"hydra.run.dir={zero2}", env=PLANTED)
    got = {r["step"]: r for r in metrics(zero2) if "loss" in r}
    assert sorted(s for s, r in got.items() if r.get("skipped")) == [14, 18, 19]
    assert [r for r in metrics(zero2) if "rolled_back_to" in r][0]["rolled_back_to"] == 15
    for s in rows:
        assert rel(got[s]["loss"], rows[s]["loss"]) < 1e-5, (s, got[s], rows[s])
