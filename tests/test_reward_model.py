"""objective=reward (issue 22): a reward model on the bundled preference pairs.

- TRL parity: the same pairs and the same initial weights (our fresh score head and LoRA
  adapter, loaded into TRL's model) give our loop's first-step loss, accuracy and margin
  equal to TRL 1.16's RewardTrainer, with LoRA (pairs with a `margin` column) and with full
  fine-tuning (with center_rewards_coefficient), so both optional terms are covered. Both sides run in this process.
- A short run's export loads with AutoModelForSequenceClassification and scores the
  held-out pairs exactly as the run's last evaluation did (accuracy and margin).
- The pipeline plan refuses objective=reward before launch.
The plans (ddp, fsdp2, zero2 against the single process) are in tests/test_reward_plans.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.trl_preference_reference import REPO, read_jsonl, rows_in_our_order

MODEL = REPO / "assets/tiny-llama"
PREF = REPO / "data/reverse_pref"
ROWS, BATCH, EVAL_ROWS = 8, 4, 24


def assert_export_scores_like_last_eval(run_dir, held_out) -> None:
    """export/merged loads with AutoModelForSequenceClassification (what a GRPO run's
    `objective.rewards=[{model: PATH}]` loads) and, scoring each held-out pair one
    sequence at a time as TRL tokenizes it, gives the run's last eval_accuracy and eval_margin."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.helpers import metrics

    merged = run_dir / "export" / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.config.num_labels == 1
    diffs = []
    with torch.no_grad():
        for row in read_jsonl(held_out):
            r = [model(input_ids=torch.tensor([tok.apply_chat_template(row["prompt"] + row[k], tokenize=True,
                                                                       return_dict=True)["input_ids"]])).logits[0, 0]
                 for k in ("chosen", "rejected")]
            diffs.append(float(r[0] - r[1]))
    last = [r for r in metrics(run_dir) if "eval_accuracy" in r][-1]
    assert sum(d > 0 for d in diffs) / len(diffs) == last["eval_accuracy"]
    assert sum(diffs) / len(diffs) == pytest.approx(last["eval_margin"], rel=1e-4, abs=1e-6)


def our_cfg(run_dir, train_file, *extra):
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers

    register_resolvers()
    overrides = ["objective=reward", "data=reverse_pref", f"data.train={train_file}", f"model.path={MODEL}",
                 "train.max_steps=1", f"train.micro_batch_size={BATCH}", "train.grad_accum=1",
                 "train.save_every=1000", "train.eval_every=1000", "train.precision=fp32", *extra]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return finalize(compose("config", overrides=overrides), str(run_dir))


def initial_trainable(cfg) -> dict[str, torch.Tensor]:
    """Our initial trainable weights (the loop's ModelSource: fresh score head, adapter)."""
    from trainers.model.load import ModelSource
    from trainers.rng import seed_everything

    seed_everything(cfg.seed)
    model = ModelSource(cfg.model, cfg.method, torch.float32, cfg.seed, cfg.train, head="score").whole(
        torch.device("cpu"))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trl_first_step(rows, method: str, init: dict, cfg, center) -> dict:
    """TRL's RewardTrainer on `rows` (one batch), starting from `init`: its step-1 logs."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    torch.use_deterministic_algorithms(False)
    peft = None
    if method == "lora":
        m = cfg.method
        peft = LoraConfig(task_type="SEQ_CLS", r=m.r, lora_alpha=m.alpha, lora_dropout=0.0,
                          target_modules=m.target_modules)
    args = RewardConfig(output_dir=str(cfg.run_dir) + "-trl", per_device_train_batch_size=len(rows), max_steps=1,
                        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                        bf16=False, fp16=False, train_sampling_strategy="sequential", disable_dropout=True,
                        center_rewards_coefficient=center, model_init_kwargs={"dtype": torch.float32})
    trainer = RewardTrainer(model=str(MODEL), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(MODEL), peft_config=peft)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(params) == set(init), sorted(set(params) ^ set(init))[:4]
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    records: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                records.append(dict(logs))

    trainer.add_callback(Record())
    trainer.train()
    return records[0]


@pytest.mark.parametrize("method,center,margin", [("lora", None, True), ("full", 0.01, False)])
def test_first_step_loss_and_accuracy_equal_trl(tmp_path, method, center, margin):
    from parallel import build_plan
    from tests.helpers import metrics
    from trainers.loop import train

    data, held_out = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    pairs = read_jsonl(PREF / "train.jsonl")[:ROWS]
    if margin:  # TRL's optional column: -logsigmoid(r_c - r_r - margin)
        pairs = [{**row, "margin": 0.5 * (i % 3)} for i, row in enumerate(pairs)]
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    held_out.write_text("".join((PREF / "eval.jsonl").read_text().splitlines(keepends=True)[:EVAL_ROWS]))
    extra = [f"method={method}", f"data.eval={held_out}"] + (["method.dropout=0"] if method == "lora" else ["data.packing=false"])
    extra += [f"objective.center_rewards_coefficient={center}"] if center else []
    cfg = our_cfg(tmp_path / "ours", data, *extra)
    trl = trl_first_step(rows_in_our_order(cfg, 1), method, initial_trainable(cfg), cfg, center)
    train(cfg, build_plan)
    ours = next(r for r in metrics(tmp_path / "ours") if "loss" in r)
    for key in ("loss", "accuracy", "margin"):
        assert abs(ours[key] - trl[key]) <= 1e-5 * max(1.0, abs(trl[key])), (method, key, ours[key], trl[key])
    assert_export_scores_like_last_eval(tmp_path / "ours", held_out)
    print(f"reward/{method}: loss ours {ours['loss']:.7f} TRL {trl['loss']:.7f}, accuracy {ours['accuracy']} / "
          f"{trl['accuracy']}, margin {ours['margin']:.6g} / {trl['margin']:.6g}")


def test_bad_reward_settings_and_the_pipeline_are_refused_before_launch(tmp_path):
    from tests.helpers import refused

    text = refused(tmp_path / "a", "objective=reward", "data=reverse_pref", "objective.center_rewards_coefficient=-1")
    assert "objective.center_rewards_coefficient=-1" in text
    text = refused(tmp_path / "b", "objective=reward", "data=reverse_pref", "parallel=pipeline",
                   "launcher.nproc_per_node=2")
    assert "objective=reward is not trained by the pipeline" in text
    text = refused(tmp_path / "c", "objective=reward", "data=reverse")  # chat rows: no pairs to compare
    assert "(objective=dpo, ipo, simpo, orpo, reward)" in text
