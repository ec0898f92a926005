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

from tests.helpers import FAST, launch_many, losses, refused, rel, summary

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    launch_many(root / "first", {n: (root / n, overrides(n)) for n in RUNNABLE})
    for n in RUNNABLE:
        shutil.copytree(root / n, root / f"{n}-resumed")
        cut_back_to(root / f"{n}-resumed", 3)
    launch_many(root / "second", {n: (root / f"{n}-resumed", overrides(n)) for n in RUNNABLE})
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
    assert "optim=adafactor runs under parallel=none|ddp" in text and "use optim=adamw" in text
