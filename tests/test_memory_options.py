"""train.activation_checkpointing and train.loss_chunk_tokens change memory, never the
numbers: under each plan, a run with activation checkpointing and a run with the loss
forced into small chunks have the same per-step losses as the same run without (rel 1e-5),
and each really did what it says (layers recomputed in backward; the lm_head returned the
chunked loss instead of logits), counted with module hooks by tests/memory_worker.py.

All runs share two launches: one process for parallel=none (LoRA and QLoRA), then one
2-process launch for fsdp2, zero3, pipeline, ddp, zero2 and zero3_offload, each running
its jobs one after another (about 1.5 minutes on 2 shared cores).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, losses, rel, summary

pytestmark = pytest.mark.slow

STEPS = 5
CHUNK = ["train.loss_chunk_tokens=16"]  # far below a micro-batch's target tokens
AC = ["train.activation_checkpointing=true"]
VARIANTS = {"off": [], "ac": AC, "chunk": CHUNK, "both": AC + CHUNK}
# Global batch 8 rows everywhere: two data-parallel ranks accumulate over 2 micro-batches
# (zero2: none), the pipeline cuts 4 x 2 rows into 2 pipeline micro-batches.
STAGE3 = ["parallel.stage3_param_persistence_threshold=0"]  # partition even tiny tensors
PLANS = {
    "none": ["parallel=none", "train.micro_batch_size=4", "train.grad_accum=2"],
    "fsdp2": ["parallel=fsdp2", "train.micro_batch_size=2", "train.grad_accum=2"],
    "zero3": ["parallel=zero3", "train.micro_batch_size=2", "train.grad_accum=2", *STAGE3],
    "pipeline": ["parallel=pipeline", "parallel.microbatches=2", "train.micro_batch_size=4", "train.grad_accum=2"],
    "ddp": ["parallel=ddp", "train.micro_batch_size=2", "train.grad_accum=2"],
    "zero2": ["parallel=zero2", "train.micro_batch_size=4", "train.grad_accum=1"],
    "zero3_offload": ["parallel=zero3_offload", "train.micro_batch_size=2", "train.grad_accum=2", *STAGE3],
}
# Evaluated at step 0 and at the end (the eval loss goes through lm_ce_sum without a
# backward; the pipeline's eval forward must keep returning logits).
EVALUATED = ("none", "zero3", "pipeline")
# Each option alone where the plans differ most; both at once for the remaining plans.
CASES = [("none", "lora"), ("none", "qlora"), ("fsdp2", "lora"), ("zero3", "lora"), ("pipeline", "lora")]
BOTH_CASES = [("ddp", "lora"), ("zero2", "lora"), ("zero3_offload", "lora")]


def _overrides(model, data, plan: str, method: str, variant: str) -> list[str]:
    evaluate = [f"data.eval={data.with_name('eval.jsonl')}", "data.metric_rows=2", "data.max_new_tokens=4",
                "train.eval_every=1000"]
    return [
        f"model.path={model}", f"data.train={data}", *(evaluate if plan in EVALUATED else ["data.eval=null"]),
        f"method={method}", "method.dropout=0",
        f"train.max_steps={STEPS}", "train.save_every=1000", *PLANS[plan], *VARIANTS[variant],
        *(["launcher.nproc_per_node=2"] if plan != "none" else []),
    ]


def _launch(out, runs: dict[str, list[str]], nproc: int) -> dict[str, list[dict]]:
    """Run `runs` in one launch of tests/memory_worker.py; name -> per-rank results."""
    out.mkdir(parents=True)
    (out / "runs.json").write_text(json.dumps(runs))
    start = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        [*start, str(REPO / "tests" / "memory_worker.py"), str(out), str(out / "runs.json")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((out / f"counts.rank{r}.json").read_text()) for r in range(nproc)]
    return {name: [r[name] for r in ranks] for name in runs}


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    """(plan, method, variant) -> (run dir, per-rank counts), every case run once."""
    root = tmp_path_factory.mktemp("memory-options")
    data = root / "train.jsonl"  # snapshots: 200 rows are plenty for 5 steps of 8
    for name, rows in (("train.jsonl", 200), ("eval.jsonl", 8)):
        lines = (REPO / "data" / "reverse" / name).read_text().splitlines()[:rows]
        (root / name).write_text("\n".join(lines) + "\n")
    cases = [(p, m, v) for p, m in CASES for v in ("off", "ac", "chunk")]
    cases += [(p, m, v) for p, m in BOTH_CASES for v in ("off", "both")]
    out = {}
    for nproc in (1, 2):
        runs = {"-".join(c): _overrides(tiny_model, data, *c) for c in cases if (c[0] == "none") == (nproc == 1)}
        for name, per_rank in _launch(root / f"nproc{nproc}", runs, nproc).items():
            out[tuple(name.split("-"))] = (root / f"nproc{nproc}" / name, per_rank)
    return out


def _run(results, plan, method, variant):
    run_dir, per_rank = results[(plan, method, variant)]
    failed = [r.get("error") for r in per_rank if r["status"] != "completed"]
    assert not failed, failed[0]
    return run_dir, {k: sum(r[k] for r in per_rank) for k in ("mlp_calls", "head_losses")}


@pytest.mark.parametrize("plan,method,variant", [(*c, v) for c in CASES for v in ("ac", "chunk")]
                         + [(*c, "both") for c in BOTH_CASES])
def test_same_losses_with_memory_option(results, plan, method, variant):
    ref_dir, ref = _run(results, plan, method, "off")
    run_dir, got = _run(results, plan, method, variant)
    want_losses, got_losses = losses(ref_dir), losses(run_dir)
    assert sorted(got_losses) == sorted(want_losses) == list(range(1, STEPS + 1))
    for step, value in want_losses.items():
        assert math.isfinite(value) and rel(got_losses[step], value) < 1e-5, (step, got_losses[step], value)
    if plan in EVALUATED:
        want_eval, got_eval = summary(ref_dir)["final_eval_loss"], summary(run_dir)["final_eval_loss"]
        assert math.isfinite(want_eval) and rel(got_eval, want_eval) < 1e-5, (got_eval, want_eval)

    assert ref["mlp_calls"] > 0 and ref["head_losses"] == 0  # auto never chunks the tiny vocabulary
    if variant in ("ac", "both"):  # every layer ran again in backward
        # (the pipeline's first step adds a shape-inference forward per stage, which
        # only the last stage's backward inference recomputes)
        extra = 1 if plan == "pipeline" else 0
        assert 2 * ref["mlp_calls"] - extra <= got["mlp_calls"] <= 2 * ref["mlp_calls"], (got, ref)
    else:
        assert got["mlp_calls"] == ref["mlp_calls"]
    if variant in ("chunk", "both"):  # every training micro-batch's loss came out of the lm_head, chunked
        assert got["head_losses"] >= STEPS * 2, (got, ref)
    else:
        assert got["head_losses"] == 0
