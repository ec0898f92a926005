"""The local 2-node SLURM cluster works for what the launcher needs:
srun across nodes, a submitit multi-node job doing a gloo all_reduce, and sacct."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

try:  # works with `python -m pytest` from the repo root and with plain `pytest`
    from tests.conftest_slurm import SlurmCluster, slurm_cluster  # noqa: F401
except ImportError:  # pragma: no cover
    from conftest_slurm import SlurmCluster, slurm_cluster  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 60


def _sacct_state(job_id: str, timeout: float = 20) -> str:
    """Final state of a job as accounting sees it (records reach slurmdbd a bit late)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        state = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""
        if state and state not in ("PENDING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    return state


def test_srun_spans_both_nodes(slurm_cluster: SlurmCluster) -> None:
    out = subprocess.run(
        [
            "srun", "-N2", "-n2", "-p", slurm_cluster.partition, "--time=1",
            "bash", "-c", 'echo "$SLURM_PROCID $SLURMD_NODENAME"',
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    ranks = dict(line.split() for line in out.stdout.strip().splitlines())
    assert sorted(ranks.values()) == ["n1", "n2"], out.stdout
    assert sorted(ranks) == ["0", "1"], out.stdout


def test_submitit_two_node_gloo_all_reduce(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    import submitit

    # Defined inside the test so that cloudpickle ships it by value: the job's
    # Python need not be able to import this test module.
    def all_reduce_rank_plus_one() -> dict:
        import datetime
        import os

        import torch
        import torch.distributed as dist
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export()  # MASTER_ADDR/PORT, RANK, WORLD_SIZE
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=45))
        try:
            t = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(t)
        finally:
            dist.destroy_process_group()
        return {
            "sum": t.item(),
            "rank": env.rank,
            "world_size": env.world_size,
            "master_addr": env.master_addr,
            "node": os.environ.get("SLURMD_NODENAME"),
        }

    # Fresh folder: job ids restart at 1 on a fresh cluster, a reused one would
    # hand back stale result files.
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        timeout_min=5,
        slurm_partition=slurm_cluster.partition,
        name="llm-launcher-allreduce",
    )
    job = executor.submit(all_reduce_rank_plus_one)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(
                f"submitit job {job.job_id} not done after {JOB_TIMEOUT_S}s "
                f"(state {job.state}):\n{job.stderr() or ''}"
            )
        time.sleep(1)

    results = job.results()  # one per task; raises with the task's traceback on failure
    assert len(results) == 2
    assert {r["rank"] for r in results} == {0, 1}
    assert {r["node"] for r in results} == {"n1", "n2"}
    for r in results:
        assert r["sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert r["world_size"] == 2
        assert r["master_addr"] == "n1"
    assert _sacct_state(job.job_id) == "COMPLETED"


def test_sacct_reports_completed_job(slurm_cluster: SlurmCluster) -> None:
    out = subprocess.run(
        [
            "sbatch", "--parsable", "--wait", "-p", slurm_cluster.partition,
            "-N1", "-n1", "--time=1", "-o", "/dev/null", "--wrap", "true",
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    assert job_id.isdigit(), out.stdout
    assert _sacct_state(job_id) == "COMPLETED"
