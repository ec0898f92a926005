"""The memory estimate, in-process (no weights, no processes): the presets' published
reference points, the plan layouts it reads, the load-time peak, and the refusal of a size
preset on the bundled toy data."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from launch.config import finalize, register_resolvers
from launch.estimate import GIB, check, for_config
from tests.helpers import REPO
from trainers.errors import UserError


def cfg_for(tmp_path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return finalize(compose("config", overrides=["launcher=slurm", *overrides]), str(tmp_path / "run"))


def one_gpu(gib: int) -> list[str]:
    return ["launcher.gpus_per_node=1", f"launcher.gpu_mem_gb={gib}"]


@pytest.mark.parametrize("overrides,budget,at_most", [
    (["model=8b", "method=lora", "parallel=none", *one_gpu(24)], 24, 24),      # LLaMA-Factory: 8B LoRA on 24 GB
    (["model=8b", "method=qlora", "parallel=none", *one_gpu(24)], 24, 12),     # 8B QLoRA under 12 GiB
    (["model=70b", "method=qlora", "parallel=none", *one_gpu(80)], 80, 60),    # QLoRA paper: 65B in 48 GB
    (["model=70b", "method=lora", "parallel=fsdp2", "launcher.gpu_mem_gb=80"], 80, 27.6 * 1.15),  # torchtune 27.6 GiB
])
def test_presets_fit_where_published_numbers_say_they_do(tmp_path, overrides, budget, at_most):
    est = check(cfg_for(tmp_path, *overrides))  # raises if it does not fit the budget
    assert est.total <= at_most * GIB, est.table(budget)


def test_full_finetune_of_70b_under_ddp_is_refused_with_what_would_fit(tmp_path):
    with pytest.raises(UserError) as e:
        check(cfg_for(tmp_path, "model=70b", "method=full", "parallel=ddp", "launcher.gpu_mem_gb=80"))
    text = str(e.value)
    assert "nothing was submitted" in text and "parallel=fsdp2 launcher.nodes=" in text and "method=qlora" in text


def test_bf16_halves_the_frozen_base_and_sharding_divides_it(tmp_path):
    fp32 = for_config(cfg_for(tmp_path, "model=8b", "method=lora", "parallel=none", "train.precision=fp32"))
    bf16 = for_config(cfg_for(tmp_path, "model=8b", "method=lora", "parallel=none", "train.precision=bf16"))
    fsdp = for_config(cfg_for(tmp_path, "model=8b", "method=lora", "parallel=fsdp2", "train.precision=bf16"))
    assert abs(bf16.params / fp32.params - 0.5) < 0.01
    assert abs(fsdp.params / bf16.params - 1 / 8) < 0.01  # 8 GPUs per node


def test_activation_checkpointing_and_chunked_loss_shrink_activations(tmp_path):
    base = ["model=8b", "method=lora", "parallel=none"]
    on = for_config(cfg_for(tmp_path, *base))
    off = for_config(cfg_for(tmp_path, *base, "train.activation_checkpointing=false", "train.loss_chunk_tokens=0"))
    assert on.activations < off.activations / 5


def test_loading_peak_counts_a_whole_4bit_model_before_sharding(tmp_path):
    """transformers quantizes the whole base on every rank before ZeRO-3 partitions it."""
    est = for_config(cfg_for(tmp_path, "model=70b", "method=qlora", "parallel=zero3"))
    assert est.load > est.train and est.total == est.load


def test_a_size_preset_on_the_toy_data_is_refused(tmp_path):
    from launch.validate import check_data_suits_model

    with pytest.raises(UserError, match="data.train=PATH"):
        check_data_suits_model(cfg_for(tmp_path, "model=8b"))
    check_data_suits_model(cfg_for(tmp_path, "model=8b", "data.train=/data/mine.jsonl"))
    check_data_suits_model(cfg_for(tmp_path))  # model=tiny: the toy data is its data


def test_gradients_and_activations_add_up_only_across_micro_batches(tmp_path):
    """One forward per step: backward frees activations as it creates gradients, so full
    fine-tuning peaks at the larger of the two (measured: bench/memory_estimate.py, full
    fp32 rows within 2 %); with accumulation the first micro-batch's gradients are alive
    during the second's forward; DDP's buckets are kept across steps either way."""
    base = ["model=8b", "method=full", "train.micro_batch_size=1"]
    one = for_config(cfg_for(tmp_path, *base, "parallel=fsdp2", "train.grad_accum=1"))
    two = for_config(cfg_for(tmp_path, *base, "parallel=fsdp2", "train.grad_accum=2"))
    assert one.grads_and_activations == max(one.grads, one.activations)
    assert two.grads_and_activations == two.grads + two.activations
    ddp = for_config(cfg_for(tmp_path, *base, "parallel=ddp", "train.grad_accum=1"))
    assert ddp.grads_and_activations == ddp.grads / 2 + max(ddp.activations, ddp.grads / 2)
