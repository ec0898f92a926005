"""Session fixture ``slurm_cluster``: a real 2-node SLURM cluster on this machine.

It runs ``slurm/local_cluster.sh start`` once per test session (idempotent: a few
seconds when the cluster is already up, about 25-60 s from a bare machine since it
installs the Debian packages), then sets ``SLURM_CONF`` in ``os.environ`` so that
``srun``/``sbatch``/``sacct`` and submitit find the cluster.

Use it from ``tests/conftest.py``::

    from tests.conftest_slurm import slurm_cluster  # noqa: F401

or directly from a test module (the same import). Tests then take the fixture::

    @pytest.mark.slurm
    def test_x(slurm_cluster):
        subprocess.run(["srun", "-N2", "-p", slurm_cluster.partition, "hostname"])

Skipped (with the reason) when not root or when ``LLM_LAUNCHER_SKIP_SLURM=1``; under
``CI=true`` those fail instead (tests.helpers.cannot_run): a green CI means the cluster ran.
If this session started the cluster it stops it again at the end of the session,
unless ``LLM_LAUNCHER_KEEP_SLURM=1``; a cluster that was already running is left
running.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import cannot_run

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
START_TIMEOUT_S = 900  # a bare machine runs apt-get update + install first


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the local cluster."""

    conf: str  # path of slurm.conf, also exported as SLURM_CONF
    partition: str = "debug"
    nodes: tuple[str, ...] = ("n1", "n2")
    script: Path = CLUSTER_SCRIPT


# Shared across every import of this module's fixture (tests/conftest.py and a
# test module may both import it, which gives pytest two fixture definitions):
# start once, stop once.
_STATE: dict = {"users": 0, "cluster": None, "started_here": False, "old_conf": None}


def _run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _acquire() -> SlurmCluster:
    if _STATE["cluster"] is not None:
        _STATE["users"] += 1
        return _STATE["cluster"]
    was_running = _run_script("status", timeout=60).returncode == 0
    proc = _run_script("start", timeout=START_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(
            f"{CLUSTER_SCRIPT} start failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    env_line = _run_script("env").stdout.strip()  # "export SLURM_CONF=/path"
    conf = env_line.split("=", 1)[1]
    _STATE["old_conf"] = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    _STATE.update(cluster=SlurmCluster(conf=conf), started_here=not was_running, users=1)
    return _STATE["cluster"]


def _release() -> None:
    _STATE["users"] -= 1
    if _STATE["users"] > 0:
        return
    if _STATE["old_conf"] is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = _STATE["old_conf"]
    started_here = _STATE["started_here"]
    _STATE.update(cluster=None, started_here=False, old_conf=None)
    if started_here and os.environ.get("LLM_LAUNCHER_KEEP_SLURM") != "1":
        _run_script("stop", timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running local SLURM cluster (nodes n1, n2; partition ``debug``)."""
    if os.environ.get("LLM_LAUNCHER_SKIP_SLURM") == "1":
        cannot_run("local SLURM cluster disabled by LLM_LAUNCHER_SKIP_SLURM=1")
    if os.geteuid() != 0:
        cannot_run("local SLURM cluster needs root (installs packages, edits /etc/hosts, runs slurmd)")
    if not CLUSTER_SCRIPT.is_file():
        pytest.fail(f"missing {CLUSTER_SCRIPT}", pytrace=False)
    cluster = _acquire()
    try:
        yield cluster
    finally:
        _release()
