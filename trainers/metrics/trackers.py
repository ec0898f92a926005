"""Experiment trackers as sinks of the metric stream (train.report_to): TensorBoard (the
default), Weights & Biases, MLflow, trackio. Rank 0 only (MetricsLogger creates them).

Each tracker run is named after the run directory and gets the resolved config as its
parameters, minus anything that looks like a credential (keys named like a token or
password, and values of the environment's secret variables). The tracker's run id is kept
in RUN_DIR/trackers.json, so a relaunch that resumes the run continues the same tracker
run instead of starting a new one. Where each tracker writes is its own environment's
business (WANDB_MODE / WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR).
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path

from omegaconf import OmegaConf

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Number) and not isinstance(v, bool)}


def run_params(cfg) -> dict[str, str]:
    """The resolved config flattened to dotted keys, without secrets or data.prepared."""
    from trainers.secrets import SECRET_NAME, secret_env

    tree = OmegaConf.to_container(cfg, resolve=True)
    tree["data"].pop("prepared", None)
    secrets = [v for v in secret_env().values()]
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        key, text = prefix[:-1], json.dumps(node) if not isinstance(node, str) else node
        if SECRET_NAME.search(key) or any(s in text for s in secrets):
            return
        flat[key] = text

    walk(tree, "")
    return flat


class TrackerIds:
    """RUN_DIR/trackers.json: each tracker's run id, for resuming the same run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "trackers.json"
        self.ids = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, name: str) -> str | None:
        return self.ids.get(name)

    def set(self, name: str, value: str) -> None:
        from trainers.files import atomic_write

        self.ids[name] = value
        atomic_write(self.path, json.dumps(self.ids, indent=1))


class TensorBoardSink:
    def __init__(self, cfg, start_step: int, ids: TrackerIds):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(cfg.run_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        for k, v in scalars(record).items():
            self._tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, record["step"])

    def close(self) -> None:
        self._tb.close()


class WandbSink:
    def __init__(self, cfg, start_step: int, ids: TrackerIds):
        import uuid

        import wandb

        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]
        ids.set("wandb", run_id)
        self._run = wandb.init(project=cfg.train.tracker_project, name=str(cfg.run_dir), id=run_id,
                               resume="allow", dir=str(cfg.run_dir), config=run_params(cfg))

    def log(self, record: dict) -> None:
        self._run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    def __init__(self, cfg, start_step: int, ids: TrackerIds):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient()
        run_id = ids.get("mlflow")
        if run_id is None:
            name = cfg.train.tracker_project
            exp = self._client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(name)
            run_id = self._client.create_run(exp_id, run_name=str(cfg.run_dir)).info.run_id
            ids.set("mlflow", run_id)
            params = [Param(k, v[:6000]) for k, v in run_params(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self._client.log_batch(run_id, params=params[i:i + 100])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._run_id = run_id

    def log(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["step"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


class TrackioSink:
    def __init__(self, cfg, start_step: int, ids: TrackerIds):
        import trackio

        self._trackio = trackio
        self._run = trackio.init(project=cfg.train.tracker_project, name=str(cfg.run_dir),
                                 config=run_params(cfg), resume="allow")

    def log(self, record: dict) -> None:
        self._trackio.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self._trackio.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink, "trackio": TrackioSink}


def tracker_sinks(cfg, start_step: int) -> list:
    ids = TrackerIds(cfg.run_dir)
    return [SINKS[name](cfg, start_step, ids) for name in cfg.train.report_to]
