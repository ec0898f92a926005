"""No rank holds weights its plan does not keep: FSDP2 ranks read and hold half of the
checkpoint, ZeRO-3 ranks hold their partitions, pipeline stages read their own layers; the
weights they end up with are exactly the checkpoint's. Frozen bases live in the compute
dtype. (Parity of losses with the single process is in each plan's own tests.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trainers.distributed import free_port
from tests.conftest import build_tiny_model
from tests.helpers import REPO

CASES = {
    "fsdp2-full": ["parallel=fsdp2", "method=full"],
    "fsdp2-lora-bf16": ["parallel=fsdp2", "method=lora", "train.precision=bf16"],
    "zero3-full": ["parallel=zero3", "method=full", "parallel.stage3_param_persistence_threshold=0"],
    "pipeline-full": ["parallel=pipeline", "method=full"],
}
# what a bf16 ZeRO-3 LoRA run computes with (its export is DeepSpeed's fp32 masters)
ZERO3_BF16 = {"zero3-lora-bf16": ["parallel=zero3", "method=lora", "train.precision=bf16",
                                  "parallel.stage3_param_persistence_threshold=0"]}
# 4-bit bases: ddp loads through transformers' from_pretrained (the reference); fsdp2, zero3
# and the pipeline quantize from the skeleton, tensor by tensor, only what they keep.
QLORA_CASES = {
    "ddp-qlora": ["parallel=ddp", "method=qlora"],
    "fsdp2-qlora": ["parallel=fsdp2", "method=qlora"],
    "pipeline-qlora": ["parallel=pipeline", "method=qlora"],
    "zero3-qlora": ["parallel=zero3", "method=qlora"],
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loading")
    model = build_tiny_model(tmp / "model", layers=4)
    (tmp / "cases.json").write_text(json.dumps({**CASES, **QLORA_CASES, **ZERO3_BF16}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "load_worker.py"), str(tmp), str(model), str(tmp / "cases.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp / f"load.rank{r}.json").read_text()) for r in (0, 1)]
    for case in {**CASES, **QLORA_CASES, **ZERO3_BF16}:
        for r in ranks:
            assert "error" not in r[case], f"{case}: {r[case].get('error')}"
    return ranks


@pytest.mark.slow
def test_fsdp2_ranks_read_and_hold_half_of_the_checkpoint(loaded):
    for rank in loaded:
        rec = rank["fsdp2-full"]
        assert rec["read"] <= 0.55 * rec["checkpoint"], rec
        assert rec["held"]["trainable"] <= 0.55 * rec["checkpoint"], rec
    assert sum(r["fsdp2-full"]["read"] for r in loaded) == loaded[0]["fsdp2-full"]["checkpoint"]


@pytest.mark.slow
def test_zero3_ranks_hold_their_partitions_only(loaded):
    for rank in loaded:
        rec = rank["zero3-full"]
        assert rec["held"]["trainable"] <= 0.55 * rec["checkpoint"], rec


@pytest.mark.slow
def test_pipeline_stages_read_their_own_layers(loaded):
    reads = [r["pipeline-full"]["read"] for r in loaded]
    total = loaded[0]["pipeline-full"]["checkpoint"]
    assert sum(reads) == total and max(reads) <= 0.6 * total, (reads, total)
    for rank in loaded:
        rec = rank["pipeline-full"]
        assert rec["held"]["trainable"] == rec["read"], rec  # a stage keeps exactly what it read


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_weights_are_exactly_the_checkpoints(loaded, case):
    rec = loaded[0][case]
    assert rec["compared"] >= 4 * 9 and rec["mismatched"] == [], rec


@pytest.mark.slow
def test_frozen_base_in_the_compute_dtype_adapters_in_fp32(loaded):
    for rank in loaded:
        rec = rank["fsdp2-lora-bf16"]
        assert rec["dtypes"] == [f"frozen:{torch.bfloat16}", f"trainable:{torch.float32}"], rec
        assert rec["held"]["frozen"] <= 0.55 * rec["checkpoint"] / 2, rec  # bf16 halves, fsdp2 halves


@pytest.mark.slow
def test_zero3_bf16_adapters_compute_in_bf16(loaded):
    """DeepSpeed keeps the fp32 masters in its optimizer and casts a model to bf16, except
    a ZeRO-Init one: the plan casts the fresh adapters itself, or PEFT would compute each
    adapted linear in fp32 on an fp32 copy of its input (0.3 GiB more at 360M parameters)."""
    for rank in loaded:
        rec = rank["zero3-lora-bf16"]
        assert rec["dtypes"] == [f"frozen:{torch.bfloat16}", f"trainable:{torch.bfloat16}"], rec


@pytest.mark.slow
def test_4bit_bases_load_in_parts_and_quantize_exactly_as_transformers(loaded):
    """fsdp2 shards each unit as soon as it is quantized, ZeRO-3 partitions each module as soon
    as it is quantized, a pipeline stage quantizes only its own layers: all end with the very
    bytes (packed weights) that transformers' from_pretrained quantization gives the whole
    model under ddp."""
    # every weight (4-bit packed or bf16) and adapter; ddp's export also lists the 4-bit
    # weights' quantization state (absmax, quant_map: "<weight>.absmax", ...)
    reference = {k: v for k, v in loaded[0]["ddp-qlora"]["digests"].items() if ".weight." not in k}
    assert sum(k.endswith("base_layer.weight") for k in reference) >= 4 * 7  # every layer's linears
    for case in ("fsdp2-qlora", "pipeline-qlora"):
        got = {k: v for k, v in loaded[0][case]["digests"].items() if ".weight." not in k}
        assert got == reference, case
    # ZeRO-3 exports its other frozen weights as fp32 (its masters' dtype): the packed 4-bit
    # weights are the bytes to compare.
    got = loaded[0]["zero3-qlora"]["digests"]
    assert {k for k in got if ".weight." not in k} == set(reference)
    assert {k: got[k] for k in reference if k.endswith("base_layer.weight")} == {
        k: v for k, v in reference.items() if k.endswith("base_layer.weight")}
    whole = loaded[0]["ddp-qlora"]["held"]["frozen"]
    for rank in loaded:
        assert rank["fsdp2-qlora"]["held"]["frozen"] <= 0.55 * whole, rank["fsdp2-qlora"]
        assert rank["zero3-qlora"]["held"]["frozen"] <= 0.55 * whole, rank["zero3-qlora"]
    reads = [r["pipeline-qlora"]["read"] for r in loaded]
    total = loaded[0]["pipeline-qlora"]["checkpoint"]
    assert sum(reads) == total and max(reads) <= 0.6 * total, (reads, total)
