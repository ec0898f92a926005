"""Every method x plan pair either trains with 2 processes or is refused up front: the
refusals in-process (fast), the training of every accepted pair in one 2-process launch
(slow)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from launch.config import register_resolvers
from parallel import PLANS, plan_spec
from tests.helpers import REPO, losses
from tests.matrix_worker import cell_dir, cell_overrides

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def accepted_cells(model_path, data) -> tuple[list[str], dict[str, str]]:
    """(accepted cells, refused cell -> reason) by the plans' own checks. Hydra composes
    one config per plan; each method's config group is then swapped in as Hydra would
    compose it (launch.config.group_option: conf/method files set only `method`, no
    _global_ package), 8 compositions instead of 63."""
    from omegaconf import OmegaConf

    from launch.config import group_option

    register_resolvers()
    ok, refused = [], {}
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        for plan in PLANS:
            if plan == "none":
                continue
            base = compose("config", overrides=cell_overrides(plan, "lora", model_path, data))
            for method in METHODS:
                cfg = base.copy()
                option = group_option("method", method)
                cfg.method = OmegaConf.create({**option, **({"dropout": 0} if "dropout" in option else {})})
                reason = plan_spec(plan).refuse(cfg, 2)
                if reason:
                    refused[f"{plan}:{method}"] = reason
                else:
                    ok.append(f"{plan}:{method}")
    return ok, refused


def composed_refusal(plan, method, model_path, data) -> str | None:
    """The refusal of one cell from the config Hydra composes for it (the matrix worker's)."""
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return plan_spec(plan).refuse(compose("config", overrides=cell_overrides(plan, method, model_path, data)), 2)


def four_rows(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((REPO / "data" / "reverse" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    return data


def test_every_refusal_names_the_refused_method_and_alternatives_that_are_accepted(tmp_path, tiny_model):
    """A refusal says what is refused and what to use instead; what it offers (another
    method=M under this plan, another parallel=P for this method) is itself accepted."""
    data = four_rows(tmp_path)
    cells, refused = accepted_cells(tiny_model, data)
    assert refused and len(cells) + len(refused) == (len(PLANS) - 1) * len(METHODS)
    for cell, reason in refused.items():
        plan, method = cell.split(":")
        assert composed_refusal(plan, method, tiny_model, data) == reason, cell  # the swap is what Hydra composes
        assert f"method={method}" in reason, (cell, reason)
        offered = {f"{plan}:{m}" for m in re.findall(r"method=(\w+)", reason) if m != method}
        offered |= {f"{p}:{method}" for p in re.findall(r"parallel=(\w+)", reason) if p != plan}
        assert offered and offered <= set(cells), (cell, reason, offered - set(cells))


@pytest.mark.slow
def test_every_accepted_pair_trains(tmp_path, tiny_model):
    data = four_rows(tmp_path)
    cells, _ = accepted_cells(tiny_model, data)
    out = tmp_path / "runs"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "matrix_worker.py"), str(out), str(tiny_model), str(data), *cells],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    import json

    results = json.loads((out / "results.json").read_text())
    failed = {c: r for c, r in results.items() if r["status"] != "completed"}
    assert not failed, "\n\n".join(f"{c}: {r['error']}" for c, r in failed.items())
    for cell in cells:
        curve = losses(out / cell_dir(cell))
        assert min(curve[2], curve[3], curve[4]) < curve[1], (cell, curve)
