"""The shared loop on one process: split invariance, exact resume after SIGKILL,
non-finite loss handling, and the run directory's contents."""
from __future__ import annotations

import pytest

from tests.helpers import FAST, assert_resumed_exactly, kill_tree, launch, losses, metrics, start, summary, wait_until


def test_batch_split_does_not_change_losses(tmp_path, tiny_model):
    a, b = tmp_path / "a", tmp_path / "b"
    launch(f"model.path={tiny_model}", *FAST, "train.micro_batch_size=8", "train.grad_accum=1", f"hydra.run.dir={a}")
    launch(f"model.path={tiny_model}", *FAST, "train.micro_batch_size=2", "train.grad_accum=4", f"hydra.run.dir={b}")
    la, lb = losses(a), losses(b)
    assert len(la) == 10 and la.keys() == lb.keys()
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s
    assert la[10] < la[1]


def test_run_directory_contents(tmp_path, tiny_model):
    run = tmp_path / "run"
    launch(f"model.path={tiny_model}", *FAST, "train.max_steps=6", "train.eval_every=3", "train.save_every=2",
           "train.keep_last=2", f"hydra.run.dir={run}")
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= train_rows[0].keys()
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("eval_exact_match" in r for r in evals)
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == 6 and s["final_loss"] == train_rows[-1]["loss"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_4", "step_6"]  # keep_last=2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert (run / "config.yaml").exists() and (run / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()



@pytest.mark.slow
def test_sigkill_then_relaunch_continues_exactly(tmp_path, tiny_model):
    """LoRA dropout stays on: identical losses need the RNG states restored too."""
    args = [f"model.path={tiny_model}", *FAST[:-1], "method.dropout=0.1", "train.max_steps=12",
            "train.save_every=4", "train.eval_every=6"]
    ref = tmp_path / "ref"
    launch(*args, f"hydra.run.dir={ref}")

    run = tmp_path / "run"
    proc = start(run, *args)
    committed = run / "checkpoints" / "step_4" / "COMMITTED"
    try:
        wait_until(committed.exists, proc, 300, str(committed))
    finally:
        kill_tree(proc)
    assert not (run / "summary.json").exists()
    launch(*args, f"hydra.run.dir={run}")
    assert_resumed_exactly(run, ref, steps=12)


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tmp_path, tiny_model):
    """A base whose weights went bad (NaN) under a resumed LoRA run: the run stops with a
    message before the optimizer step, and the committed checkpoint still resumes."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_model, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})

    run = tmp_path / "run"
    common = [*FAST, "train.save_every=4", f"hydra.run.dir={run}"]
    launch(f"model.path={tiny_model}", *common, "train.max_steps=4")
    proc = launch(f"model.path={poisoned}", *common, "train.max_steps=8", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "The loss became nan at step 5" in out and "Traceback" not in out, out
    s = summary(run)
    assert s["status"] == "failed" and "loss became" in s["error"] and s["final_step"] == 4
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    launch(f"model.path={tiny_model}", *common, "train.max_steps=6")
    assert summary(run)["status"] == "completed" and torch.isfinite(torch.tensor(losses(run)[6]))
