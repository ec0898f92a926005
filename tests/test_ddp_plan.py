"""parallel=ddp with 2 processes reproduces the single-process losses (same global batch)."""
from __future__ import annotations

import pytest

from tests.helpers import fast_for, launch, losses, rel




@pytest.mark.slow
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


@pytest.mark.parametrize("world", [2, 3])
def test_each_ddp_rank_stages_a_disjoint_share_of_the_checkpoint(world):
    """What each ddp rank hands DCP to stage and write: every parameter's weights and
    optimizer state on exactly one rank, together, the bytes balanced; param_groups on all."""
    import torch

    from parallel.ddp import rank_share

    sizes = [64, 48, 32, 16, 16, 8, 8, 4]
    model = {f"p{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    optim = {"state": {n: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t), "step": torch.tensor(3.0)}
                       for n, t in model.items()},
             "param_groups": [{"lr": 1e-3, "params": list(model)}]}
    shares = [rank_share({"model": model, "optim": optim}, r, world) for r in range(world)]
    owners = [set(s["model"]) for s in shares]
    assert sorted(n for o in owners for n in o) == sorted(model)  # each on exactly one rank
    assert all(set(s["optim"]["state"]) == o for s, o in zip(shares, owners))  # weights + state together
    assert all(s["optim"]["param_groups"] == optim["param_groups"] for s in shares)
    total = [sum(model[n].numel() for n in o) for o in owners]
    assert max(total) <= sum(sizes) / world + max(sizes)  # greedy balance: within one tensor
    assert max(total) < sum(sizes)  # no rank stages the whole state
