"""Export: the adapter reloads with peft and the merged model computes the same logits.

Every method's export comes from the shared 30-step runs of tests/test_methods.py
(conftest.method_runs, slow); the fast tier checks LoRA's on tests/test_loop.py's run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.helpers import REPO

BUNDLED = REPO / "assets" / "tiny-llama"  # the method runs' base (model=tiny)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 90, (2, 24), generator=g)


def assert_merged_equals_base_plus_adapter(run: Path, base_path: Path) -> None:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run / "export" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    x = _inputs()
    with torch.no_grad():
        want, got, before = with_adapter(input_ids=x).logits, merged(input_ids=x).logits, plain(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3  # the adapter did train something
    # one file, or numbered files of at most train.export_shard_mib and the index naming them
    out = run / "export" / "merged"
    files, index = {f.name for f in out.glob("*.safetensors")}, out / "model.safetensors.index.json"
    assert files == {"model.safetensors"} or set(json.loads(index.read_text())["weight_map"].values()) == files


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_equals_base_plus_adapter(method_runs, method):
    assert_merged_equals_base_plus_adapter(method_runs[method], BUNDLED)


@pytest.mark.slow
def test_qlora_merge_uses_the_dequantized_base(method_runs):
    from omegaconf import OmegaConf
    from peft import PeftModel

    run = method_runs["qlora"]
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
    cfg = OmegaConf.load(run / "config.yaml")
    reference = PeftModel.from_pretrained(dequantized_base(cfg.model, cfg.method), run / "export" / "adapter").eval()
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def dequantized_base(model_cfg, method_cfg):
    """The 4-bit base as training saw it, in fp32 on CPU: each Linear4bit replaced by the
    nn.Linear of its dequantized weight (what the streaming export must reproduce)."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight

    from trainers.model.load import load_quantized_model

    model = load_quantized_model(model_cfg, method_cfg, torch.device("cpu"))
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = dequantize_module_weight(child).float().cpu()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.float().cpu()
                setattr(module, child_name, linear)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return model.float()


@pytest.mark.slow
def test_full_finetune_exports_a_plain_model(method_runs):
    run = method_runs["full"]
    # train.export_shard_mib=0.1 (conftest): the model is streamed out in several files + an index
    out = run / "export" / "merged"
    files = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) >= 3 and set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # a file passes the limit only when a single tensor does
        assert f.stat().st_size <= 0.1 * 2**20 + 4096 or len(safe_open(str(f), "pt").keys()) == 1, f
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in plain.named_parameters()]
    diff = max((a - b).abs().max().item() for a, b in zip(merged.parameters(), plain.parameters()))
    assert diff > 1e-4 and not (run / "export" / "adapter").exists()
