"""Every method in conf/method trains: overfitting one small batch of the bundled task on
the bundled base drives the loss down by a large factor within a few dozen steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, launch, losses

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
# (lr, minimum first/last loss ratio after 30 steps). Virtual-token methods and IA3 train
# far fewer, less expressive parameters, so they get a higher lr and a lower bar.
SETTINGS = {"prompt": (0.1, 1.8), "prefix": (3e-2, 2.0), "ia3": (5e-2, 4.0)}
DEFAULT = (None, 10.0)


def test_every_method_is_covered():
    assert {"full", "lora", "qlora", "dora", "rslora", "loraplus", "prefix", "prompt", "ia3"} <= set(METHODS)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (REPO / "data" / "reverse" / "train.jsonl").read_text().splitlines()[:4]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("method", METHODS)
def test_method_overfits_one_batch(tmp_path, one_batch, method):
    lr, factor = SETTINGS.get(method, DEFAULT)
    run = tmp_path / "run"
    launch(
        f"method={method}", f"data.train={one_batch}", "data.eval=null", "data.packing=false",
        "train.max_steps=30", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_every=1000",
        "optim.warmup_steps=0", "optim.schedule=constant", *([f"optim.lr={lr}"] if lr else []),
        f"hydra.run.dir={run}",
    )
    curve = losses(run)
    assert curve[30] < curve[1] / factor, f"{method}: {curve[1]:.3f} -> {curve[30]:.3f}"
