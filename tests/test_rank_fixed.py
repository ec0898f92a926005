"""The fixed part of a rank (docs/plans-and-memory.md): what every training process holds
whatever the model. A worker imports no library its plan does not use (each of these is
tens to 150 MiB per rank, measured by bench/rank_fixed.py), transformers' scipy import is
deferred until something calls it, and the host memory loading frees goes back to the
system. One fresh interpreter checks it all (the pytest process has imported everything)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

# What a rank of the plans below must not load: DeepSpeed only under zero*, trackers and
# plotting only on rank 0 when asked (and at the end), evaluation harness, merging and TRL never.
NOT_IN_A_WORKER = ("deepspeed", "lm_eval", "mergekit", "trl", "tensorboard", "matplotlib", "wandb", "mlflow",
                   "trackio", "datasets", "scipy")

PROBE = r"""
import ctypes, json, sys
from launch.lean_imports import defer_unused_imports
defer_unused_imports()                    # what launch.worker.run does first
from parallel import build_plan
import parallel.ddp, parallel.fsdp2, parallel.pipeline
import trainers.loop
from transformers import AutoConfig, AutoModelForCausalLM
from trainers.model.peft_methods import method_summary
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))   # a model is built
loaded = sorted(m for m in %(names)r if m in sys.modules)

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

# loading frees many small blocks below others still alive: they stay in RSS until trimmed
import torch
from trainers.model.load import release_freed_host_memory
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # train.host_memory=compact
blocks = [torch.empty(60 * 1024, dtype=torch.uint8).fill_(1) for _ in range(3000)]  # ~176 MiB, heap
keep = torch.empty(60 * 1024, dtype=torch.uint8).fill_(1)                          # above them
before = rss()
del blocks
freed = rss()
release_freed_host_memory()
trimmed = rss()

from transformers.loss import loss_for_object_detection as od
import numpy as np
rows, cols = od.linear_sum_assignment(np.array([[4.0, 1.0], [2.0, 0.0]]))
print(json.dumps({"loaded": loaded, "before": before, "freed": freed, "trimmed": trimmed,
                  "assignment": [rows.tolist(), cols.tolist()], "scipy_after_call": "scipy" in sys.modules}))
"""


@pytest.fixture(scope="module")
def probe():
    out = subprocess.run([sys.executable, "-c", PROBE % {"names": NOT_IN_A_WORKER}, str(REPO / "assets" / "tiny-llama")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_imports_no_library_its_plan_does_not_use(probe):
    assert probe["loaded"] == [], f"a rank of none/ddp/fsdp2/pipeline imported {probe['loaded']}"


def test_scipy_is_deferred_yet_the_function_still_works(probe):
    assert probe["assignment"] == [[0, 1], [1, 0]]
    assert probe["scipy_after_call"]


def test_host_memory_freed_by_loading_is_returned(probe):
    assert probe["before"] - probe["freed"] < 60, probe  # glibc kept the freed blocks...
    assert probe["freed"] - probe["trimmed"] > 120, probe  # ...until they were trimmed
