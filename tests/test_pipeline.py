"""parallel=pipeline: the same losses as one process (2 stages, and 2 stages x 2 data-parallel),
exact resume after SIGKILL, an export that loads as a plain HF model, and refusals; the
layer split, in-process.

Runs are shared between tests (module-scoped cache): each `launch` costs tens of seconds,
so the tests that launch are marked slow; the refusals and the layer split run in-process.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import (FAST, REPO, kill_once_committed, launch, launched_once, losses, metrics, refused, start,
                           summary)

# FAST without the LoRA-only dropout key; 8 rows per step (4 x 2).
COMMON = [a for a in FAST if not a.startswith("method.dropout")] + ["data.metric_rows=4"]
METHOD = {"full": ["method=full"], "lora": ["method=lora", "method.dropout=0"],
          "qlora": ["method=qlora", "method.dropout=0"]}
# Global batch 8 rows: 2 stages x 1 dp with 4 x 2 rows, 2 stages x 2 dp with 4 x 1 rows each.
PP2 = ["parallel=pipeline", "parallel.stages=2", "launcher.nproc_per_node=2"]
PP2x2 = ["parallel=pipeline", "parallel.stages=2", "launcher.nproc_per_node=4", "train.grad_accum=1",
         "parallel.microbatches=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """name -> run dir, launched on first use."""
    get = launched_once(tmp_path_factory.mktemp("pipeline-runs"))
    return lambda name, *args: get(name, f"model.path={tiny_model}", *COMMON, *args)[0]


def _assert_same_losses(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert sorted(got) == list(range(1, 11)) and want.keys() == got.keys()
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=rel), (s, got[s], want[s])


def _evals(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["eval_loss"], r["eval_exact_match"]) for r in metrics(run) if "eval_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method,schedule", [("full", "1f1b"), ("lora", "gpipe"), ("qlora", "1f1b")])
def test_two_stages_match_single_process(runs, method, schedule):
    ref = runs(f"ref-{method}", *METHOD[method])
    pp = runs(f"pp2-{method}", *METHOD[method], *PP2, f"parallel.schedule={schedule}")
    # QLoRA's 4-bit layers compute in bf16, and a pipeline micro-batch has another shape
    # than the single process's (the step's rows padded to one width, cut in
    # parallel.microbatches): bf16 rounding inside the matmuls moves the losses by up to
    # 1.4e-5 (measured; the loaded 4-bit weights are byte-identical: test_loading.py)
    tolerance = 1e-4 if method == "qlora" else 1e-5
    _assert_same_losses(losses(pp), losses(ref), rel=tolerance)
    # eval through the pipeline: the same eval loss (and exact match) at step 0 and at the end
    for (s1, l1, em1), (s2, l2, em2) in zip(_evals(pp), _evals(ref), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=tolerance) and em1 == em2
    s = summary(pp)
    assert s["status"] == "completed" and s["plan"] == "pipeline" and s["world_size"] == 2
    assert s["tokens_seen"] == summary(ref)["tokens_seen"]


@pytest.mark.slow
def test_two_stages_by_two_data_parallel_match_single_process(runs):
    ref = runs("ref-lora", *METHOD["lora"])
    pp = runs("pp2x2-lora", *METHOD["lora"], *PP2x2)
    _assert_same_losses(losses(pp), losses(ref))
    assert summary(pp)["tokens_seen"] == summary(ref)["tokens_seen"]


@pytest.mark.slow
def test_sigkill_resume_then_export_loads_as_plain_model(runs, tiny_model, tmp_path):
    """2 stages x 2 dp, full fine-tuning: killed once the first checkpoint exists, then
    relaunched: the losses are those of one process; the export is a plain HF model that
    computes what the single-process export computes."""
    from transformers import AutoModelForCausalLM

    ref = runs("ref-full", *METHOD["full"])
    args = [f"model.path={tiny_model}", *COMMON, *METHOD["full"], *PP2x2, "train.save_every=3"]
    run = tmp_path / "run"
    killed_at = kill_once_committed(start(run, *args), run)
    assert not (run / "summary.json").exists()
    assert killed_at < 10

    out = launch(*args, f"hydra.run.dir={run}")
    assert f"resumed from {run / 'checkpoints'}" in out.stderr + out.stdout
    _assert_same_losses(losses(run), losses(ref))
    assert summary(run)["status"] == "completed"

    merged, want = run / "export" / "merged", ref / "export" / "merged"
    got_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(want, dtype=torch.float32).eval()
    assert got_model.state_dict().keys() == ref_model.state_dict().keys()
    x = torch.randint(10, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got_model(input_ids=x).logits, ref_model(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert max((a - b).abs().max().item() for a, b in zip(got_model.parameters(), base.parameters())) > 1e-4


REFUSALS = {
    "microbatches<stages": (["parallel.microbatches=1"], "schedule=1f1b needs parallel.microbatches >= parallel.stages"),
    "stages>layers": (["parallel.stages=4", "launcher.nproc_per_node=4"], "the model has only 2 decoder layers"),
    "interleaved>layers": (["parallel.schedule=interleaved_1f1b"], "4 pipeline stages (2 virtual per process)"),
    "world%stages": (["launcher.nproc_per_node=3"], "must be a multiple of parallel.stages (2)"),
    "rows%microbatches": (["parallel.microbatches=3"], "which parallel.microbatches=3 does not divide"),
    "prefix": (["method=prefix"], "prefix tuning feeds learned key/values"),
    "prompt": (["method=prompt"], "prompt tuning prepends virtual tokens"),
}


def test_refusal_exits_before_spawning_with_message(tiny_model, tmp_path):
    """Through the launcher's entry point, in-process (helpers.refused): exit code 2, the
    message, no traceback, nothing handed to the launcher, nothing run."""
    args, message = REFUSALS["microbatches<stages"]
    assert message in refused(tmp_path / "run", f"model.path={tiny_model}", *COMMON, *PP2, *args)


def _pre_spawn_check(model_path, tmp_path, *overrides: str) -> str:
    """The launcher's pre-spawn validation (launch.validate.check) in-process: its message."""
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from launch.validate import check
    from trainers.errors import UserError

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"model.path={model_path}", *COMMON, *PP2, *overrides])
    try:
        check(finalize(cfg, str(tmp_path)))
    except UserError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("case", list(REFUSALS))
