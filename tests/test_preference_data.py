"""Preference and KTO rows in the data layer, in-process: the token cache holds exactly the
ids TRL's trainers train on (conversational and plain-text rows, each trainer's
conventions), bad pairs stop with file and row or are skipped and counted, rows of the
wrong kind for the objective stop before launch, and the objective settings are checked
before launch."""
from __future__ import annotations


import pytest
from transformers import AutoTokenizer

from tests.trl_preference_reference import REPO, build_trainer, expected_tokens, read_jsonl, tokenized_rows
from trainers.errors import UserError
from trainers.data.token_cache import TokenStore, prepare
from tests.helpers import data_cfg as helpers_data_cfg, write_jsonl  # noqa: E402

MODEL = REPO / "assets/tiny-llama"
PREF = REPO / "data/reverse_pref/train.jsonl"
KTO = REPO / "data/reverse_kto/train.jsonl"


def data_cfg(**kw):
    return helpers_data_cfg(**{"packing": False, **kw})


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def split(store, i):
    ids, mask = (list(map(int, a)) for a in store.example(i))
    start = mask.index(1)
    assert all(mask[start:]) and not any(mask[:start])
    return ids[:start], ids[start:]


def test_conversational_pairs_and_kto_rows_are_trl_tokens(tok, tmp_path):
    pref = read_jsonl(PREF)[:16]
    store = TokenStore(prepare(write_jsonl(tmp_path / "p.jsonl", pref), tok, data_cfg(), tmp_path / "c", "pairs"))
    assert len(store) == 32 and store.per_row == 2 and list(store.rows[:4]) == [1, 1, 2, 2]
    for i, row in enumerate(pref):
        want = expected_tokens(tok, row)
        assert split(store, 2 * i) == (want["prompt"], want["chosen"])
        assert split(store, 2 * i + 1) == (want["prompt"], want["rejected"])
    kto = read_jsonl(KTO)[:16]
    store = TokenStore(prepare(write_jsonl(tmp_path / "k.jsonl", kto), tok, data_cfg(), tmp_path / "c", "unpaired"))
    for i, row in enumerate(kto):
        want = expected_tokens(tok, row)
        assert split(store, i) == (want["prompt"], want["completion"])
        assert bool(store.desirable[i]) == row["label"]


@pytest.mark.parametrize("objective,kind", [("dpo", "pairs"), ("orpo", "pairs_text"), ("kto", "unpaired")])
def test_plain_text_rows_are_tokenized_as_each_trl_trainer_does(tok, tmp_path, objective, kind):
    """Plain text differs between TRL's trainers: DPO/KTO tokenize prompt+answer+EOS text
    with the tokenizer's special tokens, CPO/ORPO add BOS and EOS ids themselves."""
    src = read_jsonl(KTO if kind == "unpaired" else PREF)[:4]
    rows = []
    for r in src:
        row = {"prompt": r["prompt"][-1]["content"] + "\n"}
        if kind == "unpaired":
            row.update(completion=r["completion"][0]["content"], label=r["label"])
        else:
            row.update(chosen=r["chosen"][0]["content"], rejected=r["rejected"][0]["content"])
        rows.append(row)
    trl = tokenized_rows(build_trainer(MODEL, rows, objective, batch_size=2, steps=1, output_dir=tmp_path / "trl"),
                         objective)
    store = TokenStore(prepare(write_jsonl(tmp_path / "t.jsonl", rows), tok, data_cfg(), tmp_path / "c", kind))
    for i, t in enumerate(trl):
        if kind == "unpaired":
            assert split(store, i) == (t["prompt"], t["completion"])
        else:
            assert split(store, 2 * i) == (t["prompt"], t["chosen"])
            assert split(store, 2 * i + 1) == (t["prompt"], t["rejected"])
    first = split(store, 0)[0][0]
    assert (first == tok.bos_token_id) == (kind == "pairs_text")  # only CPO/ORPO add BOS to plain text


BAD = {
    "same_answers": ({"prompt": "p", "chosen": "ab", "rejected": "ab"}, "pairs", "'chosen' equals 'rejected'"),
    "empty_answer": ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": " "}],
                      "rejected": [{"role": "assistant", "content": "y"}]}, "pairs", "'chosen' is empty"),
    "kto_empty": ({"prompt": "p", "completion": "", "label": True}, "unpaired", "'completion' is empty"),
    "kto_label": ({"prompt": "p", "completion": "a", "label": "yes"}, "unpaired", "'label' must be true"),
    "mixed": ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "pairs",
              "'chosen' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preference_row_names_file_and_row_or_is_skipped(tok, tmp_path, case):
    bad, kind, needle = BAD[case]
    good = read_jsonl(KTO if kind == "unpaired" else PREF)[:3]
    path = write_jsonl(tmp_path / "d.jsonl", [good[0], good[1], bad, good[2]])
    with pytest.raises(UserError) as e:
        prepare(path, tok, data_cfg(), tmp_path / "c", kind)
    assert f"{path}, row 3" in str(e.value) and needle in str(e.value), str(e.value)
    store = TokenStore(prepare(path, tok, data_cfg(on_bad_row="skip"), tmp_path / "c", kind))
    assert len(store) == 3 * store.per_row and sum(store.report().skipped.values()) == 1
    assert list(store.rows[:: store.per_row]) == [1, 2, 4]


