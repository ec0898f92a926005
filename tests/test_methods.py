"""Every method in conf/method trains: overfitting one small batch of the bundled task on
the bundled base drives the loss down by a large factor within a few dozen steps (the 30
step runs are shared with tests/test_export.py: conftest.method_runs, one process)."""
from __future__ import annotations

import pytest

from tests.conftest import DEFAULT_METHOD_SETTING, METHOD_SETTINGS
from tests.helpers import REPO, losses, summary

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def test_every_method_is_covered():
    assert {"full", "lora", "qlora", "dora", "rslora", "loraplus", "prefix", "prompt", "ia3"} <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_overfits_one_batch(method_runs, method):
    _, factor = METHOD_SETTINGS.get(method, DEFAULT_METHOD_SETTING)
    curve = losses(method_runs[method])
    assert sorted(curve) == list(range(1, 31)) and summary(method_runs[method])["status"] == "completed"
    assert curve[30] < curve[1] / factor, f"{method}: {curve[1]:.3f} -> {curve[30]:.3f}"
