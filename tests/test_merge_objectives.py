"""Merges of runs of other objectives than sft are scored with their objective's held-out
metrics by the training loop's evaluator: two short DPO runs and two short reward-model runs
of the bundled model (one launch worker), then a linear merge of the DPO runs and a greedy
soup of the reward models ranked by accuracy. Each input's score is its run's own final
eval (the DPO reference, the runs' model.path, recomputed by the merge), so the columns mean
what they meant in training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import bundled_head, launch_many

pytestmark = pytest.mark.slow  # four short runs in one launch worker, then in-process merges

ARGS = ["data=reverse_pref", "train.max_steps=3", "train.micro_batch_size=4", "train.grad_accum=1",
        "train.eval_every=1000", "train.save_every=1000", "data.metric_rows=2", "data.max_new_tokens=8",
        "method.dropout=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge-objectives")
    cut = bundled_head(root, "reverse_pref", {"train": 24, "eval": 8})
    launches = {f"{obj}{seed}": (root / f"{obj}{seed}", [f"objective={obj}", f"seed={seed}", *ARGS, *cut])
                for obj in ("dpo", "reward") for seed in (1, 2)}
    launch_many(root, launches)
    return {name: run_dir for name, (run_dir, _) in launches.items()} | {"root": root}


def final_eval(run_dir: Path) -> dict:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r][-1]


def merge_cfg(**values):
    from tests.test_merge import merge_cfg as cfg

    return cfg(**values)


def test_preference_runs_scored_with_preference_accuracy(runs):
    from launch.merging.run import execute, prepare

    out = runs["root"] / "dpo-linear"
    rep = execute(prepare(merge_cfg(method="linear", inputs=[str(runs["dpo1"]), str(runs["dpo2"])], out=str(out))))
    assert rep["objective"] == "dpo"
    assert rep["columns"] == ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_exact_match"]
    assert "| model | role | eval loss | preference accuracy | reward margin | exact match |" in rep["table"]
    for row in rep["rows"][:2]:  # each input scored as its run scored itself at its end
        want = final_eval(Path(row["run_dir"]))
        for key in rep["columns"]:
            assert row["scores"][key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (row["label"], key)
    assert all(math.isfinite(rep["scores"][k]) for k in rep["columns"])


def test_reward_models_greedy_soup_by_accuracy(runs):
    import torch
    from transformers import AutoModelForSequenceClassification

    from launch.merging.run import execute, prepare
    from trainers.errors import UserError

    inputs = [str(runs["reward1"]), str(runs["reward2"])]
    with pytest.raises(UserError) as e:  # a metric the reward model's evaluation does not report
        prepare(merge_cfg(method="greedy_soup", inputs=inputs, metric="eval_exact_match",
                          out=str(runs["root"] / "never")))
    assert "reports eval_loss, eval_accuracy, eval_margin" in str(e.value) and not (runs["root"] / "never").exists()
    out = runs["root"] / "reward-greedy"
    rep = execute(prepare(merge_cfg(method="greedy_soup", inputs=inputs, metric="eval_accuracy", out=str(out))))
    assert rep["objective"] == "reward" and rep["columns"] == ["eval_loss", "eval_accuracy", "eval_margin"]
    assert "| model | role | eval loss | accuracy | margin |" in rep["table"]
    scores = {}
    for row in rep["rows"][:2]:
        want = final_eval(Path(row["run_dir"]))
        for key in rep["columns"]:
            assert row["scores"][key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (row["label"], key)
        scores[row["label"]] = row["scores"]["eval_accuracy"]
    trace = rep["greedy"]
    assert [g["score"] for g in trace] == sorted(scores.values(), reverse=True)  # best accuracy first
    assert trace[1]["kept"] == (trace[1]["soup_score"] > trace[0]["score"])
    model = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32)  # a reward model
    assert model.config.num_labels == 1
