"""model.special_tokens (docs/peft-methods.md, "Adding tokens"): one short LoRA run adds a
token its training answers use and its own eos, trains the grown embedding and LM head
through method.modules_to_save, and its export carries both; the refusals and the token
cache's key are checked in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import FAST, compose, launch, refused, write_jsonl

NEW, EOT = "<tool>", "<eot>"
SPECIAL = f"model.special_tokens={{eos_token:'{EOT}',additional:['{NEW}']}}"
LORA = ["method=lora", "method.modules_to_save=[embed_tokens,lm_head]"]


def rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"call {w}: ", "completion": f"{NEW}{w}{NEW}"} for w in ("ab", "cd", "ef", "gh") * (n // 4)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("special")
    data = write_jsonl(root / "train.jsonl", rows())
    run_dir = root / "run"
    launch(*FAST, *LORA, SPECIAL, "train.max_steps=4", "optim.lr=1e-2", "optim.warmup_steps=0",
           f"data.train={data}", "data.eval=null", "eval.probes=null", "data.metric_rows=0", "data.packing=false",
           f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def exported_tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "export" / "merged")


def test_the_new_token_is_one_id_in_the_tokenized_rows(run, exported_tokenizer):
    from trainers.data.token_cache import TokenStore

    cfg = OmegaConf.load(run / "config.yaml")
    store = TokenStore(Path(cfg.data.prepared.train[0].dir))
    new_id, eot_id = exported_tokenizer.convert_tokens_to_ids([NEW, EOT])
    ids, mask = (list(a) for a in store.example(0))
    assert ids.count(new_id) == 2 and ids[-1] == eot_id, ids  # "<tool>ab<tool>" then the new eos
    assert all(mask[i] for i, t in enumerate(ids) if t in (new_id, eot_id))  # answer tokens: trained


def test_the_export_carries_the_tokens_and_loads(run, exported_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    merged = run / "export" / "merged"
    tok = exported_tokenizer
    assert tok.convert_tokens_to_ids(NEW) >= 102 and tok.eos_token == EOT  # beyond the base's 102 ids
    assert tok(f"x{NEW}y", add_special_tokens=False)["input_ids"][1] == tok.convert_tokens_to_ids(NEW)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    eot = tok.convert_tokens_to_ids(EOT)
    assert model.config.eos_token_id == eot and GenerationConfig.from_pretrained(merged).eos_token_id == eot
    adapter = json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) >= {"embed_tokens", "lm_head"}


def test_the_new_rows_trained_from_their_initial_values(run, exported_tokenizer):
    """The initial rows: the model the run started from, rebuilt (same seed, same mean_resizing
    draw); the export's rows of the new tokens moved away from them."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.memory import hf_model
    from trainers.model.load import ModelSource

    cfg = OmegaConf.load(run / "config.yaml")
    def start_model():
        source = ModelSource(cfg.model, cfg.method, torch.float32, cfg.seed)
        model = hf_model(source.whole(torch.device("cpu")))
        source.close()
        return model

    start = start_model()
    new_id = exported_tokenizer.convert_tokens_to_ids(NEW)
    # the draw is the seed's: every rebuild (a rank, a resume, this test) starts from the same rows
    assert torch.equal(start_model().get_input_embeddings().weight[new_id], start.get_input_embeddings().weight[new_id])
    trained = AutoModelForCausalLM.from_pretrained(run / "export" / "merged")
    before = start.get_input_embeddings().weight[new_id]
    assert not torch.allclose(trained.get_input_embeddings().weight[new_id], before)
    assert not torch.allclose(trained.get_output_embeddings().weight[new_id], start.get_output_embeddings().weight[new_id])
    assert before.abs().sum() > 0  # the mean_resizing draw, not zeros


def test_the_token_cache_keys_on_added_tokens():
    from trainers.data.token_cache import tokenizer_fingerprint
    from trainers.model.load import load_tokenizer

    plain = load_tokenizer(compose().model)
    grown = load_tokenizer(compose(SPECIAL).model)
    assert len(grown) == len(plain) + 2
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(grown)
    only_new = load_tokenizer(compose(f"model.special_tokens={{additional:['{NEW}']}}").model)
    assert tokenizer_fingerprint(only_new) not in (tokenizer_fingerprint(plain), tokenizer_fingerprint(grown))


@pytest.mark.parametrize("overrides, says", [
    (["method=lora"], "method.modules_to_save=[embed_tokens,lm_head]"),
    (["method=lora", "method.modules_to_save=[lm_head]"], "missing: embed_tokens"),
    ([*LORA, "parallel=fsdp2", "launcher.nproc_per_node=2"], "parallel=fsdp2 cannot"),
    ([*LORA, "parallel=zero3", "launcher.nproc_per_node=2"], "parallel=zero3 cannot"),
    (["method=qlora", "method.modules_to_save=[embed_tokens,lm_head]"], "method.quantize=nf4"),
    (["method=prompt"], "no modules_to_save"),
])
def test_adding_tokens_is_refused_before_launch(tmp_path, overrides, says):
    text = refused(tmp_path / "run", *overrides, SPECIAL)
    assert says in text and NEW in text, text


def test_tokens_the_tokenizer_has_need_no_growth_and_pass_any_plan():
    from trainers.model.special_tokens import check

    cfg = compose("method=lora", "model.special_tokens={pad_token:'<|end|>',eos_token:'<|pad|>'}")
    check(cfg.model, cfg.method, "fsdp2")  # swapping existing tokens grows nothing
    bad = compose("model.special_tokens={pad:'x'}")
    with pytest.raises(Exception, match="pad_token, eos_token, additional"):
        check(bad.model, bad.method, "none")


def test_modules_to_save_copies_start_from_the_checkpoint():
    """Without a grown vocabulary the embedding and LM head are placeholders when PEFT copies
    them (modules_to_save): the copies must be read from the checkpoint too, not left as the
    zeros a deep copy of a placeholder becomes."""
    import torch

    from trainers.model.load import ModelSource

    cfg = compose(*LORA)
    source = ModelSource(cfg.model, cfg.method, torch.float32, cfg.seed)
    params = dict(source.load(source.skeleton(), torch.device("cpu")).named_parameters())
    source.close()
    for module in ("model.embed_tokens", "lm_head"):
        copy = params[f"base_model.model.{module}.modules_to_save.default.weight"]
        assert copy.requires_grad and copy.abs().sum() > 0
        assert torch.equal(copy, params[f"base_model.model.{module}.original_module.weight"])