@pytest.mark.parametrize("rows,kind,needle", [
    (REPO / "data/reverse/train.jsonl", "pairs", "objective=dpo, ipo, simpo, orpo"),
    (PREF, "sft", "reads `messages` or `prompt`/`completion` rows (objective=sft)"),
    (PREF, "unpaired", "objective=kto"),
])
def test_rows_of_another_kind_stop_even_when_skipping(tok, tmp_path, rows, kind, needle):
    path = write_jsonl(tmp_path / "d.jsonl", read_jsonl(rows)[:3])
    with pytest.raises(UserError) as e:
        prepare(path, tok, data_cfg(on_bad_row="skip"), tmp_path / "c", kind)
    assert f"{path}, row 1" in str(e.value) and needle in str(e.value), str(e.value)


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,needle", [
    (["objective=dpo", "data=reverse_pref", "data.format=messages"], "data.format=messages is read by objective=sft"),
    (["objective=dpo", "data=reverse_pref", "objective.loss_type=aot"], "objective.loss_type='aot' is not accepted"),
    (["objective=simpo", "data=reverse_pref", "objective.beta=0"], "objective.beta=0 must be a positive number"),
    (["objective=dpo", "data=reverse_pref", "parallel=pipeline", "launcher.nproc_per_node=2"],
     "objective=dpo is not trained by the pipeline"),
])
def test_objective_settings_are_refused_before_launch(overrides, needle):
    from launch.validate import check

    with pytest.raises(UserError) as e:
        check(compose(*overrides))
    assert needle in str(e.value), str(e.value)


def test_packed_micro_batch_scores_each_sequence_as_the_padded_one(tmp_path, tok):
    """data.packing for preference objectives: a micro-batch's sequences packed into fewer
    rows give the same per-sequence completion log-probs, token counts and ORPO's
    whole-sequence NLL as one sequence per padded row (the real tiny model, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.objectives import preference as P
    from trainers.data.batches import collate_sequences
    from trainers.objectives.catalog import all_targets, forward_inputs

    entry = prepare(PREF, tok, data_cfg(), tmp_path, "pairs")
    store = TokenStore(entry)
    parts = [store.example(i) for i in range(16)]
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    scored = {}
    for packed in (False, True):
        batch = collate_sequences(parts, tok.pad_token_id, packed, width=64)
        with torch.no_grad():
            logits = model(**forward_inputs(batch, torch.device("cpu")), use_cache=False).logits
        logps, n = P.sequence_logps(logits, batch["labels"], batch["segments"])
        nll = P.per_sequence(P.token_logps(logits, all_targets(batch, torch.device("cpu"))), batch["segments"])
        scored[packed] = (batch["input_ids"].shape, logps, n, nll)
    (padded_shape, *padded), (packed_shape, *packed) = scored[False], scored[True]
    assert packed_shape[0] < padded_shape[0] == 16 and packed_shape[0] * packed_shape[1] < padded_shape[0] * padded_shape[1]
    assert torch.equal(padded[1], packed[1])
    assert torch.equal(padded[1], torch.tensor([int(m.sum()) for _, m in parts]))
    for a, b in ((padded[0], packed[0]), (padded[2], packed[2])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


def test_kto_kl_pairs_listed_before_training_are_the_ones_each_micro_batch_holds(tok, tmp_path):
    """kto + method=full: `training_kl_pairs` lists every step's mismatched pairs before
    training, and each micro-batch's `kl_batch` receives, row by row, the precomputed value
    of the very sequence it holds, for any split of the global batch over micro-batches,
    accumulation and ranks (the values here are a function of the sequence: its id sum)."""
    import numpy as np

    from trainers.data.batches import BatchLayout, GlobalBatches, Source, mismatched_sequences
    from trainers.objectives.reference import training_kl_pairs

    store = TokenStore(prepare(write_jsonl(tmp_path / "k.jsonl", read_jsonl(KTO)[:10]), tok, data_cfg(),
                               tmp_path / "c", "unpaired"))
    sources, steps = [Source("kto", store)], 6  # 6 steps of 4 rows: 2.4 passes over the 10 rows
    listed = None
    for mb, ga, dp in ((4, 1, 1), (1, 2, 2), (2, 1, 2)):
        batches = GlobalBatches(sources, BatchLayout(mb, ga, dp), seed=5, pad_id=tok.pad_token_id, packed=False,
                                max_len=64)
        pairs = training_kl_pairs(batches, steps)
        assert listed is None or (pairs == listed).all()  # the pairs do not depend on the split
        listed = pairs
        values = [float(mismatched_sequences(sources, [(k, r)], [(pk, pr)], 64)[0][0].sum()) for k, r, pk, pr in pairs]
        batches.kl_reference = np.asarray(values, dtype=np.float32).reshape(steps, 4)
        for step in range(steps):
            for rank in range(dp):
                micro, _ = batches.micro_batches(step, rank, "rows")
                assert len(micro) == ga
                for b in micro:
                    kl = b["kl_batch"]
                    held = (kl["input_ids"] * kl["attention_mask"]).sum(dim=1).float()
                    assert kl["ref_logps"].tolist() == held.tolist(), (mb, ga, dp, step, rank)
    # TRL's rotation by one within the global batch: row i with row i-1's completion
    rows = listed.reshape(steps, 4, 4)
    assert (rows[:, :, 2:] == np.roll(rows[:, :, :2], 1, axis=1)).all()
    with pytest.raises(RuntimeError, match="no precomputed KL reference for step 7"):
        batches.micro_batches(steps, 0, "rows")
