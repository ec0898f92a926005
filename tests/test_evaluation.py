"""Before/best/final, the best checkpoint, early stopping, forgetting alarms, throughput
and readable log lines, on one real overfitting run: LoRA at lr 1e-2 on two training rows,
scored on eight held-out rows of the same task and eight rows of the general probe. The
held-out loss falls to its best at step 4 and turns up as the two rows are memorised;
the general probe's loss rises from the first steps (forgetting)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, compose, launch, launch_in_process, metrics, summary


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("overfit")
    lines = (REPO / "data/reverse/train.jsonl").read_text().splitlines()
    (tmp / "two.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp / "held.jsonl").write_text("\n".join((REPO / "data/reverse/eval.jsonl").read_text().splitlines()[:8]) + "\n")
    (tmp / "probe.jsonl").write_text("\n".join((REPO / "data/probes/general.jsonl").read_text().splitlines()[:8]) + "\n")
    run = tmp / "run"
    proc = launch(*overfit_overrides(tmp, run))
    return run, proc.stderr


def overfit_overrides(tmp: Path, run: Path) -> list[str]:
    return [
        f"hydra.run.dir={run}", f"data.train={tmp / 'two.jsonl'}", f"data.eval={{held: {tmp / 'held.jsonl'}}}",
        f"eval.probes={{general: {tmp / 'probe.jsonl'}}}", "data.packing=false", "data.metric_rows=4",
        "train.max_steps=16", "train.eval_every=2", "train.save_every=1000", "train.micro_batch_size=2",
        "train.grad_accum=1", "optim.lr=1e-2", "method.dropout=0", "train.early_stopping_patience=2",
        "train.export_from=best", "eval.forgetting_alarm=0.5", "train.peak_tflops=0.01",
        "eval.harness.tasks=[reverse_choice]", "eval.harness.limit=20",
    ]


def test_before_best_final_per_set_and_metric(overfit_run):
    run, _ = overfit_run
    s, evals = summary(run), [r for r in metrics(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
    held = s["evals"]["held"]["loss"]
    losses = {r["step"]: r["eval_loss/held"] for r in evals}
    assert held["before"] == losses[0] and held["final"] == losses[8]
    assert held["best_step"] == 4 and held["best"] == min(v for k, v in losses.items() if k > 0)
    assert held["delta"] == pytest.approx(losses[8] - losses[0])
    assert set(s["evals"]) == {"held", "general"} and set(s["evals"]["held"]) == {"loss", "exact_match"}
    assert set(s["evals"]["general"]) == {"loss"}  # a probe: scored by loss only


def test_early_stopping_keeps_and_exports_the_best_checkpoint(overfit_run):
    run, _ = overfit_run
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == 8
    assert s["best"]["step"] == 4 and "early stopping" in s["stop_reason"] and "patience=2" in s["stop_reason"]
    assert s["exported_from"] == "best (step 4)"
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "best/trainer_state.json").read_text())["step"] == 4
    assert not (ckpts / "step_2").exists()  # rotated out (keep_last=2)...
    assert (ckpts / "step_4").exists() and (ckpts / "step_8").exists()
    # ...and the export holds the best checkpoint's adapter, not the last one's
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def tensors(ckpt: Path) -> list[torch.Tensor]:
        out = run / f"{ckpt.name}.pt"
        dcp_to_torch_save(ckpt / "state", out)
        flat, stack = [], [torch.load(out, weights_only=True)]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack += list(x.values())
            elif isinstance(x, torch.Tensor):
                flat.append(x)
        return flat

    exported = list(load_file(run / "export/adapter/adapter_model.safetensors").values())
    best, last = tensors(ckpts / "best"), tensors(ckpts / "step_8")
    assert all(any(t.shape == b.shape and torch.equal(t, b) for b in best) for t in exported)
    assert not all(any(t.shape == b.shape and torch.equal(t, b) for b in last) for t in exported)


def test_forgetting_alarm_warns_and_is_recorded(overfit_run):
    run, stderr = overfit_run
    alarms = summary(run)["forgetting"]
    assert [a["set"] for a in alarms] == ["general"] * len(alarms) and alarms[0]["rise"] > 0.5
    assert re.search(r"forgetting: general loss \S+ at step \d+ is \d+% above", stderr)


def test_throughput_and_short_log_lines(overfit_run):
    run, stderr = overfit_run
    steps = [r for r in metrics(run) if "loss" in r]
    for r in steps:
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.01)
    line = next(x for x in stderr.splitlines() if " step=1 loss=" in x)
    assert re.search(r" loss=\d\.\d{3} ", line) or re.search(r" loss=\d\d\.\d\d ", line), line
    assert len(repr(steps[0]["loss"])) > 8  # metrics.jsonl keeps full precision


def test_mfu_is_left_out_on_cpu_without_a_peak():
    from trainers.metrics.throughput import Throughput

    cfg = compose()
    speed = Throughput(cfg, torch.device("cpu"), 969_344, 1).of(1000.0, 0.5)
    assert set(speed) == {"tokens_per_s", "tflops"}
    # torchtitan's count for the bundled model: 6 x non-embedding params + 12 L H Q T
    assert speed["tflops"] == pytest.approx((6 * (969_344 - 102 * 128) + 12 * 4 * 4 * 32 * 64) * 2000 / 1e12)


def test_the_general_probe_ships_and_is_on_by_default():
    from trainers.data.sources import parse_sources

    cfg = compose()
    assert [s.name for s in parse_sources(cfg.eval.probes, "eval.probes")] == ["general"]
    corpus = set((REPO / "data/corpus/pretrain.txt").read_text().splitlines())
    rows = [json.loads(x) for x in (REPO / "data/probes/general.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and not any(r["prompt"] + r["completion"] in corpus for r in rows)


@pytest.mark.parametrize("override, message", [
    ("train.best_mode=up", "train.best_mode='up' is not accepted"),
    ("train.best_metric=nowhere/loss", "train.best_metric='nowhere/loss' names no eval set"),
    ("train.export_from=first", "train.export_from='first' is not accepted"),
    ("train.early_stopping_patience=0", "train.early_stopping_patience=0 must be a positive"),
    ("eval.forgetting_alarm=-1", "eval.forgetting_alarm=-1 must be a relative rise"),
    ("eval.forgetting_action=panic", "eval.forgetting_action='panic' is not accepted"),
    ("train.report_to=[neptune]", "train.report_to='neptune' is not accepted"),
])
def test_bad_settings_are_refused_before_launch(tmp_path, override, message):
    proc = launch_in_process(tmp_path, override)
    assert proc.returncode == 2 and message in proc.stderr and not proc.calls


def test_dry_run_prints_a_training_row_with_its_loss_mask(tmp_path):
    proc = launch_in_process(tmp_path, "dry_run=true")
    assert proc.returncode == 0
    assert "first training row of" in proc.stdout
    assert "<|assistant|>[[nxohpt<|end|>]]" in proc.stdout  # only the answer (and its end) is trained


def test_harness_task_runs_after_training_on_the_export(overfit_run):
    """eval.harness.tasks: lm-evaluation-harness scores export/merged on the shipped local
    task (no network); results land in harness.json and summary.json."""
    run, _ = overfit_run
    harness = json.loads((run / "harness.json").read_text())
    assert harness["model_args"] == {"pretrained": str(run / "export/merged")} and harness["limit"] == 20
    acc = summary(run)["harness"]["reverse_choice"]["acc,none"]
    assert acc == harness["results"]["reverse_choice"]["acc,none"] and 0 <= acc <= 1


def test_evaluate_command_line_refuses_a_run_without_export(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "launch.evaluate", str(tmp_path), "tasks=[reverse_choice]"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "has no export to score" in out.stderr


def test_the_judge_resumes_with_its_before_values_best_and_patience():
    """The judge's state rides in each checkpoint's trainer_state.json (JSON): a judge
    rebuilt from it after a resume reaches the same stop as one that never stopped."""
    from trainers.evaluation.judge import EvalJudge

    cfg = compose("train.early_stopping_patience=2", "eval.forgetting_alarm=0.5")
    losses = {0: (7.0, 0.25), 2: (4.0, 0.26), 4: (3.0, 0.3), 6: (3.5, 0.5), 8: (3.9, 0.9)}

    def scores(step):
        return {"held": {"loss": losses[step][0]}, "general": {"loss": losses[step][1]}}

    whole = EvalJudge(cfg.train, cfg.eval, ["held", "general"], False)
    for s in losses:
        whole.observe(s, scores(s))
    first = EvalJudge(cfg.train, cfg.eval, ["held", "general"], False)
    for s in (0, 2, 4):
        first.observe(s, scores(s))
    resumed = EvalJudge(cfg.train, cfg.eval, ["held", "general"], False)
    resumed.load_state(json.loads(json.dumps(first.state())))
    for s in (6, 8):
        resumed.observe(s, scores(s))
    assert resumed.summary() == whole.summary()
    assert whole.best == (3.0, 4) and "did not improve for 2 evals" in whole.stop_reason
    assert whole.table()["held"]["loss"] == {"before": 7.0, "best": 3.0, "best_step": 4, "final": 3.9,
                                            "delta": pytest.approx(-3.1)}
    assert [a["step"] for a in whole.alarms] == [6, 8]  # general 0.5 and 0.9: more than 50 % above 0.25


def test_relaunching_an_early_stopped_run_trains_no_further(overfit_run):
    """(Last in this file: it rewrites the shared run's summary.) The stop reason is in the
    judge's state in the last checkpoint, so a relaunch exports again and stops."""
    run, _ = overfit_run
    launch(*overfit_overrides(run.parent, run))
    s = summary(run)
    assert s["final_step"] == 8 and "early stopping" in s["stop_reason"] and s["exported_from"] == "best (step 4)"
    assert max(r["step"] for r in metrics(run) if "loss" in r) == 8
