"""objective=grpo through the launcher: a user's reward module from outside the project,
exact resume after a kill, every data-parallel plan against one process, and bad input.

The runs share one job shape (tests build a random-init tiny Llama, which writes random
characters; the user's reward pays for lowercase letters, which LoRA learns to write more of
within a few steps at a high lr): 1 prompt x 4 completions per step of at most 8 tokens, on
prompts the project never saw, with an extra `topic` column the reward checks it receives.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, kill_once_committed, launch, metrics, refused, start, summary

USER_REWARD = '''
def letters(prompts, completions, completion_ids, topic, trainer_state, **kwargs):
    """The share of lowercase letters in each completion (a user's reward, TRL's signature)."""
    assert len(topic) == len(completions) and trainer_state.global_step >= 0
    texts = [c[-1]["content"] for c in completions]  # chat prompts: each completion is [assistant message]
    return [sum(ch in "abcdefghijklmnopqrstuvwxyz" for ch in t) / max(len(t), 1) for t in texts]


def wrong_count(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_a_number(completions, **kwargs):
    return ["high"] * len(completions)


def raises(completions, **kwargs):
    raise KeyError("answer")
'''


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the project with the user's reward module and prompt files."""
    root = tmp_path_factory.mktemp("outside")
    (root / "user_rewards.py").write_text(USER_REWARD)
    rng = random.Random(7)
    for name, n in (("train", 64), ("eval", 8)):
        rows = [{"prompt": [{"role": "user", "content": "Say a word like " + "".join(
            rng.choice("bcdfg") for _ in range(5))}], "topic": f"t{i}"} for i in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def job(tiny_model, outside: Path, *extra: str) -> list[str]:
    return [f"model.path={tiny_model}", "objective=grpo", f"data.train={outside / 'train.jsonl'}",
            f"data.eval={outside / 'eval.jsonl'}", "data.metric_rows=4", "method.dropout=0",
            "objective.num_generations=4", "objective.max_completion_length=8",
            "objective.rewards=[{fn: user_rewards:letters}]", "train.micro_batch_size=4", "train.grad_accum=1",
            "optim.lr=2e-2", "optim.warmup_steps=0", "optim.schedule=constant", *extra]


def user_env(outside: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(outside), os.environ.get("PYTHONPATH", "")])}


def train_in_process(overrides: list[str], run_dir: Path):
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from parallel import build_plan
    from trainers.loop import train

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return train(finalize(compose("config", overrides=overrides), str(run_dir)), build_plan)


@pytest.mark.slow
def test_user_reward_rises_and_kill_relaunch_resumes_exactly(tmp_path, tiny_model, outside, monkeypatch):
    """The uninterrupted run (in this process) trains on the user's reward, which rises; the
    same job launched, SIGKILLed after its first checkpoint and relaunched ends with the same
    per-step losses, rewards and held-out reward (completions are drawn from generators
    seeded by (seed, step, position), so the relaunch draws what the first launch drew)."""
    monkeypatch.syspath_prepend(str(outside))
    args = job(tiny_model, outside, "train.max_steps=12", "train.save_every=4", "train.eval_every=1000")
    ref = tmp_path / "ref"
    train_in_process(args, ref)
    want = [r for r in metrics(ref) if "loss" in r]
    early, late = [r["reward"] for r in want[:4]], [r["reward"] for r in want[-4:]]
    assert sum(late) / 4 > sum(early) / 4 + 0.1, (early, late)
    evals = [r["eval_reward"] for r in metrics(ref) if "eval_reward" in r]
    assert evals[-1] > evals[0], evals
    assert (ref / "completions" / "step_0.jsonl").exists() and (ref / "completions" / "step_12.jsonl").exists()

    run = tmp_path / "run"
    proc = start(run, *args, env=user_env(outside))
    assert kill_once_committed(proc, run) >= 4
    assert not (run / "summary.json").exists()
    launch(*args, f"hydra.run.dir={run}", env=user_env(outside))
    got = {r["step"]: r for r in metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, 13))
    for r in want:
        for k in ("loss", "reward", "grad_norm"):
            assert abs(got[r["step"]][k] - r[k]) <= 1e-6 * max(abs(r[k]), 1e-3), (r["step"], k, got[r["step"]], r)
    assert summary(run)["status"] == "completed"
    assert summary(run)["final_eval_reward"] == pytest.approx(summary(ref)["final_eval_reward"], rel=1e-6)


