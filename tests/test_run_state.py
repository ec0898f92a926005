"""A run's status, derived once (launch.run_state.derive_status) for `python -m launch.status`
and the sweep summary. Before, each reader derived it itself and they disagreed: the sweep
summary never asked the scheduler (a cancelled job stayed `running` or `pending` forever, so
the sweep never completed), and neither read the last attempt's own record (a task killed
outright left the previous attempt's `preempted` summary in charge)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.run_state import IN_PROGRESS, derive_status, needs_scheduler

RUNNING = {"job_id": "7", "attempts": [{"restart": 0, "started": "t"}]}
REQUEUED = {"job_id": "7", "attempts": [{"restart": 0, "ended": "t", "status": "preempted", "requeued": True}]}
SUBMITTED = {"job_id": "7", "requeues": 0}


@pytest.mark.parametrize("summary, state, scheduler, expected", [
    ({}, {}, None, "not started"),  # launcher=local, nothing yet
    ({"status": "completed"}, {}, None, "completed"),  # launcher=local
    ({"final_step": 3}, {}, None, "unknown"),
    ({}, SUBMITTED, "PENDING", "pending"),
    ({}, SUBMITTED, None, "pending"),  # no scheduler to ask
    ({}, RUNNING, "RUNNING", "running"),
    ({"status": "preempted"}, REQUEUED, "PENDING", "requeued"),
    # The sweep said `running` / `pending` / `requeued` here forever: SLURM ended the job
    # (scancel, a kill that left no record) and only the scheduler knows.
    ({}, RUNNING, "CANCELLED", "killed (CANCELLED)"),
    ({}, SUBMITTED, "FAILED", "no summary (FAILED)"),
    ({"status": "preempted"}, REQUEUED, "CANCELLED", "killed (CANCELLED)"),
    # Both said `preempted`: the summary is the previous attempt's, rank 0 was killed
    # before it could write its own; after_srun recorded the attempt.
    ({"status": "preempted", "final_step": 20},
     {"job_id": "7", "attempts": [REQUEUED["attempts"][0],
                                  {"restart": 1, "ended": "t", "status": "task died", "requeued": False}]},
     "FAILED", "task died"),
    ({"status": "completed"}, {"job_id": "7", "attempts": [{"restart": 0, "ended": "t", "status": "completed"}]},
     "COMPLETED", "completed"),
])
def test_derive_status(summary, state, scheduler, expected):
    assert derive_status(summary, state, scheduler) == expected


def test_the_scheduler_is_asked_only_about_submitted_runs_the_records_say_are_not_over():
    assert needs_scheduler({}, RUNNING) and needs_scheduler({}, SUBMITTED) and needs_scheduler({}, REQUEUED)
    assert not needs_scheduler({}, {})  # launcher=local: there is no job
    assert not needs_scheduler({"status": "completed"},
                               {"job_id": "7", "attempts": [{"ended": "t", "status": "completed"}]})
    assert {"pending", "running", "requeued", "not started"} == IN_PROGRESS


def _run_dir(root: Path, name: str, summary: dict, state: dict) -> Path:
    run = root / name
    (run / "slurm").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "slurm" / "state.json").write_text(json.dumps(state))
    return run


def test_status_and_sweep_summary_agree(tmp_path, monkeypatch):
    """The same run dirs through both readers, with a scheduler that says every job is over."""
    import launch.status as status
    import launch.sweep as sweep

    for reader in (status, sweep):
        monkeypatch.setattr(reader, "job_state", lambda job_id: "CANCELLED")
    monkeypatch.setattr(status, "sacct", lambda job_id: None)
    runs = {
        "killed (CANCELLED)": _run_dir(tmp_path, "0", {}, RUNNING),
        "task died": _run_dir(tmp_path, "1", {"status": "preempted"}, {
            "job_id": "8", "attempts": [{"restart": 0, "ended": "t", "status": "task died"}]}),
        "hung": _run_dir(tmp_path, "2", {"status": "hung"}, {}),  # was not final for the sweep
    }
    (tmp_path / sweep.MANIFEST).write_text(json.dumps({"points": [
        {"num": i, "overrides": [f"x={i}"], "run_dir": str(run)} for i, run in enumerate(runs.values())]}))
    data = sweep.refresh_sweep_summary(tmp_path)
    assert [p["status"] for p in data["points"]] == list(runs)
    assert [status.run_status(run)["status"] for run in runs.values()] == list(runs)
    assert data["complete"]  # nothing more will happen to any point
    assert status.main([str(runs["hung"])]) == 1 and status.main([str(tmp_path)]) == 1
