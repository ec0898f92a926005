"""Every optimizer of conf/optim trains the bundled model and resumes exactly from its
checkpoint; its refusals name what works.

One launch per optimizer runs 6 steps with a checkpoint at step 3; a copy of that run dir
is then cut back to step 3 (as if killed right after that commit: the later checkpoint
and the lines logged after it removed) and relaunched, all in two processes
(helpers.launch_many). The resumed steps 4-6 must equal the uninterrupted run's.
bitsandbytes keeps tensors below optim.min_8bit_size in 32 bits: 64 here, so the tiny
model's LoRA matrices get 8-bit state.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, launch_in_process, launch_many, losses, refused, rel, summary

RUNNABLE = ["adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "adafactor", "lion", "sgd"]
EXTRA = {"lion": ["optim.lr=1e-3", "optim.bits=8"], "sgd": ["optim.lr=0.05", "optim.momentum=0.9"],
         "adafactor": ["optim.beta1=0.9"]}


def overrides(name: str) -> list[str]:
    fast = [o for o in FAST if not o.startswith(("train.max_steps", "train.save_every"))]
    return [*fast, f"optim={name}", "train.max_steps=6", "train.save_every=3", "train.keep_last=2", "data.eval=null",
            "optim.warmup_steps=1", "train.report_to=[]", "train.checkpoint.mode=sync",
            *(["optim.min_8bit_size=64"] if name not in ("adafactor", "sgd", "paged_adamw32bit") else []),
            *EXTRA.get(name, [])]


def cut_back_to(run_dir: Path, step: int) -> None:
    """The run dir as a run killed right after committing checkpoint `step` leaves it."""
    ckpts = run_dir / "checkpoints"
    for d in ckpts.glob("step_*"):
        if int(d.name.removeprefix("step_")) > step:
            shutil.rmtree(d)
    (ckpts / "latest").write_text(f"step_{step}\n")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x).get("step", 0) <= step]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (run_dir / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "export", ignore_errors=True)


def epochs_overrides(data: Path) -> list[str]:
    """1.5 epochs of 40 unpacked rows at 4 x 2 rows per step: ceil(7.5) = 8 steps."""
    fast = [o for o in FAST if not o.startswith(("train.max_steps", "train.save_every"))]
    return [*fast, f"data.train={data}", "data.packing=false", "train.epochs=1.5", "train.save_every=3",
            "train.keep_last=3", "data.eval=null", "train.report_to=[]", "train.checkpoint.mode=sync"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every runnable optimizer, and an adamw run of train.epochs=1.5 ("epochs"), each
    resumed from its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("optimizers")
    data = root / "forty.jsonl"
    data.write_text("\n".join((REPO / "data" / "reverse" / "train.jsonl").read_text().splitlines()[:40]) + "\n")
    names = {**{n: overrides(n) for n in RUNNABLE}, "epochs": epochs_overrides(data)}
    first = launch_many(root / "first", {n: (root / n, o) for n, o in names.items()})
    (root / "epochs.log").write_text(first["epochs"].stdout + first["epochs"].stderr)
    for n in names:
        shutil.copytree(root / n, root / f"{n}-resumed")
        cut_back_to(root / f"{n}-resumed", 3)
    launch_many(root / "second", {n: (root / f"{n}-resumed", o) for n, o in names.items()})
    return root


@pytest.mark.parametrize("name", RUNNABLE)
def test_optimizer_trains_and_resumes_exactly(runs, name):
    full, resumed = losses(runs / name), losses(runs / f"{name}-resumed")
    assert sorted(full) == list(range(1, 7))
    assert full[6] < 0.9 * full[1], full  # it trains
    assert sorted(resumed) == list(range(1, 7))
    for s in (4, 5, 6):  # computed after the resume from step 3's checkpoint
        assert rel(resumed[s], full[s]) < 1e-6, (s, resumed[s], full[s])
    assert summary(runs / f"{name}-resumed")["final_step"] == 6


def test_optimizer_under_an_untested_plan_is_refused_naming_what_works(tmp_path):
    text = refused(tmp_path / "r", "optim=adafactor", "parallel=zero2", "launcher.nproc_per_node=2")
    assert "optim=adafactor under parallel=zero2" in text and "unfactored" in text
    assert "optim=adafactor runs under parallel=none|ddp;" in text and "use optim=adamw" in text


def test_epochs_become_steps_from_the_rows_and_resume_mid_epoch_exactly(runs):
    """The launcher derives max_steps from the prepared rows, says how, saves it in the run's
    config; a resume in the middle of the first epoch (step 3 of 5 per epoch) continues with
    the same rows (a step's rows depend on (seed, step) only), so the same losses."""
    from omegaconf import OmegaConf

    log = (runs / "epochs.log").read_text()
    assert ("train.epochs=1.5: 40 training rows (after packing) / global batch 8 = 5 steps per epoch -> "
            "train.max_steps=8") in log
    saved = OmegaConf.load(runs / "epochs" / "config.yaml")
    assert (saved.train.epochs, saved.train.max_steps) == (1.5, 8)
    full, resumed = losses(runs / "epochs"), losses(runs / "epochs-resumed")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for s in range(4, 9):
        assert rel(resumed[s], full[s]) < 1e-6, (s, resumed[s], full[s])
    assert summary(runs / "epochs-resumed")["final_step"] == 8


def test_epoch_arithmetic_for_a_weighted_mixture():
    """An epoch is as many rows as the sources hold together, drawn at the mixture's shares:
    300 + 100 rows weighted 1:3 at 32 rows per step is 12.5 steps per epoch; two epochs
    (25 steps, 800 rows) read the large file 400/300 times and the small one 400/100."""
    from trainers.data.epochs import EpochPlan, rows_per_step

    plan = EpochPlan(2, [("big", 300, 1.0), ("small", 100, 3.0)], 32)
    assert plan.steps == 25
    assert plan.passes() == [("big", pytest.approx(800 * 0.25 / 300)), ("small", pytest.approx(800 * 0.75 / 100))]
    assert "(passes per source: big 0.67, small 6.00)" in plan.line()
    assert EpochPlan(1, [("a", 33, 1.0)], 8).steps == 5  # the last, partial step completes the epoch
    cfg = {"train": {"micro_batch_size": 4, "grad_accum": 4}, "objective": {"name": "grpo", "num_generations": 8}}
    from omegaconf import OmegaConf

    assert rows_per_step(OmegaConf.create(cfg), 2) == 4  # GRPO: 16 completions per rank = 2 prompts, x 2 ranks


def test_dry_run_prints_the_epochs_steps_and_the_optimizer_state(tmp_path):
    proc = launch_in_process(tmp_path / "dry", "dry_run=true", "train.epochs=2", "optim=adamw8bit", "method=full",
                             "launcher.nproc_per_node=2", "parallel=ddp")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the bundled 4000 rows pack into bins of 64 tokens; 8 x 2 x 2 ranks = 32 rows per step
    line = next(x for x in out.splitlines() if x.startswith("  length"))
    rows = int(line.split(": ")[1].split(" training rows")[0].replace(",", ""))
    assert line.endswith(f"/ global batch 32 = {rows / 32:.4g} steps per epoch -> train.max_steps={-(-2 * rows // 32)}")
    assert "optimizer optim=adamw8bit, schedule cosine" in out
    assert "optim=adamw8bit, 2.04 B/trainable param" in out  # 2 x (1 + 4/256): 8-bit moments + absmax; norms (< min_8bit_size) 32-bit


@pytest.mark.parametrize("args, says", [
    (["train.epochs=2", "train.max_steps=100"], "train.max_steps=100 and train.epochs=2 are both set"),
    (["train.max_steps=null"], "train.max_steps and train.epochs are both null"),
    (["train.epochs=0"], "train.epochs=0 must be a number above 0"),
    (["optim.warmup_ratio=0.1", "optim.warmup_steps=5"], "optim.warmup_steps=5 and optim.warmup_ratio=0.1 are both"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio=1.5 must be a number in [0, 1)"),
    (["optim.schedule=polynomial", "optim.lr_end=0.1"], "optim.lr_end=0.1 must be a number >= 0 and below optim.lr"),
    (["optim.lr_embeddings=1e-5"], "method=lora does not train them"),
    (["optim=sgd", "optim.nesterov=true"], "above 0 with optim.nesterov=true"),
    (["optim=adafactor", "parallel=zero2", "launcher.nproc_per_node=2"], "unfactored"),
    (["optim=adamw8bit", "parallel=fsdp2", "launcher.nproc_per_node=2"], "under parallel=fsdp2 use optim=adamw"),
    (["optim=lion", "parallel=zero2", "launcher.nproc_per_node=2"], "KeyError 'exp_avg'"),
])
def test_bad_schedule_and_optimizer_settings_are_refused_naming_them(tmp_path, args, says):
    assert says in refused(tmp_path / "r", *args)


def test_bitsandbytes_without_cpu_optimizers_is_refused_on_cpu_naming_the_ones_that_run():
    from launch.optim_checks import bitsandbytes_refusal

    assert bitsandbytes_refusal("adamw8bit", (0, 50), cpu=True) is None  # the installed one: measured here
    old = bitsandbytes_refusal("paged_adamw8bit", (0, 43), cpu=True)
    assert "needs CUDA with the installed bitsandbytes 0.43" in old and "use optim=adamw|adafactor|sgd" in old
    assert bitsandbytes_refusal("lion", (0, 43), cpu=False) is None  # on GPUs it runs
    assert "bitsandbytes is not installed" in bitsandbytes_refusal("lion", None, cpu=False)


@pytest.mark.slow
def test_optimizer_state_reshards_from_one_process_to_ddp_over_two(runs):
    """bitsandbytes' 8-bit state (nested under its own key) and Adafactor's factored state
    saved by one process load into 2 ddp ranks (DCP; the global batch kept at 4 x 1 x 2
    rows): the resumed steps equal the uninterrupted single-process run's."""
    names = ["adamw8bit", "adafactor"]
    for n in names:
        shutil.copytree(runs / n, runs / f"{n}-ddp")
        cut_back_to(runs / f"{n}-ddp", 3)
    launch_many(runs / "ddp", {n: (runs / f"{n}-ddp", [*overrides(n), "parallel=ddp", "launcher.nproc_per_node=2",
                                                        "train.grad_accum=1"]) for n in names})
    for n in names:
        full, resharded = losses(runs / n), losses(runs / f"{n}-ddp")
        assert sorted(resharded) == list(range(1, 7))
        for s in (4, 5, 6):
            assert rel(resharded[s], full[s]) < 1e-5, (n, s, resharded[s], full[s])


def test_the_estimate_counts_each_optimizers_state_bytes():
    """Per trainable parameter: AdamW 8 B, 8-bit moments with their blockwise absmax (32-bit
    under optim.min_8bit_size elements), Lion one moment, SGD a momentum buffer or nothing; Adafactor a row and a column vector per
    matrix of the model's real shapes (counted on the bundled model's modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from launch.estimate import for_config
    from tests.helpers import compose

    def optim_bytes(*args):
        return for_config(compose("method=full", *args), "cpu").optim

    n = for_config(compose("method=full"), "cpu").trainable
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "assets" / "tiny-llama"))
    # bitsandbytes keeps tensors under min_8bit_size (4096) elements in 32 bits: here the norms
    small = sum(p.numel() for p in model.parameters() if p.numel() < 4096)
    assert 0 < small < n
    assert optim_bytes("optim=adamw") == 8 * n
    assert optim_bytes("optim=adamw8bit") == pytest.approx(2 * (1 + 4 / 256) * (n - small) + 8 * small)
    assert optim_bytes("optim=lion") == 4 * n and optim_bytes("optim=lion", "optim.bits=8") == pytest.approx(
        (1 + 4 / 256) * (n - small) + 4 * small)
    assert optim_bytes("optim=adamw8bit", "optim.min_8bit_size=0") == pytest.approx(2 * (1 + 4 / 256) * n)
    assert optim_bytes("optim=sgd") == 0 and optim_bytes("optim=sgd", "optim.momentum=0.9") == 4 * n
    factored = sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) for p in model.parameters())
    assert optim_bytes("optim=adafactor") == factored
    assert optim_bytes("optim=adafactor", "optim.beta1=0.9") == factored + 4 * n
    assert sum(p.numel() for p in model.parameters()) == n
