"""Waiting for jobs to end, and whether a PENDING job can ever start (if not: why, in the
user's terms).

SLURM accepts a job that asks for more than its partition can ever give (unless the site
sets EnforcePartLimits) and keeps it PENDING forever, with a reason code: 512 CPUs per
task on 2-CPU nodes is `PartitionConfig`, three nodes of a two-node partition
`PartitionNodeLimit`. A launcher that waits would wait with it. The reasons fall in two
kinds:

- never: the request exceeds what the partition, QOS or association allows per job, the
  account or QOS is invalid, the constraints match no node, a dependency failed. Nothing
  but a new submission changes that: cancel and say which request and which limit;
- wait: Resources, Priority, Dependency, BeginTime, a held job, nodes down or reserved...
  (ReqNodeNotAvail is `never` only when the request exceeds every node of the partition).

The verdict names the request (with the launcher.* key that set it) and the limit, read
from `scontrol show job/partition/node`. wait_for checks it at every poll of a pending
job, cancels a job that can never start and raises NeverStarts; while a job waits for a
reason that resolves, it logs the reason and how long the job has waited.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from slurm import scheduler
from slurm.scheduler import TERMINAL
from trainers.errors import UserError

log = logging.getLogger("slurm")

NEVER = {
    "PartitionConfig": "the request does not fit the partition's configuration",
    "PartitionNodeLimit": "the job's node count is outside the partition's limits",
    "PartitionTimeLimit": "the job's time limit exceeds the partition's",
    "BadConstraints": "no node has the requested features",
    "InvalidAccount": "the account is not valid here",
    "InvalidQOS": "the QOS is not valid here",
    "DependencyNeverSatisfied": "a job it depends on ended in a way that never satisfies the dependency",
    "ReservationDeleted": "its reservation was deleted",
}
# Per-job (or per-node) maxima and minima of a QOS or an association: the job itself breaks
# them, so no other job ending can help (QOSGrp*, *PerUser, *PerAccount limits do resolve).
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)(Max\w*Per(Job|Node)\w*|Min\w*)$")


@dataclass
class Pending:
    job_id: str
    reason: str
    waited_s: float | None  # since submission (None when SLURM does not say)
    never: str | None  # why it can never start; None while it may


def check(job_id: str) -> Pending | None:
    """The job's wait, or None when it is not pending (or SLURM does not know it)."""
    records = scheduler.show("job", job_id)
    job = next((r for r in records if r.get("JobState") == "PENDING"), None)
    if job is None:
        return None
    reason = job.get("Reason", "None").split(",")[0].strip()
    never = None
    if may_never_start(reason):
        partition = next(iter(scheduler.show("partition", job.get("Partition", "").split(",")[0])), {})
        nodes = [n for n in scheduler.show("node")
                 if partition.get("PartitionName") in n.get("Partitions", "").split(",")]
        never = explain(job, reason, partition, nodes)
    return Pending(job_id, reason, waited_since(job.get("SubmitTime")), never)


def may_never_start(reason: str) -> bool:
    """Reasons worth comparing the request with the limits (the others always resolve)."""
    return reason in NEVER or bool(PER_JOB_LIMIT.match(reason)) or reason == "ReqNodeNotAvail"


