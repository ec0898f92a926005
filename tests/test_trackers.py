"""train.report_to: every tracker is a sink of the same metric stream, tested offline on a
real run that is then resumed: W&B in offline mode, MLflow on a sqlite: store, trackio in
a local directory. The resumed launch must continue the same tracker run."""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.helpers import REPO, compose, launch, losses


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    held = "\n".join((REPO / "data/reverse/eval.jsonl").read_text().splitlines()[:4]) + "\n"
    (tmp / "held.jsonl").write_text(held)
    run = tmp / "run"
    env = {"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
           "TRACKIO_DIR": str(tmp / "trackio"), "WANDB_SILENT": "true"}
    common = [f"hydra.run.dir={run}", f"data.eval={tmp / 'held.jsonl'}", "eval.probes=null", "data.metric_rows=2",
              "train.micro_batch_size=4", "train.grad_accum=1", "train.save_every=1000", "train.eval_every=1000",
              "train.report_to=[tensorboard,wandb,mlflow,trackio]"]
    launch(*common, "train.max_steps=3", env=env)
    launch(*common, "train.max_steps=5", env=env)  # resumes from step 3
    return run, tmp


@pytest.mark.slow
def test_wandb_offline_writes_one_run_continued_by_the_resume(tracked_run):
    run, _ = tracked_run
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline)
    assert all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)


@pytest.mark.slow
def test_mlflow_holds_every_loss_point_in_one_run(tracked_run):
    run, tmp = tracked_run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("llm-launcher")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == str(run)
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx(losses(run)) and sorted(history) == [1, 2, 3, 4, 5]
    assert runs[0].data.params["train.max_steps"] == "3" and "data.prepared" not in runs[0].data.params


@pytest.mark.slow
def test_trackio_logs_locally_into_one_run(tracked_run):
    run, tmp = tracked_run
    db = sqlite3.connect(tmp / "trackio" / "llm-launcher.db")
    rows = db.execute("select run_id, step, metrics from metrics where run_name = ?", (str(run),)).fetchall()
    steps = {step: json.loads(m)["loss"] for _, step, m in rows if "loss" in json.loads(m)}
    assert len({r[0] for r in rows}) == 1 and steps == pytest.approx(losses(run))


def test_run_params_leave_secrets_out(monkeypatch):
    from trainers.metrics.trackers import run_params

    monkeypatch.setenv("MY_API_KEY", "s3cr3t-value-42")
    params = run_params(compose("run_name=job-s3cr3t-value-42"))
    assert "run_name" not in params and "train.max_steps" in params
    assert not any("s3cr3t-value-42" in v for v in params.values())
