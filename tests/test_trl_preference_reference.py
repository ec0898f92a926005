"""The TRL reference harness builds TRL's trainers on the bundled preference data, and the
tokenization conventions written in its docstring are the ones TRL actually applies:
the ids `expected_tokens` derives from the chat template alone equal TRL's, row by row,
for every trainer. Then, on the bundled model, our per-sequence log-probs and losses equal
TRL's own loss on the first batch (SimPO and ORPO, where it is not trivially log 2 / 0.5
at the start). Builds trainers without training: a few seconds each."""
from __future__ import annotations

import pytest
import torch

from tests.trl_preference_reference import REPO, build_trainer, expected_tokens, read_jsonl, tokenized_rows
from trainers.objectives import preference as P

MODEL = REPO / "assets/tiny-llama"
PREF = REPO / "data/reverse_pref/train.jsonl"
KTO = REPO / "data/reverse_kto/train.jsonl"


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto"])
def test_trl_tokenization_is_the_documented_one(objective, tmp_path):
    rows = read_jsonl(KTO if objective == "kto" else PREF)[:8]
    trainer = build_trainer(MODEL, rows, objective, batch_size=4, steps=1, output_dir=tmp_path)
    got = tokenized_rows(trainer, objective)
    assert len(got) == len(rows)
    for i, (row, trl) in enumerate(zip(rows, got)):
        want = expected_tokens(trainer.processing_class, row)
        for key in want:
            assert trl[key] == want[key], (i, key, trl[key], want[key])
        if objective == "kto":
            chunk = 4 * (i // 4)
            neighbour = chunk + (i - chunk - 1) % 4  # rotation by one within each batch
            assert trl["kl_completion"] == got[neighbour]["completion"]
        if objective in ("simpo", "orpo"):
            assert trl["prompt_as_in_chosen"] == trl["prompt"]


def padded(seqs, masks, pad):
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, attn


def shift(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], P.IGNORE)], dim=1)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_first_batch_loss_from_our_functions_equals_trl(objective, tmp_path):
    rows = read_jsonl(PREF)[:4]
    trainer = build_trainer(MODEL, rows, objective, method="full", batch_size=4, steps=1, beta=0.1,
                            output_dir=tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)

        toks = [expected_tokens(trainer.processing_class, r) for r in rows]
        seqs = [t["prompt"] + t["chosen"] for t in toks] + [t["prompt"] + t["rejected"] for t in toks]
        comp = [[0] * len(t["prompt"]) + [1] * len(t["chosen"]) for t in toks]
        comp += [[0] * len(t["prompt"]) + [1] * len(t["rejected"]) for t in toks]
        ids, cmask, attn = padded(seqs, comp, trainer.processing_class.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        full = shift(ids.masked_fill(attn == 0, P.IGNORE))
        per_token = P.token_logps(logits, full)
        lp, n = P.masked_sums(per_token, shift(cmask.masked_fill(cmask == 0, P.IGNORE)) != P.IGNORE)
        if objective == "simpo":
            loss, sums = P.simpo_loss(lp[:4], n[:4], lp[4:], n[4:], beta=0.1, gamma=0.5)
        else:
            nll, nll_n = P.masked_sums(-per_token, full != P.IGNORE)
            loss, sums = P.orpo_loss(lp[:4], n[:4], lp[4:], n[4:], nll[:4],
                                     nll_tokens_per_pair=float(nll_n[:4].sum()) / 4, beta=0.1)
    assert abs(float(loss) / 4 - float(trl_loss)) < 1e-5 * max(1, abs(float(trl_loss)))
    for k, v in P.finalize_metrics(sums, 4).items():
        assert abs(v - trl_metrics[k]) < 1e-5 * max(1, abs(trl_metrics[k])), k


def test_kto_file_order_pairs_are_trls(tmp_path):
    """objective.kl_pairs=file_order (issue 25): every row's KL completion is the one TRL's
    KTOTrainer pairs it with (rotation by one within chunks of per_device_train_batch_size
    rows in file order; 10 rows in chunks of 4, so the last chunk has 2), for the rows of
    every step of a shuffled run; the default, `batch`, pairs within the step's batch instead."""
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from trainers.data.sources import training_batches
    from trainers.model.load import load_tokenizer

    rows = read_jsonl(KTO)[:10]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(KTO.read_text().splitlines(keepends=True)[:10]))
    trl = tokenized_rows(build_trainer(MODEL, rows, "kto", batch_size=4, steps=1, output_dir=tmp_path / "trl"), "kto")
    register_resolvers()
    differ = 0
    for order in ("file_order", "batch"):
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            cfg = finalize(compose("config", overrides=[
                "objective=kto", "data=reverse_kto", f"data.train={data}", f"model.path={MODEL}",
                "train.micro_batch_size=4", "train.grad_accum=2", f"objective.kl_pairs={order}"]), str(tmp_path / order))
        batches, _ = training_batches(cfg, load_tokenizer(cfg.model), 1)
        assert batches.sources[0].store.rows.tolist() == list(range(1, 11))  # row r is the file's line r + 1
        for step in range(5):  # 8 rows a step: every row, several times, in shuffled batches
            for (_, r), (_, p) in batches.kl_pairs(step):
                if order == "file_order":
                    assert trl[r]["kl_completion"] == trl[p]["completion"], (step, r, p)
                else:
                    differ += trl[r]["kl_completion"] != trl[p]["completion"]
    assert differ > 0
