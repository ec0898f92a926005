"""The launcher's static half (validation, refusals, the estimate, the dry run) imports no
torch, DeepSpeed or transformers: a refusal or a dry run answers in about a second, and a
login node without the training stack can still check and submit a job. (A dry run of a
local model ends with one decoded training row, which needs its tokenizer: launch/sample_row.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

HEAVY = ("torch", "transformers", "deepspeed")
COMMANDS = [
    "model=8b dry_run=true",
    "model=70b method=qlora parallel=zero3 launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 dry_run=true",
    "model=8b parallel=fsdp2 launcher.nproc_per_node=2 dry_run=true",
    "model=8b parallel=pipeline launcher.nproc_per_node=2 dry_run=true",
    "model=8b objective=dpo data=reverse_pref dry_run=true",
    "parallel=pipeline method=prefix",  # refusals of a local model
    "+train.num_epochs=3",
    "objective=dpo objective.loss_type=nope",
]


@pytest.mark.parametrize("args", COMMANDS)
def test_static_half_imports_no_training_stack(args, tmp_path):
    out = subprocess.run([sys.executable, "-X", "importtime", "launch.py", *args.split(),
                          f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert len(imported) > 50, out.stderr[-2000:]  # -X importtime did report
    assert not imported & set(HEAVY), f"`python launch.py {args}` imported {sorted(imported & set(HEAVY))}"
