"""Data pipeline: loss masks, EOS, packing isolation, bad rows (fast, in-process)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.data import IGNORE, collate, load_examples, pack, tokenize_messages, unpacked
from trainers.errors import UserError


def data_cfg(**kw):
    base = dict(format="auto", max_seq_len=64, truncation=True, on_bad_row="error", packing=True)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def targets(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


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
    (ex,), _, report = load_examples(path, tok, data_cfg())
    assert targets(tok, ex) == "ba<|end|>"
    assert ex.input_ids[0] == tok.bos_token_id and report.kept == 1


BAD_ROWS = {
    "missing_field": {"messages": [{"role": "user"}]},
    "role_order": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    "empty_answer": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_names_file_and_row(tok, tmp_path, kind):
    good = {"messages": [{"role": "user", "content": "Reverse: ab"}, {"role": "assistant", "content": "ba"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, BAD_ROWS[kind], good])
    with pytest.raises(UserError, match=r"d\.jsonl, row 3"):
        load_examples(path, tok, data_cfg())
    examples, _, report = load_examples(path, tok, data_cfg(on_bad_row="skip"))
    assert len(examples) == 3 and report.skipped[kind] == 1


def test_undecodable_and_too_long_rows(tok, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    long = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b" * 200}]})
    path = tmp_path / "d.jsonl"
    path.write_bytes((good + "\n").encode() + b'{"prompt": "\xff\xfe", "completion": "x"}\n' + (long + "\n").encode())
    with pytest.raises(UserError, match=r"row 2: text is not valid UTF-8"):
        load_examples(str(path), tok, data_cfg())
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(good + "\n" + long + "\n")
    with pytest.raises(UserError, match=r"row 2: .*longer than data.max_seq_len=64"):
        load_examples(str(only_long), tok, data_cfg(truncation=False))
    ex, _, report = load_examples(str(path), tok, data_cfg(on_bad_row="skip", truncation=False))
    assert len(ex) == 1 and report.skipped == {"undecodable": 1, "too_long": 1}
    ex, _, report = load_examples(str(path), tok, data_cfg(on_bad_row="skip", truncation=True))
    assert report.truncated == 1 and len(ex[1].input_ids) == 64


def test_packing_blocks_attention_across_rows(tok, tiny_model, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in ("abc", "hello", "xy")
    ]
    examples, _, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, data_cfg())
    packed = pack(examples, 64)
    assert len(packed) == 1 and sum(s.n_targets for s in packed) == sum(s.n_targets for s in unpacked(examples))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    with torch.no_grad():
        b = collate(packed, tok.pad_token_id, packed=True)
        together = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(together[offset : offset + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-5)
            offset += len(ex.input_ids)
