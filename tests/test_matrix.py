"""Every method x plan pair either trains with 2 processes or is refused up front."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from launch.config import register_resolvers
from parallel import PLANS, plan_spec
from tests.helpers import REPO, losses
from tests.matrix_worker import cell_dir, cell_overrides

pytestmark = pytest.mark.slow
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def accepted_cells(model_path, data) -> tuple[list[str], dict[str, str]]:
    register_resolvers()
    ok, refused = [], {}
    for plan in PLANS:
        if plan == "none":
            continue
        for method in METHODS:
            with initialize_config_dir(str(REPO / "conf"), version_base=None):
                cfg = compose("config", overrides=cell_overrides(plan, method, model_path, data))
            reason = plan_spec(plan).refuse(cfg, 2)
            if reason:
                refused[f"{plan}:{method}"] = reason
            else:
                ok.append(f"{plan}:{method}")
    return ok, refused


def test_every_accepted_pair_trains_and_every_refusal_explains(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((REPO / "data" / "reverse" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    cells, refused = accepted_cells(tiny_model, data)
    for cell, reason in refused.items():  # a refusal says why and what to use instead
        assert len(reason) > 40 and ("parallel=" in reason or "method" in reason), (cell, reason)
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
