"""AdaLoRA, VeRA and PiSSA initialisation (docs/peft-methods.md): each trains with its loss
falling, 2 ddp processes give the single process's losses, lrs and grad norms
(method.dropout=0), a resume from a mid-run checkpoint ends exactly like the run that never
stopped, and the export's merged model is base + exported adapter. Every run is launched
once, in two processes in all (helpers.launch_many), and checked by several tests; the
refusals run in-process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import (FAST, assert_resumed_exactly, assert_trains_like, launch_many, losses, refused,
                           summary)

STEPS = 10
RUNS = {  # name -> the method's overrides
    # tinit 2, tfinal 3 of 10 steps: full rank, a mask every step, then the final ranks
    "adalora": ["method=adalora", "method.tinit=2", "method.tfinal=3", "method.init_r=6", "method.target_r=3"],
    "vera": ["method=vera", "method.r=32"],
    "pissa": ["method=lora", "method.init_lora_weights=pissa_niter_2", "method.r=4"],
}
RESUMES = {"adalora": (4, 8), "vera": (4,), "pissa": (4,)}  # steps the resumed copies start from


def common(tiny_model) -> list[str]:
    return [f"model.path={tiny_model}", *FAST, f"train.max_steps={STEPS}", "optim.warmup_steps=0",
            "optim.schedule=constant", "train.save_every=4", "train.keep_last=5"]


def cut_back_to(run: Path, copy: Path, step: int) -> Path:
    """A copy of the finished `run` as it stood when checkpoint `step` was its newest: later
    checkpoints, metrics, summary and export gone, so the relaunch must redo them."""
    shutil.copytree(run, copy)
    for d in (copy / "checkpoints").glob("step_*"):
        if int(d.name.removeprefix("step_")) > step:
            shutil.rmtree(d)
    (copy / "checkpoints" / "latest").write_text(f"step_{step}")
    for name in ("summary.json", "export", "tensorboard"):
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step))
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-methods")
    first = {}
    for name, method in RUNS.items():
        first[name] = (root / name, [*common(tiny_model), *method])
        first[f"{name}_ddp"] = (root / f"{name}_ddp", [*common(tiny_model), *method, "parallel=ddp",
                                                       "launcher.nproc_per_node=2", "train.micro_batch_size=2"])
    launch_many(root / "first", first)
    resumed = {}
    for name, steps in RESUMES.items():
        for step in steps:
            copy = cut_back_to(root / name, root / f"{name}_from_{step}", step)
            resumed[copy.name] = (copy, [*common(tiny_model), *RUNS[name]])
    launch_many(root / "resumed", resumed)
    return {name: run_dir for name, (run_dir, _) in {**first, **resumed}.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_trains_with_ddp_parity(runs, name):
    curve = losses(runs[name])
    assert summary(runs[name])["status"] == "completed"
    assert curve[STEPS] < 0.8 * curve[1], curve
    assert_trains_like(runs[f"{name}_ddp"], runs[name], STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name,step", [(n, s) for n, steps in RESUMES.items() for s in steps])
def test_resumes_exactly(runs, name, step):
    assert_resumed_exactly(runs[f"{name}_from_{step}"], runs[name], STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_merged_export_is_base_plus_adapter(runs, name, tiny_model):
    from tests.test_export import assert_merged_equals_base_plus_adapter

    assert_merged_equals_base_plus_adapter(runs[name], Path(tiny_model))


@pytest.mark.slow
def test_adalora_prunes_to_its_budget_and_exports_the_pattern(runs):
    from safetensors.torch import load_file

    config = json.loads((runs["adalora"] / "export" / "adapter" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    kept = sum(sum(v) for v in pattern.values())
    assert config["peft_type"] == "ADALORA" and len(pattern) == 2 * 7  # 2 layers x 7 linears
    assert kept == 3 * len(pattern)  # target_r on average
    assert len({sum(v) for v in pattern.values()}) > 1  # ranks differ by layer
    tensors = load_file(runs["adalora"] / "export" / "adapter" / "adapter_model.safetensors")
    for name, keep in pattern.items():
        e = tensors[f"base_model.model.{name}.weight"].flatten()
        assert all(bool(k) or float(x) == 0.0 for k, x in zip(keep, e)), name  # pruned singular values are 0


@pytest.mark.slow
def test_pissa_adapter_is_exported_as_plain_lora_on_the_original_base(runs):
    config = json.loads((runs["pissa"] / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 64 and config["init_lora_weights"] is True


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,says", [
    (["method=adalora", "parallel=fsdp2", "launcher.nproc_per_node=2"], ["method=adalora", "parallel=ddp", "method=lora"]),
    (["method=adalora", "parallel=zero3", "launcher.nproc_per_node=2"], ["method=adalora", "parallel=ddp"]),
    (["method=adalora", "method.tinit=8", "method.tfinal=3", "train.max_steps=10"], ["tinit < total_step - tfinal"]),
    (["method=adalora", "method.target_r=20"], ["target_r <= init_r"]),
    (["method.init_lora_weights=loftq"], ["LoftQ", "method=qlora"]),
    (["method.init_lora_weights=eva"], ["data pass", "pissa"]),
    (["method.init_lora_weights=svd"], ["pissa_niter_N", "olora"]),
    (["method=qlora", "method.init_lora_weights=pissa"], ["re-quantized", "init_lora_weights=true"]),
    (["method.init_lora_weights=olora", "parallel=fsdp2", "launcher.nproc_per_node=2"], ["parallel=ddp"]),
    (["method=vera", "method.r=0"], ["method.r=0"]),
])
def test_refused_before_launch_naming_what_works(tmp_path, tiny_model, overrides, says):
    out = refused(tmp_path, f"model.path={tiny_model}", *overrides)
    for text in says:
        assert text in out, (text, out)
