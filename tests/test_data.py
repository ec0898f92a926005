"""Data pipeline, in-process: loss masks, EOS, bad rows, the token cache (keys, reuse,
atomicity, parallel build), best-fit-decreasing packing, mixtures, collation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.data.batches import BatchLayout, GlobalBatches, Mixture, Shuffle, Source, collate
from trainers.data.source_specs import parse_sources
from trainers.errors import UserError
from trainers.data.packing import best_fit_decreasing
from trainers.data.rows import IGNORE, tokenize_messages
from trainers.data.token_cache import TokenStore, entry_dir, entry_key, prepare
from tests.helpers import data_cfg, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def load(path, tok, cfg, root):
    return TokenStore(prepare(str(path), tok, cfg, root))


def targets(tok, store, i):
    ids, mask = store.example(i)
    return tok.decode([int(t) for t, m in zip(ids, mask) if m])


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_every_assistant_turn_is_a_target_with_eos(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Reverse: ab"},
        {"role": "assistant", "content": "ba"},
        {"role": "user", "content": "Reverse: xyz"},
        {"role": "assistant", "content": "zyx"},
    ]
    ids, mask = tokenize_messages(tok, msgs)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target == "ba<|end|>zyx<|end|>"
    # The prompt of the last turn is tokenized exactly as at generation time.
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n] == tok(prompt, add_special_tokens=False)["input_ids"] and mask[n] == 1


def test_prompt_completion_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Reverse: ab\nAnswer: ", "completion": "ba"}])
    store = load(path, tok, data_cfg(), tmp_path / "cache")
    assert targets(tok, store, 0) == "ba<|end|>"
    assert store.example(0)[0][0] == tok.bos_token_id and store.report().kept == 1
    # the targets array counts shifted labels: every answer token but none at position 0
    assert int(store.targets[0]) == int(store.example(0)[1].sum())


BAD_ROWS = {
    "missing_field": {"messages": [{"role": "user"}]},
    "role_order": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    "empty_answer": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_names_file_and_row(tok, tmp_path, kind):
    good = chat("Reverse: ab", "ba")
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, BAD_ROWS[kind], good])
    with pytest.raises(UserError, match=r"d\.jsonl, row 3"):
        load(path, tok, data_cfg(), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("d-*/meta.json")), "a failed build left a cache entry"
    store = load(path, tok, data_cfg(on_bad_row="skip"), tmp_path / "cache")
    assert len(store) == 3 and store.report().skipped[kind] == 1
    assert list(store.rows) == [1, 2, 4]  # row numbers survive for error reports and eval


def test_undecodable_and_too_long_rows(tok, tmp_path):
    good = json.dumps(chat("hi", "yo"))
    long = json.dumps(chat("a", "b" * 200))
    path = tmp_path / "d.jsonl"
    path.write_bytes((good + "\n").encode() + b'{"prompt": "\xff\xfe", "completion": "x"}\n' + (long + "\n").encode())
    root = tmp_path / "cache"
    with pytest.raises(UserError, match=r"row 2: text is not valid UTF-8"):
        load(path, tok, data_cfg(), root)
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(good + "\n" + long + "\n")
    with pytest.raises(UserError, match=r"row 2: .*longer than data.max_seq_len=64"):
        load(only_long, tok, data_cfg(truncation=False), root)
    store = load(path, tok, data_cfg(on_bad_row="skip", truncation=False), root)
    assert len(store) == 1 and store.report().skipped == {"undecodable": 1, "too_long": 1}
    store = load(path, tok, data_cfg(on_bad_row="skip", truncation=True), root)
    assert store.report().truncated == 1 and len(store.example(1)[0]) == 64


def test_cache_is_keyed_reused_and_never_half_written(tok, tmp_path):
    root = tmp_path / "cache"
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat(f"Reverse: {w}", w[::-1]) for w in ("abc", "hello", "xy")])
    first = prepare(str(path), tok, data_cfg(), root)
    built = (first / "meta.json").stat().st_mtime_ns
    assert prepare(str(path), tok, data_cfg(), root) == first
    assert (first / "meta.json").stat().st_mtime_ns == built, "an unchanged file was tokenized again"
    # what changes the tokens changes the entry: the data's bytes and the settings
    assert prepare(str(path), tok, data_cfg(max_seq_len=32), root) != first
    write_jsonl(path, [chat("Reverse: abc", "cba")])
    changed = prepare(str(path), tok, data_cfg(), root)
    assert changed != first and len(TokenStore(changed)) == 1
    # a build killed before its rename leaves a temporary folder that is never read
    key = entry_key(str(path), tok, data_cfg(on_bad_row="skip"), root)
    final = entry_dir(str(path), key, root)
    (final.parent / f".{final.name}.12345.tmp").mkdir()
    assert prepare(str(path), tok, data_cfg(on_bad_row="skip"), root) == final
    # a damaged entry is refused with what to do, not read
    with open(final / "ids.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(UserError, match="unreadable.*Delete that folder"):
        TokenStore(final)


def test_parallel_tokenization_equals_serial(tok, tmp_path):
    rows = [chat(f"Reverse: {'ab' * (i % 9)}x{i}", f"{i}x{'ba' * (i % 9)}") for i in range(5000)]
    rows[1234] = BAD_ROWS["role_order"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    serial = load(path, tok, data_cfg(on_bad_row="skip"), tmp_path / "a")
    parallel = load(path, tok, data_cfg(on_bad_row="skip", num_proc=2), tmp_path / "b")
    assert parallel.meta["processes"] == 2 and len(parallel) == 4999
    for name in ("ids", "mask", "offsets", "rows", "targets"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))
    with pytest.raises(UserError, match="row 1235"):
        load(path, tok, data_cfg(num_proc=2), tmp_path / "c")


def naive_bfd_bins(lengths, capacity):
    rooms = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, r in enumerate(rooms) if r >= n]
        if fits:
            best = min(fits, key=lambda b: rooms[b])
            rooms[best] -= n
        else:
            rooms.append(capacity - n)
    return len(rooms)


def test_best_fit_decreasing_is_exact_and_as_dense_as_trl():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = np.random.default_rng(0)
    for _ in range(50):
        capacity = int(rng.integers(8, 128))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 200)))
        order, offsets = best_fit_decreasing(lengths, capacity)
        assert sorted(order.tolist()) == list(range(len(lengths)))
        assert (np.add.reduceat(lengths[order], offsets[:-1]) <= capacity).all()
        assert len(offsets) - 1 == naive_bfd_bins(lengths.tolist(), capacity)
    lengths = rng.integers(5, 60, size=3000)
    _, offsets = best_fit_decreasing(lengths, 64)
    ds = Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths]})
    assert len(offsets) - 1 <= len(pack_dataset(ds, seq_length=64, strategy="bfd"))


def test_packed_rows_do_not_attend_across_examples(tok, tiny_model, tmp_path):
    rows = [chat(f"Reverse: {w}", w[::-1]) for w in ("abc", "hello", "xy")]
    store = load(write_jsonl(tmp_path / "d.jsonl", rows), tok, data_cfg(), tmp_path / "cache")
    src = Source("d", store, bins=best_fit_decreasing(store.lengths, 64))
    assert len(src) == 1 and src.targets(0) == int(store.targets.sum())
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    with torch.no_grad():
        b = collate([src.tensors(0)], tok.pad_token_id, packed=True)
        together = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        offset = 0
        for e in src.examples(0):
            ids = torch.from_numpy(store.example(int(e))[0].astype(np.int64))[None]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(together[offset : offset + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
            offset += ids.shape[1]


def test_mixture_keeps_every_prefix_within_one_row_of_its_share():
    weights = [0.8, 0.15, 0.05]
    mix = Mixture(weights)
    prev = np.zeros(3, dtype=np.int64)
    for p in range(1, 2000):
        c = mix.counts(p)
        assert c.sum() == p and (c >= prev).all() and (np.abs(c - p * np.array(weights)) <= 1).all()
        prev = c
    # positions of a range are exactly the difference of the prefixes, in a fixed order
    items = mix.positions(100, 164)
    assert len(items) == 64 and mix.positions(100, 164) == items
    for k in range(3):
        assert sum(1 for s, _ in items if s == k) == mix.counts(164)[k] - mix.counts(100)[k]


def test_global_batch_rows_depend_only_on_seed_and_step(tok, tmp_path):
    task = load(write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)]), tok, data_cfg(), tmp_path / "c")
    replay = load(write_jsonl(tmp_path / "r.jsonl", [chat(f"r{i}", f"b{i}") for i in range(7)]), tok, data_cfg(), tmp_path / "c")
    sources = [Source("task", task, 0.75), Source("replay", replay, 0.25)]

    def batches(mb, ga, dp):
        return GlobalBatches(sources, BatchLayout(mb, ga, dp), seed=3, pad_id=tok.pad_token_id, packed=False)

    a, b = batches(8, 1, 1), batches(2, 2, 2)
    rows = [a.rows(s) for s in range(30)]
    assert rows == [b.rows(s) for s in reversed(range(30))][::-1]  # any order of asking, any split
    assert all(sum(1 for k, _ in r if k == 1) == 2 for r in rows)  # 25% of 8 rows every step
    # replay (7 rows) is passed over many times, each pass a permutation of all its rows
    seen = [i for r in rows for k, i in r if k == 1]
    for e in range(len(seen) // 7):
        assert sorted(seen[7 * e : 7 * e + 7]) == list(range(7))
    # the logged stats are those of the tensors step 0 computes: its one micro-batch of 8 rows
    stats, batch = a.stats(0), a.collate(rows[0])
    real = batch["attention_mask"].sum(dim=1).tolist()
    from_replay = sum(n for (k, _), n in zip(rows[0], real) if k == 1)
    assert stats == {"tokens/task": sum(real) - from_replay, "tokens/replay": from_replay,
                     "padding_fraction": pytest.approx(1 - sum(real) / batch["input_ids"].numel())}, (stats, real)
    micro, n_targets = b.micro_batches(0, dp_rank=1)
    assert len(micro) == 2 and micro[0]["input_ids"].shape[0] == 2
    assert n_targets == sum(sources[k].targets(i) for k, i in rows[0])
    assert a.row_ids(0)[0].startswith(("task:", "replay:"))


@pytest.mark.parametrize("value, needle", [
    ([], "is not a data source"),
    ([{"path": "a.jsonl", "weight": 0}], "weight 0"),
    ([{"path": "a.jsonl", "wieght": 1}], "is not a data source"),
    (["x/a.jsonl", "y/a.jsonl"], "named alike"),
])
def test_bad_source_specs_are_refused(value, needle):
    with pytest.raises(UserError, match=needle):
        parse_sources(value, "data.train")
    specs = parse_sources({"held": "h.jsonl", "other": "o.jsonl"}, "data.eval")
    assert [s.name for s in specs] == ["held", "other"]
    assert parse_sources("data/reverse/train.jsonl", "data.train")[0].name == "reverse/train"


def test_cache_files_hold_the_only_copy(tok, tmp_path):
    """What a rank holds per row is index arithmetic: the token arrays stay on disk."""
    store = load(write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")] * 10), tok, data_cfg(), tmp_path / "c")
    assert isinstance(store.ids, np.memmap) and isinstance(store.offsets, np.memmap)
    assert os.path.getsize(store.folder / "ids.bin") == store.ids.nbytes


def test_shuffle_is_a_seeded_permutation_without_a_table():
    for n in (1, 2, 3, 17, 1000, 4097):
        for seed in (0, 1):
            perm = Shuffle(n, seed)[np.arange(n)]
            assert sorted(perm.tolist()) == list(range(n))
            assert [Shuffle(n, seed)[i] for i in (0, n - 1)] == [perm[0], perm[-1]]  # scalar == vector
    a, b = Shuffle(1000, 0)[np.arange(1000)], Shuffle(1000, 1)[np.arange(1000)]
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1


# ------------------------------------------------------------------ batch layout (pure)
def seq(ids, labels=None, start=0):
    ids = np.asarray(ids, dtype=np.int64)
    labels = ids + 100 if labels is None else np.asarray(labels, dtype=np.int64)
    return ids, labels, np.arange(start, start + len(ids))


def test_rows_per_step_is_micro_batch_times_accumulation_times_data_parallel_ranks():
    assert BatchLayout(4, 2, 1).rows_per_step == 8
    assert BatchLayout(2, 2, 2).rows_per_step == 8 and BatchLayout(1, 8, 1).rows_per_step == 8
    assert BatchLayout(3, 5, 7).rows_per_step == 105


def test_collate_right_pads_and_ignores_the_padding():
    b = collate([seq([5, 6, 7]), seq([8])], pad_id=0, packed=False)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[105, 106, 107], [108, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]  # padding restarts: a sequence of its own
    assert b["n_real_tokens"] == 4
    # packed rows: positions as given (restarting per example), no attention mask at all
    packed = collate([(np.array([1, 2, 3, 4]), np.array([2, 3, 4, IGNORE]), np.array([0, 1, 0, 1]))], 0, True)
    assert "attention_mask" not in packed and packed["position_ids"].tolist() == [[0, 1, 0, 1]]
    # keep=False: the row is computed, its targets blanked (evaluation's padding rows)
    kept = collate([seq([5, 6]), seq([7, 8])], 0, False, keep=[True, False])
    assert kept["labels"].tolist() == [[105, 106], [IGNORE, IGNORE]] and kept["input_ids"].tolist() == [[5, 6], [7, 8]]


def test_collate_sequences_records_which_sequence_each_position_belongs_to():
    from trainers.data.batches import collate_sequences

    parts = [(np.array([1, 2, 3]), np.array([0, 1, 1])), (np.array([4, 5]), np.array([0, 1])),
             (np.array([6]), np.array([1]))]
    one_per_row = collate_sequences(parts, pad_id=0, packed=False)
    assert one_per_row["segments"].tolist() == [[0, 0, 0], [1, 1, -1], [2, -1, -1]]
    assert one_per_row["seq_lengths"].tolist() == [3, 2, 1]
    assert one_per_row["labels"].tolist()[0] == [2, 3, IGNORE]  # shifted targets of the masked span
    # packed into rows of width 3: best fit decreasing puts [3] alone, then [2] + [1]
    packed = collate_sequences(parts, pad_id=0, packed=True, width=3)
    assert packed["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert packed["segments"].tolist() == [[0, 0, 0], [1, 1, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]] and "attention_mask" not in packed


def test_computed_positions_count_the_padding_of_each_layout():
    from trainers.data.batches import computed_positions, sequence_rows

    lengths = [5, 3, 2, 2]
    assert computed_positions(lengths, packed=False, width=None) == 4 * 5  # 4 rows padded to 5
    assert sequence_rows(np.array(lengths), packed=True, width=6) == [[0], [1, 2], [3]]
    assert computed_positions(lengths, packed=True, width=6) == 3 * 5  # 3 rows, the fullest holds 5
    assert computed_positions(lengths, packed=True, width=None) == 3 * 5  # width at least the longest
    assert computed_positions([4, 4], packed=True, width=8) == 8


def test_micro_batches_of_each_rank_are_consecutive_slices_of_the_global_batch(tok, tmp_path):
    rows = [chat(f"q{i}", "a" * (i % 5 + 1)) for i in range(24)]
    store = load(write_jsonl(tmp_path / "t.jsonl", rows), tok, data_cfg(packing=False), tmp_path / "c")
    src = Source("t", store)
    batches = GlobalBatches([src], BatchLayout(2, 3, 2), seed=0, pad_id=tok.pad_token_id, packed=False)
    step = 5
    want = batches.rows(step)
    assert len(want) == 12 and len(set(want)) == 12  # 24 rows, 2 steps per pass: no repeats within a step
    targets = sum(src.targets(r) for _, r in want)
    seen = []
    for rank in range(2):
        micro, count = batches.micro_batches(step, dp_rank=rank)
        assert len(micro) == 3 and count == targets  # every rank divides by the whole global batch's targets
        for mb in micro:
            assert mb["input_ids"].shape[0] == 2
            for row in range(2):
                n = int(mb["attention_mask"][row].sum())
                seen.append(mb["input_ids"][row, :n].tolist())
                assert (mb["labels"][row, n:] == IGNORE).all()
    assert seen == [src.tensors(r)[0].tolist() for _, r in want]  # rank 0's rows, then rank 1's, in order
    assert sum((mb["labels"] != IGNORE).sum().item() for r in range(2) for mb in batches.micro_batches(step, r)[0]) \
        == targets
    with pytest.raises(UserError, match=r"has 24 sequences but one global batch needs 32 \(micro_batch_size 4 x "
                                        r"grad_accum 4 x 2 data-parallel ranks\)"):
        GlobalBatches([src], BatchLayout(4, 4, 2), seed=0, pad_id=0, packed=False)
