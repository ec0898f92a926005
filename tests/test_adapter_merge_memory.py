"""`python -m launch.merge adapters=true` holds the adapters, one output file and a few copies
of a tensor, not the base model: one merge of two rank-16 adapters on a random 385 MiB fp32
Llama (bench/adapter_merge_memory.py, a fresh process measured against its own import-only
baseline), checked for its memory, its files and its arithmetic. Loading the base whole, as
the merge did before, grew the private memory by 1.34x the model (docs/merging.md)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import REPO

SHARD_MIB = 16


@pytest.fixture(scope="module")  # slow: a 385 MiB model built and merged in a subprocess (~20 s)
def merge(tmp_path_factory) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from adapter_merge_memory import build_inputs, measure, model_mib

    work = tmp_path_factory.mktemp("adapter-merge-memory")
    base, adapters = build_inputs(work, layers=6)
    out = work / "out"
    return {"base": base, "adapters": adapters, "out": out, "model_mib": model_mib(base),
            **measure(base, adapters, out, shard_mib=SHARD_MIB)}


@pytest.mark.slow
def test_private_memory_stays_well_under_the_model(merge):
    assert merge["model_mib"] > 350
    # measured 140 MiB (0.36x): 16 MiB file being filled, ~4 copies of the 16 MiB largest tensor, the adapters
    assert merge["private_growth"] < 0.5 * merge["model_mib"], merge
    assert merge["maxrss_growth"] < 0.6 * merge["model_mib"], merge


@pytest.mark.slow
def test_written_in_files_of_out_shard_mib_with_the_adapter_merged(merge):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, base = merge["out"], merge["base"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 10 and set(index.values()) == {f.name for f in files}
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(base_index)
    for f in files:  # a file passes the limit only when its one tensor does
        assert f.stat().st_size <= SHARD_MIB * 2**20 + 4096 or len(safe_open(str(f), "pt").keys()) == 1, f

    def tensor(folder, weight_map, key):
        with safe_open(str(folder / weight_map[key]), "pt") as f:
            return f.get_tensor(key)

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and (out / "adapter" / "adapter_model.safetensors").exists()
    key = "model.layers.3.mlp.down_proj.weight"  # task_arithmetic = cat: base + sum of the two deltas (scale 1)
    delta = 0
    for folder in merge["adapters"]:
        a = load_file(folder / "adapter_model.safetensors")
        prefix = "base_model.model." + key.removesuffix(".weight")
        delta = delta + a[f"{prefix}.lora_B.weight"] @ a[f"{prefix}.lora_A.weight"]
    want = tensor(base, base_index, key) + delta
    torch.testing.assert_close(tensor(out, index, key), want, atol=1e-5, rtol=1e-5)
    embed = "model.embed_tokens.weight"  # not a LoRA target: copied as it is
    assert torch.equal(tensor(out, index, embed), tensor(base, base_index, embed))


# ------------------------------------------------------------------ which inputs keep the whole-model path
EXPORT_CONFIG = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "init_lora_weights": True, "modules_to_save": None,
                 "layer_replication": None, "trainable_token_indices": None, "use_dora": False, "kasa_config": None,
                 "target_modules": ["o_proj", "q_proj", "v_proj", "up_proj", "gate_proj", "down_proj", "k_proj"]}


@pytest.mark.parametrize("change,reason", [
    ({}, None),  # what a run's export/adapter records: streamed
    ({"target_modules": "all-linear", "init_lora_weights": "gaussian"}, None),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
    ({"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
    ({"init_lora_weights": "pissa_niter_2"}, "init_lora_weights='pissa_niter_2'"),
    ({"kasa_config": {}}, None),  # an empty config is no variant
    ({"use_bdlora": True}, "LoRA variant (use_bdlora)"),
    ({"target_modules": ["q_proj", "lm_head"]}, "embedding layer"),
    ({"target_modules": r".*\.(q_proj|embed_tokens)"}, "embedding layer"),
])
def test_only_adapters_that_read_the_base_load_it_whole(tmp_path, change, reason):
    from types import SimpleNamespace

    from launch.merging.adapters import needs_base_weights

    plain, other = tmp_path / "plain", tmp_path / "other"
    for folder, values in ((plain, EXPORT_CONFIG), (other, {**EXPORT_CONFIG, **change})):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(values))
    got = needs_base_weights([SimpleNamespace(adapter_dir=d, given=str(d)) for d in (plain, other)])
    assert got is None if reason is None else (reason in got and str(other) in got), got


def test_lora_variants_are_peft_s():
    import dataclasses

    from peft import LoraConfig

    from launch.merging.adapters import LORA_VARIANTS

    assert set(LORA_VARIANTS) == {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
