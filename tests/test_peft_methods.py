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

from tests.helpers import (FAST, REPO, assert_resumed_exactly, assert_trains_like, launch_many, metrics, refused,
                           rel, summary)

STEPS = 10
RUNS = {  # name -> the method's overrides
    # tinit 2, tfinal 3 of 10 steps: full rank, a mask every step, then the final ranks
    "adalora": ["method=adalora", "method.tinit=2", "method.tfinal=3", "method.init_r=6", "method.target_r=3"],
    "vera": ["method=vera", "method.r=32"],
    "pissa": ["method=lora", "method.init_lora_weights=pissa_niter_2", "method.r=4"],
    # an 8-bit base (bitsandbytes LLM.int8 on CPU), the LM head trained in full beside the adapter
    "int8": ["method=lora", "method.quantize=int8", "method.r=4", "method.modules_to_save=[lm_head]"],
}
RESUMES = {"adalora": (4, 8), "vera": (4,), "pissa": (4,), "int8": (4,)}  # steps the resumed copies start from


EVAL_ROWS = 16


def common(eval_file: Path) -> list[str]:
    # the bundled (trained) base: its loss falls within 10 steps, a random one's barely moves;
    # a small eval set and no forgetting probes: the evals are not what is tested here
    return [*FAST, f"train.max_steps={STEPS}", "optim.warmup_steps=0", "optim.schedule=constant",
            "train.save_every=4", "train.keep_last=5", f"data.eval={eval_file}", "eval.probes=null",
            "data.metric_rows=2"]


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
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-methods")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("\n".join((REPO / "data" / "reverse" / "eval.jsonl").read_text().splitlines()[:EVAL_ROWS]) + "\n")
    first = {}
    for name, method in RUNS.items():
        first[name] = (root / name, [*common(eval_file), *method])
        first[f"{name}_ddp"] = (root / f"{name}_ddp", [*common(eval_file), *method, "parallel=ddp",
                                                       "launcher.nproc_per_node=2", "train.micro_batch_size=2"])
    launch_many(root / "first", first)
    resumed = {}
    for name, steps in RESUMES.items():
        for step in steps:
            copy = cut_back_to(root / name, root / f"{name}_from_{step}", step)
            resumed[copy.name] = (copy, [*common(eval_file), *RUNS[name]])
    launch_many(root / "resumed", resumed)
    return {name: run_dir for name, (run_dir, _) in {**first, **resumed}.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_trains_with_ddp_parity(runs, name):
    # each step is another batch, so the held-out loss says whether it learned: 7.9 before,
    # measured after 10 steps 4.9 (adalora), 5.8 (vera), 3.0 (pissa), 1.0 (int8)
    before = next(r["eval_loss"] for r in metrics(runs[name]) if r["step"] == 0 and "eval_loss" in r)
    assert summary(runs[name])["status"] == "completed"
    assert summary(runs[name])["final_eval_loss"] < 0.8 * before, (before, summary(runs[name]))
    if name != "int8":
        assert_trains_like(runs[f"{name}_ddp"], runs[name], STEPS)
        return
    # Not bitwise parity: LLM.int8 quantizes activations per row in bf16 kernels whose sums
    # depend on the micro-batch shape, and the difference compounds (measured: loss 1e-4 at
    # step 2, at most 1.4e-2 over 10 steps; grad norm at most 1.8e-2)
    ref = {r["step"]: r for r in metrics(runs[name]) if "loss" in r}
    got = {r["step"]: r for r in metrics(runs[f"{name}_ddp"]) if "loss" in r}
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step, r in ref.items():
        assert rel(got[step]["loss"], r["loss"]) < 3e-2 and rel(got[step]["grad_norm"], r["grad_norm"]) < 5e-2, step


@pytest.mark.slow
@pytest.mark.parametrize("name,step", [(n, s) for n, steps in RESUMES.items() for s in steps])
def test_resumes_exactly(runs, name, step):
    assert_resumed_exactly(runs[f"{name}_from_{step}"], runs[name], STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS if n != "int8"])
def test_merged_export_is_base_plus_adapter(runs, name):
    from tests.test_export import BUNDLED, assert_merged_equals_base_plus_adapter

    assert_merged_equals_base_plus_adapter(runs[name], BUNDLED)


@pytest.mark.slow
def test_adalora_prunes_to_its_budget_and_exports_the_pattern(runs):
    from safetensors.torch import load_file

    config = json.loads((runs["adalora"] / "export" / "adapter" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    kept = sum(sum(v) for v in pattern.values())
    assert config["peft_type"] == "ADALORA" and len(pattern) == 4 * 7  # 4 layers x 7 linears
    assert kept == 3 * len(pattern)  # target_r on average
    assert len({sum(v) for v in pattern.values()}) > 1  # ranks differ by layer
    tensors = load_file(runs["adalora"] / "export" / "adapter" / "adapter_model.safetensors")
    for name, keep in pattern.items():  # PEFT saves each adapter cut to its kept ranks
        e = tensors[f"base_model.model.{name}"].flatten()
        assert e.numel() == sum(keep) and bool((e != 0).all()), name


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


@pytest.mark.slow
def test_int8_merge_uses_the_dequantized_base_and_the_trained_head(runs):
    """The merged model is the 8-bit base as training multiplied with (int8 codes x row
    scales, dequantized) plus the adapter, with the LM head trained in full."""
    import bitsandbytes as bnb
    import torch
    from omegaconf import OmegaConf
    from peft import PeftModel
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM

    from tests.test_export import BUNDLED, _inputs
    from trainers.model.load import load_quantized_model

    run = runs["int8"]
    cfg = OmegaConf.load(run / "config.yaml")
    base = load_quantized_model(cfg.model, cfg.method, torch.device("cpu"))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in base.modules())
    for module in list(base.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear8bitLt):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight.data = dequantize_module_weight(child).float()
                setattr(module, child_name, linear)
    base.config.quantization_config = None
    base.hf_quantizer, base.is_quantized = None, False
    reference = PeftModel.from_pretrained(base.float(), run / "export" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    assert (merged.lm_head.weight - plain.lm_head.weight).abs().max() > 1e-4  # the head trained
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [["method=adalora"], ["method=vera", "method.r=64"]])
def test_estimate_counts_the_trainable_parameters_peft_creates(method):
    from transformers import AutoConfig, AutoModelForCausalLM

    from launch.estimate import arch_of, setup_of, trainable_params
    from tests.helpers import compose
    from trainers.model.peft_methods import apply_method

    cfg = compose(*method)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
    peft = apply_method(model, cfg.method)
    built = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert trainable_params(arch_of(cfg.model), setup_of(cfg)) == built