def test_invalid_settings_are_refused(tiny_model, tmp_path, case):
    args, message = REFUSALS[case]
    assert message in _pre_spawn_check(tiny_model, tmp_path, *args)


def test_tied_embeddings_refused_for_full_only(tmp_path):
    from transformers import AutoConfig

    from tests.conftest import build_tiny_model

    tied = build_tiny_model(tmp_path / "tied")
    config = AutoConfig.from_pretrained(tied)
    config.tie_word_embeddings = True
    config.save_pretrained(tied)
    assert "ties its input and output embeddings" in _pre_spawn_check(tied, tmp_path, "method=full")
    assert _pre_spawn_check(tied, tmp_path, "method=lora") == ""


def test_layers_split_into_contiguous_balanced_ranges_extra_layers_first():
    from parallel.pipeline import round_up, split_layers

    assert split_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert split_layers(2, 2) == [range(0, 1), range(1, 2)]
    assert split_layers(7, 1) == [range(0, 7)]
    for n in range(1, 41):
        for chunks in range(1, n + 1):
            parts = split_layers(n, chunks)
            assert len(parts) == chunks and [i for p in parts for i in p] == list(range(n)), (n, chunks)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1, (n, chunks, sizes)
            assert sizes == sorted(sizes, reverse=True), (n, chunks, sizes)  # the last chunk also has the head
    assert [round_up(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [0, 8, 8, 16, 16, 24]
