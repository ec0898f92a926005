"""Run the real CLI in a subprocess and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Small, fast, deterministic settings shared by most tests (no dropout so that runs
# split differently over micro-batches/ranks are comparable).
FAST = [
    "train.max_steps=10",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.eval_every=1000",
    "train.save_every=1000",
    "data.metric_rows=8",
    "method.dropout=0",
]


def launch(*overrides: str, timeout: int = 600, env: dict | None = None, check: bool = True):
    """`python launch.py OVERRIDES...` in a fresh process; returns CompletedProcess."""
    full_env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *overrides],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss (the last record wins, as after a resume)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def fast_for(method: str) -> list[str]:
    """FAST without `method.dropout` for method=full (it has no dropout key)."""
    return [o for o in FAST if method != "full" or not o.startswith("method.dropout")]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def exported(run_dir: Path) -> dict:
    """Every tensor of export/adapter and export/merged, keyed "adapter/..." / "merged/..."."""
    from safetensors.torch import load_file

    out = {}
    for kind in ("adapter", "merged"):
        for f in sorted((Path(run_dir) / "export" / kind).glob("*.safetensors")):
            out.update({f"{kind}/{k}": v for k, v in load_file(f).items()})
    return out


def assert_resumed_exactly(run_dir: Path, uninterrupted: Path, killed_at: int, steps: int = 10) -> None:
    """A relaunched run resumed from step `killed_at` and ends exactly like the run that
    was never interrupted: per-step losses and final eval loss to 1e-6."""
    ref, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for s in ref:
        assert rel(got[s], ref[s]) < 1e-6, (s, got[s], ref[s])
    final = summary(run_dir)
    assert final["status"] == "completed" and final["final_step"] == steps
    assert rel(final["final_eval_loss"], summary(uninterrupted)["final_eval_loss"]) < 1e-6


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "condition") -> None:
    """Poll `predicate` while the run `proc` is alive; fail with its stderr if it ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