@pytest.mark.slow
def test_kill_inside_a_generation_resumes_on_the_stored_rollout(tmp_path, tiny_model, outside, monkeypatch):
    """num_iterations=2 and a checkpoint at step 3: the kill lands between the two steps of
    the generation drawn at step 3, so the relaunch must train step 4 on that generation's
    completions, advantages and old log-probs as the checkpoint holds them (objective/
    rank0.pt); regenerating them with step 3's weights gives other old log-probs (and
    other completions), so another loss."""
    monkeypatch.syspath_prepend(str(outside))
    args = job(tiny_model, outside, "train.max_steps=6", "train.save_every=3", "train.eval_every=1000",
               "data.eval=null", "objective.num_iterations=2")
    ref = tmp_path / "ref"
    train_in_process(args, ref)
    want = {r["step"]: r for r in metrics(ref) if "loss" in r}
    assert want[3]["reward"] == want[4]["reward"] and want[4]["clip_ratio/region_mean"] >= 0  # one generation

    run = tmp_path / "run"
    proc = start(run, *args, env=user_env(outside))
    assert kill_once_committed(proc, run) == 3
    assert (run / "checkpoints" / "step_3" / "objective" / "rank0.pt").exists()
    launch(*args, f"hydra.run.dir={run}", env=user_env(outside))
    got = {r["step"]: r for r in metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, 7)), sorted(got)
    for s in range(1, 7):
        for k in ("loss", "reward", "grad_norm", "clip_ratio/region_mean"):
            assert abs(got[s][k] - want[s][k]) <= 1e-6 * max(abs(want[s][k]), 1e-3), (s, k, got[s], want[s])


PLANS = ("ddp", "zero2", "zero3", "fsdp2")


@pytest.mark.slow
def test_grpo_under_every_plan_equals_one_process(tmp_path, tiny_model, outside, monkeypatch):
    """2 processes x 4 completions (one prompt each) under ddp, zero2, zero3 and fsdp2 train
    exactly like one process with 2 accumulation steps of 4: same completions (seeded per
    position in the global batch), same per-step loss, reward and grad norm."""
    from tests.matrix_worker import cell_dir

    common = [o for o in job(tiny_model, outside, "train.max_steps=3", "train.save_every=1000",
                             "train.eval_every=1000", "data.eval=null")
              if not o.startswith(("model.path", "train.grad_accum", "method.dropout"))]
    cells = ["|".join([f"{plan}:lora", *common]) for plan in PLANS]
    out = tmp_path / "runs"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", **user_env(outside))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "matrix_worker.py"), str(out), str(tiny_model), str(outside / "train.jsonl"), *cells],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    failed = {c: r for c, r in results.items() if r["status"] != "completed"}
    assert not failed, "\n\n".join(f"{c}: {r['error']}" for c, r in failed.items())
    monkeypatch.syspath_prepend(str(outside))
    ref_dir = tmp_path / "single"
    train_in_process(job(tiny_model, outside, "train.max_steps=3", "train.save_every=1000", "data.eval=null",
                         "train.grad_accum=2"), ref_dir)
    ref = {r["step"]: r for r in metrics(ref_dir) if "loss" in r}
    assert len({round(r["loss"], 6) for r in ref.values()}) > 1, ref
    for cell in cells:
        got = {r["step"]: r for r in metrics(out / cell_dir(cell)) if "loss" in r}
        assert sorted(got) == sorted(ref) == [1, 2, 3], cell
        for s in ref:
            for k, tol in (("loss", 1e-4), ("reward", 1e-6), ("grad_norm", 1e-4), ("entropy", 1e-4)):
                assert abs(got[s][k] - ref[s][k]) <= tol * max(abs(ref[s][k]), 1e-2), (cell, s, k, got[s], ref[s])
    print({c: r["seconds"] for c, r in results.items()})


def test_bad_rewards_and_plans_are_refused_before_launch(tmp_path, outside):
    text = refused(tmp_path / "a", "objective=grpo", "data=reverse_rl", "objective.rewards=[{fn: no_such_module:f}]")
    assert "no_such_module:f" in text and "cannot be imported" in text
    text = refused(tmp_path / "b", "objective=grpo", "data=reverse_rl", "parallel=pipeline",
                   "launcher.nproc_per_node=2")
    assert "parallel=none, ddp, zero1, zero2, zero3 or fsdp2" in text
    text = refused(tmp_path / "c", "objective=grpo", "data=reverse_rl", "objective.loss_type=ppo")
    assert "ppo" in text and "dapo, grpo, dr_grpo, bnpo" in text
    text = refused(tmp_path / "d", "objective=grpo", "data=reverse_rl", "method=full", "objective.beta=0.04")
    assert "method=full" in text and "objective.beta=0" in text
    text = refused(tmp_path / "e", "objective=grpo", "data=reverse_rl", "train.micro_batch_size=3",
                   "train.grad_accum=1")
    assert "multiple of objective.num_generations=8" in text


@pytest.mark.parametrize("fn,says", [("wrong_count", "returned 3 values for 4 completions"),
                                     ("not_a_number", "returned 'high' for completion 0"),
                                     ("raises", "raised KeyError")])
def test_bad_reward_output_stops_the_first_step(tmp_path, tiny_model, outside, monkeypatch, fn, says):
    from trainers.errors import TrainingError

    monkeypatch.syspath_prepend(str(outside))
    args = job(tiny_model, outside, "train.max_steps=2", "data.eval=null",
               f"objective.rewards=[{{fn: user_rewards:{fn}}}]")
    with pytest.raises(TrainingError) as e:
        train_in_process(args, tmp_path / "run")
    assert f"'{fn}'" in str(e.value) and says in str(e.value) and "step 1" in str(e.value), str(e.value)
    if fn != "wrong_count":
        assert "/train:" in str(e.value)  # names the data row
    assert summary(tmp_path / "run")["status"] == "failed"
