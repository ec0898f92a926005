"""The shared loop on one process: split invariance, exact resume after SIGKILL,
non-finite loss handling, bad rows skipped, and the run directory's contents.

The fast tests share one process for all their launches (`runs`, helpers.launch_many):
the interpreter start and the torch import are paid once."""
from __future__ import annotations

import json

import pytest

from tests.helpers import (FAST, assert_resumed_exactly, kill_tree, launch, launch_many, losses, metrics, start,
                           summary, wait_until)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """name -> CompletedProcess of every launch below (run dirs under `root`), in order."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.test_cli import BAD, GOOD

    root = tmp_path_factory.mktemp("loop-runs")
    # A base whose weights went bad (NaN), for a resumed LoRA run.
    poisoned = root / "poisoned"
    shutil.copytree(tiny_model, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    bad_rows = root / "bad_rows.jsonl"
    bad_rows.write_text("".join(json.dumps(r) + "\n" for r in [GOOD] * 12 + [BAD["role_order"][0],
                                                                             BAD["empty_answer"][0]]))

    model = f"model.path={tiny_model}"
    nan = [*FAST, "train.save_every=4"]
    procs = launch_many(root, {
        "split-a": (root / "a", [model, *FAST, "train.micro_batch_size=8", "train.grad_accum=1"]),
        "split-b": (root / "b", [model, *FAST, "train.micro_batch_size=2", "train.grad_accum=4"]),
        "contents": (root / "contents", [model, *FAST, "train.max_steps=6", "train.eval_every=3",
                                         "train.save_every=2", "train.keep_last=2"]),
        "nan-1": (root / "nan", [model, *nan, "train.max_steps=4"]),
        "nan-2": (root / "nan", [f"model.path={poisoned}", *nan, "train.max_steps=8"]),
        "nan-3": (root / "nan", [model, *nan, "train.max_steps=6"]),
        "skip": (root / "skip", [model, f"data.train={bad_rows}", "data.on_bad_row=skip", "data.packing=false",
                                 "data.eval=null", *FAST, "train.max_steps=2"]),
    }, check=False)
    for name, proc in procs.items():
        if name != "nan-2":
            assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-6000:])
    return root, procs


def test_batch_split_does_not_change_losses(runs):
    root, _ = runs
    la, lb = losses(root / "a"), losses(root / "b")
    assert len(la) == 10 and la.keys() == lb.keys()
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s
    assert la[10] < la[1]


def test_run_directory_contents(runs):
    run = runs[0] / "contents"
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= train_rows[0].keys()
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6], evals
    # a random-init base reproduces no reversal in 6 steps (nan would mean nothing was generated)
    assert [r["eval_exact_match"] for r in evals] == [0.0, 0.0, 0.0], evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == 6 and s["final_loss"] == train_rows[-1]["loss"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_4", "step_6"]  # keep_last=2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert (run / "config.yaml").exists() and (run / "loss.png").stat().st_size > 1000
    # TensorBoard holds the same numbers as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_rows]
    assert [(e.step, e.value) for e in board.Scalars("eval/eval_loss")] == \
        [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_lora_export_merged_equals_base_plus_adapter(runs, tiny_model):
    """The fast tier's export check (every method's is in tests/test_export.py, slow)."""
    from tests.test_export import assert_merged_equals_base_plus_adapter

    assert_merged_equals_base_plus_adapter(runs[0] / "contents", tiny_model)


def test_skipped_bad_rows_are_counted_and_the_run_trains_on_the_rest(runs):
    root, procs = runs
    err = procs["skip"].stderr
    assert "12/14 rows kept" in err and "role_order x1" in err and "empty_answer x1" in err, err[-3000:]
    s = summary(root / "skip")
    assert s["status"] == "completed" and s["final_step"] == 2


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


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(runs):
    """A base whose weights went bad (NaN) under a resumed LoRA run: the run stops with a
    message before the optimizer step, and the committed checkpoint still resumes."""
    import torch

    root, procs = runs
    run = root / "nan"
    proc = procs["nan-2"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "The loss became nan at step 5" in out and "Traceback" not in out, out
    s = proc.left["summary"]  # as the failed launch left it (the relaunch has replaced it since)
    assert s["status"] == "failed" and "loss became" in s["error"] and s["final_step"] == 4
    assert proc.left["latest"] == "step_4"
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == 6 and sorted(losses(run)) == list(range(1, 7))
    assert torch.isfinite(torch.tensor([losses(run)[5], losses(run)[6]])).all()  # resumed from step 4 on the good base
