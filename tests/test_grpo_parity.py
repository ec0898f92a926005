"""objective=grpo against TRL 1.16's GRPOTrainer, in this process, number for number.

Both sides start from the same LoRA model (built by the launcher's ModelSource from the
bundled tiny model, method.dropout=0), train 2 steps on the same 2 prompts x 4 generations
with the same injected completions (sampling differs between the two, so generation is
replaced on both sides by a table: the j-th generation of a prompt is always the same
text), the same reward (the built-in partial credit), AdamW at a constant lr, one
micro-batch per step. Per step the loss, reward, reward_std, clip_ratio/region_mean (and
kl, entropy) and every completion's advantage agree within 1e-4 relative, for every
loss_type, beta 0 and 0.04, num_iterations 1 and 2 (with 2, step 2 reuses step 1's
completions against the old log-probs, so its ratios move off 1 and clipping can occur).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, compose, metrics

ANSWERS = ["gfedcba", "mlkjihgf"]  # reversals of the 2 prompts' strings
G = 4


def completions_for(answer: str) -> list[str]:
    """4 distinct completions with different partial credit (so groups have a std)."""
    return [answer, answer[:-2] + "zz", answer[::-1], answer[:3]]


def prompt_rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Reverse: {a[::-1]}"}], "answer": a} for a in ANSWERS]


def base_overrides(tiny_model, data: Path, loss_type: str, beta: float, iters: int) -> list[str]:
    return [f"model.path={tiny_model}", "objective=grpo", f"data.train={data}", "data.eval=null",
            "method.dropout=0", "train.max_steps=2", "train.micro_batch_size=8", "train.grad_accum=1",
            "train.save_every=1000", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.05",
            f"objective.num_generations={G}", "objective.max_completion_length=12",
            f"objective.loss_type={loss_type}", f"objective.beta={beta}", f"objective.num_iterations={iters}",
            "objective.rewards=[{fn: trainers.objectives.reverse_rewards:partial_credit}]",
            "train.precision=fp32"]


class Table:
    """The injected generations: prompt token ids -> its completions' token ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.by_prompt = {}
        for row in prompt_rows():
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            self.by_prompt[ids] = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                   for c in completions_for(row["answer"])]

    def __call__(self, prompts) -> list[list[int]]:
        seen: dict = {}
        out = []
        for p in prompts:
            key = tuple(int(x) for x in p)
            j = seen.get(key, 0)
            seen[key] = j + 1
            out.append(list(self.by_prompt[key][j % G]))
        return out


def ours(tmp_path, tiny_model, data, overrides, table, monkeypatch):
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from parallel import build_plan
    from trainers.loop import train
    from trainers.objectives import grpo, rollout

    monkeypatch.setattr(rollout, "generate", lambda plan, tok, prompts, *a, copies=1, **k:
                        table([p for p in prompts for _ in range(copies)]))
    advantages = []
    built = grpo.GRPO.score_and_build

    def record(self, per_func, prompt_ids, completion_ids, tok, *a, **k):
        out = built(self, per_func, prompt_ids, completion_ids, tok, *a, **k)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        advantages.append(dict(zip(texts, self.last_advantages.tolist())))
        return out

    monkeypatch.setattr(grpo.GRPO, "score_and_build", record)
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = finalize(compose("config", overrides=overrides), str(tmp_path / "ours"))
    train(cfg, build_plan)
    return cfg, [r for r in metrics(tmp_path / "ours") if "loss" in r], advantages


def trl_run(tmp_path, cfg, table, loss_type, beta, iters):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trainers.model.load import ModelSource, load_tokenizer
    from trainers.objectives.reverse_rewards import partial_credit
    from trainers.rng import seed_everything

    seed_everything(cfg.seed)
    model = ModelSource(cfg.model, cfg.method, torch.float32, cfg.seed, cfg.train).whole(torch.device("cpu"))
    tok = load_tokenizer(cfg.model)
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2 * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=12, learning_rate=0.05, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=2, beta=beta, loss_type=loss_type, num_iterations=iters, logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_grad_norm=1.0, weight_decay=0.0,
        seed=cfg.seed, optim="adamw_torch", log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[partial_credit], args=args,
                          train_dataset=Dataset.from_list(prompt_rows()), processing_class=tok)
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: (table(prompt_ids), None)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in trainer._logs["completion"]]
    adv = dict(zip(texts, trainer._logs["advantages"]))
    return logs, adv


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1e-3)


CASES = [(lt, beta, iters) for lt in ("dapo", "grpo", "dr_grpo", "bnpo") for beta in (0.0, 0.04) for iters in (1, 2)]


@pytest.mark.parametrize("loss_type,beta,iters", CASES, ids=[f"{a}-beta{b}-it{c}" for a, b, c in CASES])
def test_grpo_equals_trl(tmp_path, tiny_model, monkeypatch, loss_type, beta, iters):
    from trainers.model.load import load_tokenizer

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    overrides = base_overrides(tiny_model, data, loss_type, beta, iters)
    cfg, got, our_adv = ours(tmp_path, tiny_model, data, overrides, Table(load_tokenizer(compose(*overrides).model)),
                             monkeypatch)
    want, trl_adv = trl_run(tmp_path, cfg, Table(load_tokenizer(cfg.model)), loss_type, beta, iters)
    assert [r["step"] for r in got] == [1, 2] and len(want) == 2, (got, want)
    keys = ["loss", "reward", "reward_std", "clip_ratio/region_mean", "entropy"] + (["kl"] if beta else [])
    for ours_row, trl_row in zip(got, want):
        for k in (k for k in keys if k in trl_row):  # TRL logs reward metrics at generation steps only
            assert close(ours_row[k], trl_row[k]), (k, ours_row[k], trl_row[k],
                                                    str({q: (ours_row.get(q), trl_row.get(q)) for q in keys}))
    assert all(k in want[0] for k in keys)
    assert got[0]["reward_std"] > 0.1 and got[0]["grad_norm"] > 1e-3, got[0]  # a real signal
    print(loss_type, beta, iters, [(r["loss"], r["clip_ratio/region_mean"]) for r in got],
          [(r["loss"], r["clip_ratio/region_mean"]) for r in want])
    assert set(our_adv[0]) == set(trl_adv) and len(trl_adv) == 2 * G
    for text, a in trl_adv.items():
        assert close(our_adv[0][text], a), (text, our_adv[0][text], a)
    if iters == 2:  # step 2 trains on step 1's completions against the old log-probs
        assert len(our_adv) == 1
        assert got[1]["loss"] != got[0]["loss"]
