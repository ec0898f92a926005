"""Merges of GRPO runs are scored with GRPO's own evaluation (greedy completions of the
held-out prompts, the run's reward functions): two short GRPO runs on data=reverse_rl from
the default SFT run's export (the session's `default_run`, shared with
tests/test_default_run.py; the bundled random-init model alone earns no reward, so the
scores would all be 0), in one launch worker, then a linear merge and a greedy soup ranked by
eval_reward. Each input's scores are its run's final eval (same greedy completions, same
rewards: the runs' LoRA generates through W + scale B A, as its merged export computes), and
scoring writes nothing into the runs it reads (GRPO's evaluation writes a completions sample
beside its run). Parity holds with method.dropout=0."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import bundled_head, launch_many

pytestmark = pytest.mark.slow  # two short runs in one launch worker, then in-process merges

ARGS = ["objective=grpo", "data=reverse_rl", "train.max_steps=2", "train.micro_batch_size=8", "train.grad_accum=1",
        "objective.num_generations=4", "objective.max_completion_length=8", "objective.temperature=1.5", "train.eval_every=1000",
        "train.save_every=1000", "data.metric_rows=4", "method.dropout=0", "optim.warmup_steps=0",
        "optim.schedule=constant"]


USER_REWARD = '''
def vowels(completions, answer, **kwargs):
    """A user's reward from outside the project: the share of vowels in each completion."""
    texts = [c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory, default_run) -> dict:
    """Rewards of every kind: two built-in functions, a user module (on PYTHONPATH for the
    runs, on sys.path for the in-process merges, as `python -m launch.merge` with that
    PYTHONPATH would have it) and a reward model (the SFT export with a seeded random score
    head: a sequence classifier with one label)."""
    import os
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("merge-grpo")
    cut = bundled_head(root, "reverse_rl", {"train": 8, "eval": 4})
    (root / "merge_user_rewards.py").write_text(USER_REWARD)
    sft = default_run / "export" / "merged"
    torch.manual_seed(0)
    rm = root / "judge"
    AutoModelForSequenceClassification.from_pretrained(str(sft), num_labels=1).save_pretrained(str(rm))
    AutoTokenizer.from_pretrained(str(sft)).save_pretrained(str(rm))
    rewards = ("objective.rewards=[{fn: trainers.objectives.reverse_rewards:partial_credit, weight: 1.0}, "
               "{fn: trainers.objectives.reverse_rewards:exact_match, weight: 0.0}, "
               f"{{fn: merge_user_rewards:vowels, weight: 0.5}}, {{model: {rm}, weight: 0.1}}]")
    launches = {f"grpo{seed}": (root / f"grpo{seed}", [f"seed={seed}", f"optim.lr={lr}", f"model.path={sft}",
                                                       rewards, *ARGS, *cut])
                for seed, lr in ((1, 3e-3), (2, 1e-2))}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), old or ""])
    try:
        launch_many(root, launches)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    sys.path.insert(0, str(root))
    yield {name: run_dir for name, (run_dir, _) in launches.items()} | {"root": root}
    sys.path.remove(str(root))


def final_eval(run_dir: Path) -> dict:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_reward" in r][-1]


