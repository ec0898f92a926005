"""The data users bring (trainers/data/formats.py, selection.py, chat_template.py): Alpaca,
ShareGPT (and its OpenAI variant) and plain text detected per file and converted to the
loop's rows, data.columns, data.chat_template, hf: sources saved to disk, data.eval_split
and data.max_samples, unweighted lists concatenated by size; bad rows and refusals. One
real launch trains the bundled model on a list of files in four formats at once."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from tests.helpers import REPO, launch, metrics, refused, summary
from trainers.data.batches import BatchLayout, GlobalBatches, Mixture, Source
from trainers.data.formats import file_format, to_loop_row
from trainers.data.rows import BadRow
from trainers.data.selection import derive, select
from trainers.data.source_specs import parse_sources
from trainers.data.token_cache import ARRAYS, TokenStore, content_digest, prepare
from trainers.errors import UserError
from trainers.model.load import load_tokenizer
from tests.helpers import data_cfg as helpers_data_cfg, write_jsonl  # noqa: E402

EXAMPLES = REPO / "data" / "examples"
BUNDLED = REPO / "assets" / "tiny-llama"


def data_cfg(**kw):
    return helpers_data_cfg(**{"columns": None, **kw})


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED)


def answers(tok, store, i):
    ids, mask = store.example(i)
    return tok.decode([int(t) for t, m in zip(ids, mask) if m])


# ------------------------------------------------------------------ detection, conversion
def test_each_example_file_is_detected_and_converted_to_the_loops_rows():
    assert {f.stem: file_format(str(f), data_cfg()) for f in sorted(EXAMPLES.glob("*.jsonl"))} == {
        "alpaca": "alpaca", "openai_conversations": "sharegpt", "sharegpt": "sharegpt", "text": "text"}
    # data.format forces one: an alpaca file read as sharegpt has bad rows
    assert file_format(str(EXAMPLES / "alpaca.jsonl"), data_cfg(format="sharegpt")) == "sharegpt"
    first = json.loads((EXAMPLES / "alpaca.jsonl").read_text().splitlines()[0])
    assert to_loop_row(first, "alpaca")["messages"] == [
        {"role": "user", "content": f"{first['instruction']}\n{first['input']}"},
        {"role": "assistant", "content": first["output"]}]
    with pytest.raises(BadRow, match="'conversations'"):
        to_loop_row(first, "sharegpt")
    # Alpaca's system and history (LLaMA-Factory's layout)
    row = {"system": "S", "history": [["q1", "a1"]], "instruction": "q2", "input": "", "output": "a2"}
    assert [(m["role"], m["content"]) for m in to_loop_row(row, "auto")["messages"]] == [
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    # ShareGPT's tool turns: the function call is an answer, the observation is read like a user turn
    row = {"system": "S", "conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    assert [m["role"] for m in to_loop_row(row, "auto")["messages"]] == ["system", "user", "assistant", "user",
                                                                       "assistant"]
    openai = json.loads((EXAMPLES / "openai_conversations.jsonl").read_text().splitlines()[0])
    assert to_loop_row(openai, "sharegpt")["messages"] == openai["conversations"]
    # the loop's own formats pass through, columns renamed
    assert to_loop_row({"question": "q", "answer": "a"}, "auto", {"prompt": "question", "completion": "answer"}) \
        == {"prompt": "q", "completion": "a"}


def test_text_rows_train_every_token_and_long_documents_become_blocks(tok, tmp_path):
    store = TokenStore(prepare(str(EXAMPLES / "text.jsonl"), tok, data_cfg(), tmp_path / "cache"))
    assert store.meta["format"] == "text" and store.report().rows == 64
    assert f"64/64 rows kept, {len(store.ids):,} tokens in {len(store)} blocks" in store.report().kept_and_skipped()
    first = json.loads((EXAMPLES / "text.jsonl").read_text().splitlines()[0])["text"]
    blocks = [i for i in range(len(store)) if int(store.rows[i]) == 1]
    assert len(blocks) > 1 and all(len(store.example(i)[0]) <= 64 for i in blocks)  # cut, not truncated
    ids = np.concatenate([store.example(i)[0] for i in blocks])
    whole = [tok.bos_token_id] + tok(first, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.tolist() == whole  # every token of the document, once
    for i in blocks:  # loss on every token (a block's first has nothing before it)
        assert store.example(i)[1].all() and int(store.targets[i]) == len(store.example(i)[0]) - 1


def test_columns_map_sft_and_preference_rows(tok, tmp_path):
    sft = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Reverse: ab", "answer": "ba", "id": 1}] * 3)
    store = TokenStore(prepare(sft, tok, data_cfg(columns={"prompt": "question", "completion": "answer"}),
                               tmp_path / "cache"))
    assert answers(tok, store, 0) == "ba<|end|>"
    with pytest.raises(UserError, match=r"qa\.jsonl, row 1: .*data\.columns"):
        prepare(sft, tok, data_cfg(), tmp_path / "cache")  # the unmapped file names the option
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": "Reverse: ab", "good": "ba", "bad": "ab"}] * 3)
    store = TokenStore(prepare(pairs, tok, data_cfg(columns={"prompt": "q", "chosen": "good", "rejected": "bad"}),
                               tmp_path / "cache", kind="pairs"))
    assert len(store) == 6 and answers(tok, store, 0).startswith("ba") and answers(tok, store, 1).startswith("ab")
    # GRPO's rewards read the prompt rows' other columns back from the file, renamed alike
    from trainers.objectives.rollout import raw_rows

    assert raw_rows([(sft, 2)], {"prompt": "question"}) == [{"prompt": "Reverse: ab", "answer": "ba", "id": 1}]


BAD = {  # format -> (a bad row, its kind)
    "alpaca": ({"instruction": "Reverse: ab", "input": ""}, "missing_field"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}, "bad_role"),
    "text": ({"text": "   "}, "empty_answer"),
}


@pytest.mark.parametrize("fmt", sorted(BAD))
def test_a_bad_row_of_each_format_names_file_and_row_or_is_skipped(tok, tmp_path, fmt):
    good = [json.loads(x) for x in (EXAMPLES / f"{fmt}.jsonl").read_text().splitlines()[:3]]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", good[:2] + [BAD[fmt][0]] + good[2:])
    with pytest.raises(UserError, match=rf"{fmt}\.jsonl, row 3"):
        prepare(path, tok, data_cfg(), tmp_path / "cache")
    store = TokenStore(prepare(path, tok, data_cfg(on_bad_row="skip"), tmp_path / "cache"))
    assert store.report().skipped == {BAD[fmt][1]: 1} and 3 not in set(store.rows.tolist())


# ------------------------------------------------------------------------ chat templates
def test_chat_template_by_name_or_file_and_a_tokenizer_without_one_is_refused(tmp_path):
    plain = tmp_path / "no-template"
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    (plain / "config.json").write_text((BUNDLED / "config.json").read_text())
    model = OmegaConf.create({"path": str(plain), "trust_remote_code": False, "special_tokens": None})
    bare = load_tokenizer(model)
    assert bare.chat_template is None
    with pytest.raises(UserError, match="data.chat_template"):
        prepare(str(EXAMPLES / "sharegpt.jsonl"), bare, data_cfg(), tmp_path / "cache")
    # through the command line: refused before anything starts, naming the option
    (plain / "model.safetensors").symlink_to(BUNDLED / "model.safetensors")
    out = refused(tmp_path / "run", f"model.path={plain}", f"data.train={EXAMPLES / 'sharegpt.jsonl'}",
                  "data.eval=null", f"data.cache_dir={tmp_path / 'cache'}")
    assert "no chat template" in out and "data.chat_template=NAME_OR_PATH" in out, out
    chatml = load_tokenizer(model, "chatml")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chatml.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    store = TokenStore(prepare(str(EXAMPLES / "openai_conversations.jsonl"), chatml, data_cfg(max_seq_len=128),
                               tmp_path / "cache"))
    assert answers(chatml, store, 0) == "nxohpt<|im_end|>\n<|end|>"
    mine = tmp_path / "t.jinja"
    mine.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(model, str(mine)).apply_chat_template(msgs, tokenize=False) == "[hi][yo]"
    for name in ("llama3", "zephyr"):  # the shipped templates render and are prefix-stable (trainable)
        t = load_tokenizer(model, name)
        head = t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        assert t.apply_chat_template(msgs, tokenize=False).startswith(head), name


# ------------------------------------------------------------------------- hf: sources
def test_hf_source_saved_to_disk_is_read_by_split_and_keyed_by_its_content(tok, tmp_path):
    rows = [{"prompt": f"Reverse: {w}\nAnswer: ", "completion": w[::-1]} for w in ("abc", "hello", "xy", "kite")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "ds"))
    root = tmp_path / "cache"
    train = TokenStore(prepare(f"hf:{tmp_path / 'ds'}", tok, data_cfg(), root))
    test = TokenStore(prepare(f"hf:{tmp_path / 'ds'}:test", tok, data_cfg(), root))
    assert len(train) == 4 and len(test) == 2 and answers(tok, test, 1) == "olleh<|end|>"
    assert [s.name for s in parse_sources([f"hf:{tmp_path / 'ds'}:test"], "data.train")] == ["ds/test"]
    before = content_digest(f"hf:{tmp_path / 'ds'}:test", root)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[1:3])}).save_to_disk(str(tmp_path / "ds2"))
    assert content_digest(f"hf:{tmp_path / 'ds2'}:test", root) != before  # another version, another entry
    with pytest.raises(UserError, match="splits"):
        prepare(f"hf:{tmp_path / 'ds'}:validation", tok, data_cfg(), root)
    repo = tmp_path / "repo"  # a folder laid out as a Hub dataset repository: datasets.load_dataset
    repo.mkdir()
    write_jsonl(repo / "test.jsonl", rows[:3])
    assert len(TokenStore(prepare(f"hf:{repo}:test", tok, data_cfg(), root))) == 3


# ------------------------------------------------------- eval_split, max_samples, mixtures
def test_eval_split_and_max_samples_select_disjoint_rows_reproducibly(tok, tmp_path):
    numbers = np.repeat(np.arange(1, 101), 2)  # 100 data rows of two examples each (pairs, text blocks)
    train, held = select(numbers, None, 0.05, seed=7)
    assert len(held) == 5 and len(train) == 95 and not set(train) & set(held)
    assert np.array_equal(held, select(numbers, None, 0.05, seed=7)[1])  # a resume selects the same rows
    assert not np.array_equal(held, select(numbers, None, 0.05, seed=8)[1])
    train, held = select(numbers, 40, 10, seed=7)
    assert set(train) | set(held) == set(range(1, 41)) and len(held) == 10 and list(train) == sorted(train)
    with pytest.raises(UserError, match="data.eval_split"):
        select(numbers, 5, 5, seed=7)
    # derived entries: the kept rows' examples in file order; the batch order over them is (seed, step) only
    store = TokenStore(prepare(str(EXAMPLES / "alpaca.jsonl"), tok, data_cfg(), tmp_path / "cache"))
    train, held = select(store.rows, 48, 0.25, seed=3)
    settings = {"max_samples": 48, "eval_split": 0.25, "seed": 3}
    a, b = (TokenStore(derive(store, rows, part, settings, ARRAYS)) for rows, part in ((train, "train"), (held, "held_out")))
    assert len(a) == 36 and len(b) == 12 and list(a.rows) == list(train) and list(b.rows) == list(held)
    i = int(np.flatnonzero(np.asarray(store.rows) == train[5])[0])
    assert np.array_equal(a.example(5)[0], store.example(i)[0])
    layout = BatchLayout(4, 1, 1)
    orders = [[GlobalBatches([Source("a", TokenStore(a.folder))], layout, 3, 0, False).rows(s) for s in range(12)]
              for _ in range(2)]  # a first run and a relaunch
    assert orders[0] == orders[1]


def test_an_unweighted_list_is_concatenated_in_proportion_to_sizes():
    specs = parse_sources(["a.jsonl", "b.jsonl"], "data.train")
    assert [s.weight for s in specs] == [None, None]  # open_data weighs each by its rows
    counts = Mixture([300.0, 100.0]).counts(400)  # a pass over both: each row once, not 200/200
    assert counts.tolist() == [300, 100]
    with pytest.raises(UserError, match="Weight every entry"):
        parse_sources([{"path": "a.jsonl", "weight": 2}, "b.jsonl"], "data.train")


# -------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, needles", [
    (["objective=dpo", "data=reverse_pref", "data.format=alpaca"], ["data.format=alpaca", "objective=sft"]),
    (["data.eval_split=0.05"], ["data.eval_split=0.05", "data.eval=null"]),
    (["data.eval=null", "data.eval_split=1.5"], ["data.eval_split=1.5", "fraction"]),
    (["data.max_samples=0"], ["data.max_samples=0"]),
    (["data.chat_template=vicuna"], ["data.chat_template='vicuna'", "chatml, llama3, zephyr"]),
    (["data.columns=[prompt]"], ["data.columns"]),
    (["data.format=markdown"], ["data.format='markdown'", "alpaca, sharegpt, text"]),
])
def test_refusals_name_the_option(tmp_path, overrides, needles):
    out = refused(tmp_path / "run", *overrides)
    for needle in needles:
        assert needle in out, out


# ------------------------------------------------------------------- one real launch
@pytest.fixture(scope="module")
def formats_run(tmp_path_factory):
    """The bundled model on four files in four formats at once (Alpaca, ShareGPT, plain text,
    and a datasets folder with its own column names through hf:), concatenated, each
    capped at 40 rows with 10 % of them held out as per-file eval sets."""
    root = tmp_path_factory.mktemp("formats-run")
    rows = [json.loads(x) for x in (REPO / "data/reverse/train_prompt_completion.jsonl").read_text().splitlines()[:48]]
    datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["completion"]} for r in rows]).save_to_disk(
        str(root / "qa"))
    files = [EXAMPLES / "alpaca.jsonl", EXAMPLES / "sharegpt.jsonl", EXAMPLES / "text.jsonl", f"hf:{root / 'qa'}"]
    proc = launch("data.train=[" + ", ".join(map(str, files)) + "]", "data.eval=null", "data.eval_split=0.1",
                  "data.max_samples=40", "data.columns={prompt: question, completion: answer}",
                  "train.max_steps=6", "train.micro_batch_size=8", "train.grad_accum=1", "optim.lr=3e-3",
                  "train.eval_every=1000", "train.save_every=1000", "data.metric_rows=2", "eval.probes=null",
                  f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}")
    return root / "run", proc.stdout + proc.stderr


def test_each_format_trains_in_one_run_with_held_out_sets(formats_run):
    run, out = formats_run
    assert summary(run)["status"] == "completed", out
    names = ["alpaca", "sharegpt", "text", "qa"]
    steps = [r for r in metrics(run) if "loss" in r]
    assert len(steps) == 6 and all(r[f"tokens/{n}"] > 0 for r in steps for n in names), steps
    evals = [r for r in metrics(run) if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    for n in names:  # every held-out set's loss falls, the text one's (continued pre-training) included
        assert last[f"eval_loss/held_out/{n}"] < first[f"eval_loss/held_out/{n}"], (n, first, last)
    assert "eval_exact_match/held_out/text" not in last and "eval_exact_match/held_out/alpaca" in last
    cfg = OmegaConf.load(run / "config.yaml")
    prepared = {e.name: e for e in cfg.data.prepared.train + cfg.data.prepared.eval}
    for n in names:  # 40 rows each: 36 trained on, 4 held out, never the same row
        train, held = TokenStore(prepared[n].dir), TokenStore(prepared[f"held_out/{n}"].dir)
        assert (train.report().rows, held.report().rows) == (36, 4), n
        assert not set(train.rows.tolist()) & set(held.rows.tolist())
        assert prepared[n].weight is None  # concatenated: each source weighs its own size
