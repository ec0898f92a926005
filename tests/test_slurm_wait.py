"""A SLURM job that can never start (issue 25, item 7): cancelled and reported at once,
naming the request and the limit, at submission and while waiting; `python -m
launch.status` says the same. Reasons that resolve keep waiting and say for how long.
The verdicts are read from real `scontrol` records: recorded ones in the fast tier, the
local cluster's own in the tests marked slurm."""
from __future__ import annotations

import json
import logging
import subprocess
import time

import pytest

from tests.helpers import compose

# `scontrol show job -o` of real jobs on the local cluster (2 nodes of 2 CPUs), and its partition.
JOB_512_CPUS = (
    "JobId=1 JobName=wrap UserId=root(0) GroupId=root(0) Account=root QOS=normal JobState=PENDING "
    "Reason=PartitionConfig Dependency=(null) TimeLimit=00:30:00 SubmitTime=2026-12-05T03:44:39 Partition=debug "
    "NodeList= NumNodes=1 NumCPUs=512 NumTasks=1 CPUs/Task=512 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=512,mem=21694M,node=1,billing=512 MinCPUsNode=512 MinMemoryNode=0 Features=(null) Command=(null)")
JOB_3_NODES = (
    "JobId=17 JobName=wrap Account=root QOS=normal JobState=PENDING Reason=PartitionNodeLimit TimeLimit=00:30:00 "
    "SubmitTime=2026-12-05T03:51:38 Partition=debug NumNodes=3-3 NumCPUs=3 NumTasks=3 CPUs/Task=1 "
    "TRES=cpu=3,mem=3G,node=3,billing=3 MinCPUsNode=1 MinMemoryNode=1G Features=(null)")
PARTITION = ("PartitionName=debug AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 "
             "MaxCPUsPerNode=UNLIMITED Nodes=n[1-2] State=UP TotalCPUs=4 TotalNodes=2")
NODE = ("NodeName={} Arch=x86_64 CPUAlloc=0 CPUTot=2 AvailableFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
        "OS=Linux 6.18 #1 SMP @0  RealMemory=21694 Partitions=debug  State=IDLE")


def test_verdicts_name_the_request_and_the_limit():
    from slurm.scheduler import parse_record
    from slurm.wait import explain, may_never_start

    job, part = parse_record(JOB_512_CPUS), parse_record(PARTITION)
    nodes = [parse_record(NODE.format(n)) for n in ("n1", "n2")]
    assert job["Reason"] == "PartitionConfig" and job["TRES"] == "cpu=512,mem=21694M,node=1,billing=512"
    assert nodes[0]["OS"] == "Linux 6.18 #1 SMP @0" and nodes[0]["RealMemory"] == "21694"
    msg = explain(job, "PartitionConfig", part, nodes)
    assert msg == ("job 1 can never start: SLURM keeps it PENDING with reason PartitionConfig (the request does not "
                   "fit the partition's configuration). It asks for 512 CPUs per node (launcher.cpus_per_task=512 x "
                   "the tasks per node, launcher.gpus_per_node), but the largest node of partition debug has 2 CPU(s).")
    msg = explain(parse_record(JOB_3_NODES), "PartitionNodeLimit", part, nodes)
    assert "It asks for 3 nodes (launcher.nodes=3), but partition debug has 2." in msg
    short = dict(part, MaxTime="00:10:00", MaxNodes="1")
    msg = explain(parse_record(JOB_3_NODES), "PartitionTimeLimit", short, nodes)
    assert "a time limit of 30 min (launcher.time_min), but partition debug allows at most 10 min (MaxTime)" in msg
    # Nodes down or reserved: waits, unless the request fits no node of the partition at all.
    fits = dict(parse_record(JOB_3_NODES), NumNodes="1", MinMemoryNode="0")
    assert explain(fits, "ReqNodeNotAvail", part, nodes) is None
    assert "CPU(s)" in explain(job, "ReqNodeNotAvail", part, nodes)
    assert "account nosuch (launcher.account)" in explain(dict(fits, Account="nosuch"), "InvalidAccount", part, nodes)
    for reason in ("PartitionConfig", "InvalidQOS", "DependencyNeverSatisfied", "QOSMaxCpuPerJobLimit",
                   "AssocMaxNodePerJobLimit", "QOSMinGRES"):
        assert may_never_start(reason), reason
    for reason in ("Resources", "Priority", "Dependency", "BeginTime", "JobHeldUser", "QOSMaxCpuPerUserLimit",
                   "AssocGrpCpuLimit", "QOSGrpNodeLimit", "None"):
        assert not may_never_start(reason), reason