def waited_since(submit_time: str | None) -> float | None:
    try:
        return max(0.0, time.time() - time.mktime(time.strptime(submit_time or "", "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def explain(job: dict, reason: str, partition: dict, nodes: list[dict]) -> str | None:
    """Why the job can never start (request and limit), or None when it may: a
    ReqNodeNotAvail whose request fits some node waits for that node."""
    exceeded = limits_exceeded(job, partition, nodes)
    meaning = NEVER.get(reason) or ("a per-job limit of its QOS or association" if PER_JOB_LIMIT.match(reason)
                                    else "none of the nodes it needs is available")
    if not exceeded:
        if reason == "ReqNodeNotAvail":
            return None
        exceeded = [_reason_detail(job, reason)]
    return (f"job {job.get('JobId')} can never start: SLURM keeps it PENDING with reason {reason} ({meaning}). "
            + "; ".join(f"It asks for {ask}, but {limit}" for ask, limit in exceeded) + ".")


def _reason_detail(job: dict, reason: str) -> tuple[str, str]:
    if reason == "InvalidAccount":
        return f"account {job.get('Account')} (launcher.account)", "SLURM does not accept that account for this user"
    if reason == "InvalidQOS":
        return f"QOS {job.get('QOS')} (launcher.qos)", "SLURM does not accept that QOS for this user and account"
    if reason == "DependencyNeverSatisfied":
        return (f"the dependency {job.get('Dependency')} (launcher.sbatch.dependency)",
                "that job ended in a way that never satisfies it")
    if reason == "BadConstraints":
        return f"the features {job.get('Features')} (launcher.constraint)", "no node of the partition has them"
    return (f"{job.get('NumNodes')} node(s), {job.get('CPUs/Task')} CPU(s) per task, time limit "
            f"{job.get('TimeLimit')}", f"{reason} says a limit of partition {job.get('Partition')}, its QOS "
            f"{job.get('QOS')} or account {job.get('Account')} forbids it (scontrol show partition / sacctmgr show qos)")


def limits_exceeded(job: dict, partition: dict, nodes: list[dict]) -> list[tuple[str, str]]:
    """(request, limit) for every per-job request no node or rule of the partition allows."""
    name = partition.get("PartitionName", job.get("Partition"))
    out = []
    want_nodes = _int(str(job.get("NumNodes", "")).split("-")[0])
    total, max_nodes = _int(partition.get("TotalNodes")), _int(partition.get("MaxNodes"))
    if want_nodes and total is not None and want_nodes > total:
        out.append((f"{want_nodes} nodes (launcher.nodes={want_nodes})", f"partition {name} has {total}"))
    elif want_nodes and max_nodes is not None and want_nodes > max_nodes:
        out.append((f"{want_nodes} nodes (launcher.nodes={want_nodes})",
                    f"partition {name} allows at most {max_nodes} per job (MaxNodes)"))
    cpus = _int(job.get("MinCPUsNode"))
    node_cpus = [c for c in (_int(n.get("CPUTot")) for n in nodes) if c is not None]
    cap = _int(partition.get("MaxCPUsPerNode"))
    if cpus and node_cpus:
        most = min(max(node_cpus), cap) if cap is not None else max(node_cpus)
        if cpus > most:
            per_task = job.get("CPUs/Task")
            out.append((f"{cpus} CPUs per node (launcher.cpus_per_task={per_task} x the tasks per node, "
                        f"launcher.gpus_per_node)",
                        f"the largest node of partition {name} has {most} CPU(s)"
                        + (" (MaxCPUsPerNode)" if cap is not None and cap < max(node_cpus) else "")))
    mem = _mib(job.get("MinMemoryNode"))
    node_mem = [m for m in (_mib(n.get("RealMemory")) for n in nodes) if m is not None]
    if mem and node_mem and mem > max(node_mem):
        out.append((f"{mem / 1024:g} GiB per node (launcher.mem_gb)",
                    f"the largest node of partition {name} has {max(node_mem) / 1024:g} GiB"))
    gpus = _gpus(job.get("TresPerNode"))
    node_gpus = [_gpus(n.get("Gres")) or 0 for n in nodes]
    if gpus and node_gpus and gpus > max(node_gpus):
        out.append((f"{gpus} GPUs per node (launcher.gpus_per_node={gpus})",
                    f"the nodes of partition {name} have at most {max(node_gpus)}"))
    limit, most_time = _minutes(job.get("TimeLimit")), _minutes(partition.get("MaxTime"))
    if limit is not None and most_time is not None and limit > most_time:
        out.append((f"a time limit of {limit:g} min (launcher.time_min)",
                    f"partition {name} allows at most {most_time:g} min (MaxTime)"))
    return out


def _int(value) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _mib(value) -> float | None:
    """'21694M', '4G', '1T', '512' (MiB) -> MiB; 0 or unknown -> None."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", str(value or "").strip())
    if not m or float(m[1]) == 0:
        return None
    return float(m[1]) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m[2]]


def _minutes(value) -> float | None:
    """SLURM's [days-]hours:minutes:seconds (or minutes:seconds) -> minutes; UNLIMITED -> None."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value or "").strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m[4] is not None:  # [d-]h:m:s
        return days * 1440 + a * 60 + b + c / 60
    if m[1] is not None:  # d-h[:m]
        return days * 1440 + a * 60 + b
    return a + b / 60  # m[:s]


def _gpus(gres) -> int | None:
    """GPUs in a GRES string: 'gres:gpu:8', 'gpu:a100:4(S:0-1)', 'gres/gpu=2'."""
    m = re.search(r"gpu(?::[A-Za-z]\w*)?[:=](\d+)", str(gres or ""))
    return int(m[1]) if m else None


def waited(seconds: float | None) -> str:
    if seconds is None:
        return "since submission"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} since submission"


class NeverStarts(UserError):
    """A submitted job that can never start; it was cancelled."""

    def __init__(self, job_id: str, message: str):
        super().__init__(f"{message} Cancelled it (scancel {job_id}): nothing ran. Change the request and "
                         f"launch again.")
        self.job_id, self.why = job_id, message


def refuse_if_never(job_id: str) -> None:
    """Cancel the job and raise NeverStarts if it is pending for a reason that cannot resolve."""
    p = check(job_id)
    if p is not None and p.never:
        scheduler.cancel(job_id.split("_")[0])  # an array's elements share one request
        raise NeverStarts(job_id, p.never)


def wait_for(job_ids: list[str], poll_s: float = 2.0, report_every_s: float = 60.0) -> dict[str, str]:
    """Block until every job is in a terminal state (following requeues). A pending job
    that can never start is cancelled (NeverStarts); one that waits for a reason that
    resolves (Resources, Priority, ...) is logged with its reason and wait, when the reason
    changes and every `report_every_s`."""
    last: dict[str, tuple] = {}
    reported: dict[str, float] = {}
    while True:
        states = {j: scheduler.job_state(j) for j in job_ids}
        for j, s in states.items():
            p = check(j) if s == "PENDING" else None
            if p is not None and p.never:
                scheduler.cancel(j.split("_")[0])
                raise NeverStarts(j, p.never)
            key = (s, p.reason if p else None)
            if key != last.get(j) or (p and time.monotonic() - reported.get(j, 0.0) >= report_every_s):
                if p:
                    why = "" if p.reason == "None" else f" ({p.reason})"  # (not yet considered)
                    log.info("job %s: PENDING%s, waited %s", j, why, waited(p.waited_s))
                else:
                    log.info("job %s: %s", j, s)
                reported[j] = time.monotonic()
            last[j] = key
        if all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(poll_s)