def files_of(run_dir: Path) -> dict:
    """Every file of a run with its size and modification time: what a write would change."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def merge_cfg(**values):
    from tests.test_merge import merge_cfg as cfg

    return cfg(**values)


COLUMNS = ["eval_reward", "eval_exact_match", "eval_rewards/partial_credit/mean", "eval_rewards/exact_match/mean",
           "eval_rewards/vowels/mean", "eval_rewards/judge/mean"]


@pytest.fixture(scope="module")
def linear(runs) -> dict:
    from launch.merging.run import execute, prepare

    before = {name: files_of(runs[name]) for name in ("grpo1", "grpo2")}
    out = runs["root"] / "grpo-linear"
    rep = execute(prepare(merge_cfg(method="linear", inputs=[str(runs["grpo1"]), str(runs["grpo2"])], out=str(out))))
    return {"report": rep, "before": before, "out": out}


def test_grpo_inputs_scored_as_their_final_eval(runs, linear):
    rep = linear["report"]
    assert rep["objective"] == "grpo" and rep["columns"] == COLUMNS
    assert ("| model | role | mean reward | exact match | partial_credit reward | exact_match reward | vowels reward | "
            "judge reward |") in rep["table"]
    for row in rep["rows"][:2]:  # each input scored as its run scored itself at its end
        want = final_eval(Path(row["run_dir"]))
        for key in COLUMNS:
            assert row["scores"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (row["label"], key)
    assert rep["rows"][0]["scores"] != rep["rows"][1]["scores"]  # two different runs (else parity proves little)
    assert all(math.isfinite(rep["scores"][k]) for k in COLUMNS)
    saved = json.loads((linear["out"] / "merge_report.json").read_text())
    assert saved["columns"] == COLUMNS and saved["scores"] == rep["scores"]


def test_scoring_writes_nothing_into_the_runs(runs, linear):
    for name, before in linear["before"].items():
        assert files_of(runs[name]) == before, name
        assert (runs[name] / "completions" / "step_2.jsonl").exists()  # the run's own sample, untouched
    sample = [json.loads(line) for line in (linear["out"] / "completions.jsonl").read_text().splitlines()]
    assert len(sample) == 4 and set(sample[0]["rewards"]) == {"partial_credit", "exact_match", "vowels", "judge"}  # the merge's


def test_grpo_greedy_soup_by_eval_reward(runs, linear):
    from launch.merging.run import execute, prepare
    from trainers.errors import UserError

    inputs = [str(runs["grpo1"]), str(runs["grpo2"])]
    with pytest.raises(UserError) as e:  # GRPO's evaluation reports no loss
        prepare(merge_cfg(method="greedy_soup", inputs=inputs, metric="eval_loss", out=str(runs["root"] / "never")))
    assert "reports eval_reward, eval_exact_match" in str(e.value) and not (runs["root"] / "never").exists()
    # metric=null (the default, what merge.after_sweep=greedy_soup uses): grpo runs rank by eval_reward
    rep = execute(prepare(merge_cfg(method="greedy_soup", inputs=inputs, out=str(runs["root"] / "grpo-greedy"))))
    assert rep["metric"] == "eval_reward"
    first = {row["label"]: row["scores"]["eval_reward"] for row in linear["report"]["rows"][:2]}
    trace = rep["greedy"]
    assert [g["score"] for g in trace] == sorted(first.values(), reverse=True)  # best mean reward first
    assert trace[1]["kept"] == (trace[1]["soup_score"] > trace[0]["score"])
    if trace[1]["kept"]:  # the soup of both is the linear merge, scored alike
        assert trace[1]["soup_score"] == pytest.approx(linear["report"]["scores"]["eval_reward"], rel=1e-6)
    assert rep["scores"]["eval_reward"] == pytest.approx(max(trace[0]["score"], trace[1]["soup_score"]), rel=1e-6)


def test_rewards_checked_before_anything_is_scored(runs):
    """A grpo run's rewards are the scoring's: a reward model folder that is gone (or a module
    the merging process cannot import) is refused by prepare, before a model is loaded."""
    import yaml

    from launch.merging.run import prepare
    from trainers.errors import UserError

    cfg = yaml.safe_load((runs["grpo1"] / "config.yaml").read_text())
    cfg["objective"]["rewards"][-1]["model"] = str(runs["root"] / "judge-gone")
    moved = runs["root"] / "moved-config.yaml"
    moved.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError) as e:
        prepare(merge_cfg(method="linear", inputs=[str(runs["grpo1"]), str(runs["grpo2"])], eval_from=str(moved),
                          out=str(runs["root"] / "never")))
    assert "judge-gone" in str(e.value) and "config.json" in str(e.value)