def sbatch(cwd, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_a_job_that_can_never_start_is_cancelled_at_submission(slurm_cluster, tiny_model, tmp_path, capsys):
    """`python launch.py ... launcher.wait=true launcher.cpus_per_task=512` (in this process:
    launch.main on the composed config, the real SLURM launcher), then `python -m launch.status`."""
    from launch.main import main
    from launch.status import main as status_main
    from slurm.scheduler import job_state

    run = tmp_path / "run"
    t0 = time.monotonic()
    code = main(compose(f"model.path={tiny_model}", "launcher=slurm_local", "launcher.wait=true",
                        "launcher.cpus_per_task=512", "parallel=ddp", "train.max_steps=2"), str(run))
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert code == 2, out[-2000:] + err[-4000:]
    (error,) = [line for line in err.splitlines() if line.startswith("error: ")]
    state = json.loads((run / "slurm" / "state.json").read_text())
    job = state["job_id"]
    assert error.startswith(f"error: job {job} can never start: SLURM keeps it PENDING with reason PartitionConfig")
    assert "It asks for 512 CPUs per node (launcher.cpus_per_task=512" in error
    assert "but the largest node of partition debug has" in error and f"Cancelled it (scancel {job})" in error
    assert "Traceback" not in err and "submitted job" not in out
    assert state["never_starts"]["job_id"] == job and not state.get("attempts")
    assert job_state(job) == "CANCELLED"
    assert status_main([str(run)]) == 1
    assert f"status       cannot start: {error.removeprefix('error: ')}\n" in capsys.readouterr().out
    print(f"refused in {took:.1f} s")


@pytest.mark.slurm
def test_waiting_reports_resolvable_reasons_and_cancels_what_cannot_resolve(slurm_cluster, tmp_path, caplog, capsys):
    """Three plain jobs: `blocker` holds both nodes for a few seconds, so `queued` waits
    (Resources or Priority: it resolves), and `doomed` waits for the blocker to fail, which it
    never does: its dependency turns DependencyNeverSatisfied while wait_for polls."""
    from launch.status import format_run, run_status
    from slurm.scheduler import job_state
    from slurm.wait import NeverStarts, wait_for

    blocker = sbatch(tmp_path, "-N2", "--exclusive", "--wrap", "sleep 4")
    queued = sbatch(tmp_path, "-N1", "--exclusive", "--wrap", "true")
    doomed = sbatch(tmp_path, "-N1", f"--dependency=afternotok:{blocker}", "--wrap", "true")
    too_big = sbatch(tmp_path, "-N3", "--wrap", "true")  # nobody waits for it: status says it
    try:
        run = tmp_path / "run"
        (run / "slurm").mkdir(parents=True)
        (run / "slurm" / "state.json").write_text(json.dumps({"job_id": too_big}))
        s = run_status(run)
        assert s["status"] == "cannot start" and "3 nodes (launcher.nodes=3)" in s["cannot_start"], s
        assert f"scancel {too_big}" in format_run(s)
        (run / "slurm" / "state.json").write_text(json.dumps({"job_id": queued}))
        for _ in range(20):  # until the scheduler has considered it (sched_interval=2 s)
            s = run_status(run)
            if s.get("pending", {}).get("reason") not in (None, "None"):
                break
            time.sleep(0.2)
        assert s["status"] == "pending" and s["pending"]["reason"] in ("Resources", "Priority"), s
        assert f"pending      {s['pending']['reason']}, waited 0:00:" in format_run(s)
        caplog.set_level(logging.INFO, logger="slurm")
        with pytest.raises(NeverStarts) as e:
            wait_for([queued, doomed], poll_s=0.5, report_every_s=1)
        assert e.value.job_id == doomed and "DependencyNeverSatisfied" in str(e.value)
        assert f"the dependency afternotok:{blocker}" in str(e.value)
        assert job_state(doomed) == "CANCELLED"
        waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {queued}: PENDING (")]
        assert waits and all(("(Resources)" in w or "(Priority)" in w) and "since submission" in w for w in waits)
        assert wait_for([queued], poll_s=0.5) == {queued: "COMPLETED"}
    finally:
        subprocess.run(["scancel", blocker, queued, doomed, too_big], capture_output=True, timeout=60)
