"""parallel=ddp with 2 processes reproduces the single-process losses (same global batch)."""
from __future__ import annotations

import pytest

from tests.helpers import fast_for, launch, losses, rel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_matches_single_process(tmp_path, tiny_model, method):
    common = [f"model.path={tiny_model}", f"method={method}", *fast_for(method)]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    launch(*common, "train.micro_batch_size=4", "train.grad_accum=2", f"hydra.run.dir={single}")
    launch(*common, "parallel=ddp", "launcher.nproc_per_node=2", "train.micro_batch_size=2",
           "train.grad_accum=2", f"hydra.run.dir={ddp}")
    want, got = losses(single), losses(ddp)
    assert sorted(got) == list(range(1, 11))
    assert max(rel(got[s], want[s]) for s in want) < 1e-5
