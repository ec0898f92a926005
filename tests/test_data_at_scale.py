"""The token cache through the real CLI: the launcher tokenizes, the 2 workers only open
the cache, a later run reuses it; a weighted mixture and named eval sets are reported
in the metrics (2 processes: slow; both launches in one launcher process,
helpers.launch_many); NEFTune perturbs training forwards only (in-process)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import FAST, REPO, launch_many, metrics
from trainers.data.neftune import add_neftune


@pytest.mark.slow
def test_launcher_tokenizes_once_workers_open_mixture_and_eval_sets_reported(tmp_path, tiny_model):
    cache = tmp_path / "cache"
    task, replay = REPO / "data/reverse/train.jsonl", REPO / "data/reverse/train_prompt_completion.jsonl"
    evals = json.dumps({"held": str(REPO / "data/reverse/eval.jsonl"), "pc": str(replay)}).replace('"', "")
    mixture = f"[{{path: {task}, weight: 0.75, name: task}}, {{path: {replay}, weight: 0.25, name: replay}}]"
    common = [f"model.path={tiny_model}", *FAST, "parallel=ddp", "launcher.nproc_per_node=2",
              "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=4", "train.eval_every=2",
              "train.neftune_alpha=5", f"data.cache_dir={cache}", f"data.train={mixture}", f"data.eval={evals}"]
    # the second launch: another run on the same files
    first, second = launch_many(tmp_path / "launches", {"first": (tmp_path / "a", common),
                                                        "second": (tmp_path / "b", [*common, "train.max_steps=1"])}).values()
    out = first.stdout + first.stderr
    tokenized = [line for line in out.splitlines() if "data: tokenized" in line]
    assert len(tokenized) == 4, out  # 2 training sources + 1 eval-only file + the forgetting probe, once each
    assert not any("[rank" in line for line in tokenized), "a worker tokenized"
    rows = metrics(tmp_path / "a")
    steps = [r for r in rows if "loss" in r]
    # 8 rows per step: 6 from the task, 2 from the replay set (75 % / 25 %), every step
    assert all(r["tokens/task"] > 0 and r["tokens/replay"] > 0 and 0 <= r["padding_fraction"] < 0.5 for r in steps)
    assert sum(r["tokens/task"] + r["tokens/replay"] for r in steps) == sum(r["tokens"] for r in steps)
    evals_logged = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals_logged] == [0, 2, 4]
    for r in evals_logged:  # each set scored on its own; the unsuffixed keys are the first set's
        assert r["eval_loss"] == r["eval_loss/held"] != r["eval_loss/pc"], r
        assert r["eval_exact_match"] == r["eval_exact_match/held"], r
        # a random-init model reproduces no reversal (nan would mean no rows were generated)
        assert r["eval_exact_match/pc"] == r["eval_exact_match/held"] == 0.0, r
    # the pc set is the replay source: 4 steps of training on it lower its loss
    assert evals_logged[-1]["eval_loss/pc"] < evals_logged[0]["eval_loss/pc"], evals_logged
    # Another run on the same files: nothing is tokenized again.
    again = second.stdout + second.stderr
    assert "data: tokenized" not in again
    launcher = [line for line in again.splitlines() if "data ok: " in line]  # the launcher's report, per source
    assert len(launcher) == 5 and all(line.endswith("(cached)") for line in launcher), again  # + the probe
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4


@pytest.mark.parametrize("alpha", [5.0])
def test_neftune_noise_in_training_forwards_only(tiny_model, alpha):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    emb = model.get_input_embeddings()
    ids = torch.arange(12)[None]
    clean = emb(ids).detach()
    add_neftune(model, alpha)
    model.eval()
    torch.testing.assert_close(emb(ids), clean)
    model.train()
    noisy = emb(ids).detach()
    bound = alpha / (ids.shape[1] * clean.shape[-1]) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound + 1e-6
