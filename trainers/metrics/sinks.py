"""Where numbers go: one stream of records, written by rank 0 to every sink.

Sinks: metrics.jsonl (full precision, always), the trackers of train.report_to
(TensorBoard by default; W&B, MLflow, trackio: trainers/metrics/trackers.py) and the console. On a
terminal a tqdm bar shows progress; in a batch log (SLURM, CI) each logged step is one
plain line with floats cut to a few significant digits, which greps and tails better
than bar redraws. Other ranks get no sinks.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from trainers.files import atomic_write

log = logging.getLogger("train")


def short(value) -> str:
    """A float with 4 significant digits (metrics.jsonl keeps all of them)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class JsonlSink:
    def __init__(self, run_dir: Path):
        self._file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    def __init__(self, start_step: int, max_steps: int):
        self._bar = self._redirect = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)
            # other log lines (checkpoints, warnings) are printed above the bar, not through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def log(self, record: dict) -> None:
        if self._bar is not None and "loss" in record:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(loss=short(record["loss"]), lr=f"{record['lr']:.2e}")
        elif self._bar is not None:  # above the bar, not through it
            self._bar.write(" ".join(f"{k}={short(v)}" for k, v in record.items()), file=sys.stderr)
        else:
            log.info(" ".join(f"{k}={short(v)}" for k, v in record.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()


class MetricsLogger:
    """The loop's one metric stream: `log(record)` (a dict with `step`) goes to every sink."""

    def __init__(self, cfg, enabled: bool, start_step: int):
        self.enabled = enabled
        self.run_dir = Path(cfg.run_dir)
        self.t0 = time.perf_counter()
        self.sinks = []
        if not enabled:
            return
        from trainers.metrics.trackers import tracker_sinks

        self.sinks = [JsonlSink(self.run_dir), *tracker_sinks(cfg, start_step),
                      ConsoleSink(start_step, cfg.train.max_steps)]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record)
        record["elapsed_s"] = round(self.elapsed(), 3)
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png with the train curve and eval points (latest value wins per step)."""
    rows = read_metrics(run_dir)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss", lw=1)
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write(Path(run_dir) / "summary.json", json.dumps(summary, indent=1))
