"""Where numbers go: metrics.jsonl, TensorBoard, a progress bar or plain log lines.

Only rank 0 writes. On a terminal a tqdm bar shows progress; in a batch log (SLURM, CI)
each logged step is one plain line, which greps and tails better than bar redraws.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from trainers.files import atomic_write

log = logging.getLogger("train")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.t0 = time.perf_counter()
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record)
        record["elapsed_s"] = round(self.elapsed(), 3)
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
        if self._bar is not None and "loss" in record:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        else:
            log.info(" ".join(f"{k}={v}" for k, v in record.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._file.close()


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
