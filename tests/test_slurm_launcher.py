"""launcher=slurm on the real local 2-node cluster (no mocks): multi-node training for each
registered plan, preemption -> requeue -> exact resume, a job-array sweep with its summary,
dry runs with the memory estimate, and secrets kept out of scripts, configs and logs.
The dry runs, the script's quoting and the reading of srun's verdicts need no cluster:
they run in-process in the fast tier; only the tests that submit are marked slurm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, launch_in_process, losses, metrics, summary


SECRET = "hf_" + "sEcReT7q" * 4  # must never be written anywhere
BASE = [
    "launcher=slurm_local", "launcher.wait=true", "launcher.time_min=30",  # > 10 min: a signal is a preemption
    "train.micro_batch_size=4", "train.grad_accum=2", "train.eval_every=1000",
    "data.metric_rows=8", "method.dropout=0",
]
LONG = ["train.max_steps=100", "train.save_every=10"]  # the ddp run is also the preemption reference
# Generous: on a shared 2-core machine (load average ~20) the three plan jobs took 500 s,
# and a slow job is not a hung one.
JOB_TIMEOUT_S = 900


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / "slurm" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cancel_jobs(*dirs: Path) -> None:
    """Leave no job behind when a test fails or times out."""
    for d in dirs:
        for state in Path(d).glob("**/slurm/state.json"):
            job = json.loads(state.read_text()).get("job_id")
            if job:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python launch.py ARGS` in the background (several jobs can share the cluster)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=REPO,
        env=dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1", **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: dict, dirs: list[Path]) -> dict:
    """Wait for every process; on a timeout kill them all and cancel their jobs."""
    out = {}
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    except BaseException:
        for p in procs.values():
            p.kill()
        cancel_jobs(*dirs)
        raise
    return out


PLANS = ["ddp", "zero3", "fsdp2"]


@pytest.fixture(scope="module")
def plan_runs(slurm_cluster, tiny_model, tmp_path_factory):
    """One 2-node x 1-task job per registered plan, submitted together (the cluster runs
    two at a time). The ddp run has a secret in the submitting environment and is the
    uninterrupted reference of the preemption test."""
    root = tmp_path_factory.mktemp("slurm-plans")
    procs, runs = {}, {}
    for plan in PLANS:
        runs[plan] = root / plan
        extra = LONG if plan == "ddp" else ["train.max_steps=6"]
        procs[plan] = start(f"model.path={tiny_model}", *BASE, f"parallel={plan}", *extra,
                            f"hydra.run.dir={runs[plan]}", env={"HF_TOKEN": SECRET} if plan == "ddp" else None)
    done = finish(procs, [root])
    return {plan: (runs[plan], done[plan]) for plan in done}


@pytest.fixture(scope="module")
def ddp_run(plan_runs):
    return plan_runs["ddp"]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
def test_two_node_job_trains(plan, plan_runs, capsys):
    run, proc = plan_runs[plan]
    steps = 100 if plan == "ddp" else 6
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "submitted job" in proc.stdout and "ended: completed" in proc.stdout, proc.stdout
    s = summary(run)
    assert s["status"] == "completed" and s["final_step"] == steps and s["world_size"] == 2 and s["plan"] == plan
    assert sorted(losses(run)) == list(range(1, steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    state = read_state(run)
    (attempt,) = state["attempts"]
    assert attempt["world_size"] == 2 and sorted(attempt["nodes"]) == ["n1", "n2"]
    assert attempt["status"] == "completed" and state["requeues"] == 0
    from launch.status import main as status_main

    capsys.readouterr()
    assert status_main([str(run)]) == 0  # `python -m launch.status RUN_DIR`
    text = capsys.readouterr().out
    for needle in (f"job          {state['job_id']}", "COMPLETED", f"last step    {steps} / {steps}",
                   f"checkpoints/step_{steps}", "_0_log.err"):
        assert needle in text, text


@pytest.mark.slurm
@pytest.mark.slow
def test_secret_reaches_the_job_only_through_the_environment(ddp_run):
    run, proc = ddp_run
    # It reached the job (rank 0 records the names of credential variables it sees) ...
    assert read_state(run)["attempts"][0]["secrets_in_env"] == ["HF_TOKEN"]
    # ... and was written nowhere: script, config, submitit pickles, logs, state, metrics.
    scripts = list(run.glob("slurm/submission-1/*.sh"))
    assert scripts and "#SBATCH" in scripts[0].read_text()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_log.err") for p in files) and (run / "config.yaml") in files
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert SECRET not in proc.stdout + proc.stderr


def last_step(run: Path) -> int:
    return max((r["step"] for r in metrics(run) if "loss" in r), default=0) if (run / "metrics.jsonl").exists() else 0


def wait_until(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not predicate():
        assert proc.poll() is None, f"launcher exited while waiting for {what}:\n{proc.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def task_process(run: Path, rank: int, restart: int):
    """The psutil.Process of SLURM task `rank` of attempt `restart` of the run's job (the
    slurmd's of both nodes run on this machine): the training process to inject a fault into."""
    import psutil

    folder = read_state(run)["folder"]
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if ("submitit.core._submit" in p.cmdline() and folder in p.cmdline() and env.get("SLURM_PROCID") == str(rank)
                    and env.get("SLURM_RESTART_COUNT", "0") == str(restart)):
                return p
        except psutil.Error:
            continue
    return None


def resumes(run: Path) -> list[int]:
    """The step each attempt resumed from, from rank 0's log (one log across requeues)."""
    log = Path(read_state(run)["logs"]["rank0"]["stderr"])
    text = log.read_text() if log.exists() else ""
    return [int(line.rsplit("step ", 1)[1].rstrip(")")) for line in text.splitlines() if "] resumed from " in line]


def attempts(run: Path) -> list[dict]:
    return read_state(run).get("attempts", [])


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_requeue_dead_task_and_hang_resume_exactly(ddp_run, slurm_cluster, tiny_model, tmp_path):
    """One job, four faults, each followed by a requeue and a resume from the last
    committed checkpoint, and the losses still equal the uninterrupted run's:
    1) job._interrupt() (TERM + USR2, counted as a preemption since time_min > 10): the
       ranks agree, save, and rank 0 requeues;
    2) a plain `scontrol requeue`: SLURM kills the attempt (after KillWait) and runs it again;
    3) SIGKILL of task 1: srun ends the step, the batch script's teardown reads srun's
       verdict and requeues like a preemption;
    4) SIGSTOP of task 1: rank 0's watchdog reports the hang and requeues like a preemption.
    launcher.max_requeues=4 leaves room for the three requeues the launcher makes plus SLURM's."""
    import submitit

    ref, _ = ddp_run
    run = tmp_path / "run"
    timeout = 20
    proc = start(f"model.path={tiny_model}", *BASE, "parallel=ddp", *LONG, "launcher.max_requeues=4",
                 f"train.step_timeout_s={timeout}", "train.startup_timeout_s=120", f"hydra.run.dir={run}")
    times = {}
    try:
        wait_until(lambda: last_step(run) >= 3, proc, "training to start")
        state = read_state(run)
        job = submitit.SlurmJob(folder=state["folder"], job_id=state["job_id"], tasks=(0, 1))
        job._interrupt()  # 1) what a preemption does: TERM, then USR2
        wait_until(lambda: len(attempts(run)) == 2 and last_step(run) >= 22, proc,
                   "the requeued attempt to pass step 22")
        subprocess.run(["scontrol", "requeue", state["job_id"]], check=True, timeout=60)  # 2)
        wait_until(lambda: len(attempts(run)) == 3 and last_step(run) >= 45, proc, "attempt 3 to pass step 45")
        victim = task_process(run, rank=1, restart=2)
        assert victim is not None
        t0 = time.monotonic()
        victim.kill()  # 3) SIGKILL, as the OOM killer does
        wait_until(lambda: attempts(run)[2].get("requeued"), proc, "the dead task's requeue")
        times["kill -> requeued"] = time.monotonic() - t0
        wait_until(lambda: len(resumes(run)) == 3, proc, "attempt 4 to resume")
        times["kill -> resumed"] = time.monotonic() - t0
        wait_until(lambda: len(attempts(run)) == 4 and last_step(run) >= 65, proc, "attempt 4 to pass step 65")
        frozen = task_process(run, rank=1, restart=3)
        assert frozen is not None
        t0 = time.monotonic()
        frozen.suspend()  # 4) SIGSTOP: alive, holding its sockets, never answering
        wait_until(lambda: attempts(run)[3].get("requeued"), proc, "the hang's requeue")
        times["stop -> requeued"] = time.monotonic() - t0
        wait_until(lambda: len(resumes(run)) == 4, proc, "attempt 5 to resume")
        times["stop -> resumed"] = time.monotonic() - t0
        out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    except BaseException:
        proc.kill()
        cancel_jobs(run)
        raise
    print({k: round(v, 1) for k, v in times.items()})
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    state = read_state(run)
    first, second, third, fourth, fifth = state["attempts"]
    assert [a["restart"] for a in state["attempts"]] == [0, 1, 2, 3, 4]
    assert state["requeues"] == 3  # requeued by the launcher; the second requeue was SLURM's
    assert first["status"] == "preempted" and first["requeued"] and 3 <= first["step"] < 22, first
    assert not second.get("requeued"), second  # saved and left it to SLURM, or was killed first
    assert third["status"] == "task died" and third["requeued"], third
    assert third["task_died"] == {"node": "n2", "tasks": "1", "how": "Killed"}, third
    assert third["step"] >= 45, third  # the step it died at, from metrics.jsonl
    assert fourth["status"] == "hung" and fourth["requeued"] and "stopped ranks [1]" in fourth["note"], fourth
    assert fifth["status"] == "completed" and fifth["step"] == 100
    resumed = resumes(run)
    assert len(resumed) == 4 and resumed[0] == first["step"], resumed
    # saved on the way out (its own step), or killed first: the last committed checkpoint (step 20 or later)
    assert resumed[1] >= 20 and (resumed[1] % 10 == 0 or resumed[1] == second.get("step")), (resumed, second)
    assert resumed[2] >= 40 and resumed[2] % 10 == 0, resumed  # the last committed checkpoint before the kill
    assert f"the last committed checkpoint is step_{resumed[2]}" in third["note"], third
    assert resumed[3] >= 60 and resumed[3] % 10 == 0, resumed
    # rank 0's stacks of the hang (rank 1 may add its own: SLURM sends SIGCONT before it kills a step)
    assert len(list(run.glob("hangs/*/rank-0.txt"))) == 1
    batch_log = Path(state["logs"]["rank0"]["stderr"]).read_text()
    assert (f"llm-launcher: task 1 on n2: Killed; the last committed checkpoint is step_{resumed[2]}; requeuing job "
            f"{state['job_id']} like a preemption") in batch_log
    assert summary(run)["status"] == "completed"
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 101))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_first_task_failure_reads_srun_verdicts_of_the_latest_attempt():
    """after_srun's evidence, from srun's own lines: the first verdict after the latest
    attempt's mark is the cause (srun ends the others itself after it); a task's own error
    exit is not a death by signal."""
    from slurm.after_srun import first_task_failure
    from slurm.sbatch import ATTEMPT_MARK

    log = "\n".join([
        f"{ATTEMPT_MARK} 0 of job 7", "srun: error: n2: task 1: Exited with exit code 1",
        f"{ATTEMPT_MARK} 1 of job 7", "[rank0] step 5", "srun: error: n2: task 1: Killed",
        "srun: launch/slurm: _step_signal: Terminating StepId=7.0", "srun: error: n1: task 0: Terminated",
    ])
    assert first_task_failure(log) == {"node": "n2", "tasks": "1", "how": "Killed", "signal": True}
    assert first_task_failure(log.rsplit(ATTEMPT_MARK, 1)[0])["signal"] is False
    assert first_task_failure(f"{ATTEMPT_MARK} 2 of job 7\nsrun: error: n1: tasks 0-1: Segmentation fault")[
        "tasks"] == "0-1"
    assert first_task_failure(f"{ATTEMPT_MARK} 3 of job 7\nall fine") is None


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_as_one_job_array_and_writes_a_summary(slurm_cluster, tiny_model, tmp_path):
    sweep = tmp_path / "sweep"
    proc = finish({"sweep": start("-m", f"model.path={tiny_model}", *BASE, "launcher.nodes=1", "train.max_steps=4",
                                  "data.metric_rows=4", "method.r=8,16", "optim.lr=1e-4,2e-4",
                                  f"hydra.sweep.dir={sweep}")}, [sweep])["sweep"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads((sweep / "sweep_summary.json").read_text())
    assert data["complete"] and data["varying"] == ["method.r", "optim.lr"], data
    points = data["points"]
    assert [p["num"] for p in points] == [0, 1, 2, 3]
    assert all(p["status"] == "completed" and p["final_step"] == 4 for p in points), points
    assert len({p["job_id"].split("_")[0] for p in points}) == 1, "one job array"
    assert {p["run_dir"] for p in points} == {str(sweep / str(i)) for i in range(4)}
    best = min(points, key=lambda p: p["final_eval_loss"])
    assert data["best"] == best["num"]
    md = (sweep / "sweep_summary.md").read_text()
    best_row = next(line for line in md.splitlines() if line.startswith(f"| {best['num']} |"))
    assert "**best**" in best_row and md.count("**best**") == 1
    assert "sweep summary" in proc.stdout
    status = subprocess.run([sys.executable, "-m", "launch.status", str(sweep)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "**best**" in status.stdout, status.stdout + status.stderr
    for p in points:
        assert (Path(p["run_dir"]) / "checkpoints" / "latest").exists()
        assert read_state(Path(p["run_dir"]))["attempts"][-1]["status"] == "completed"


def test_dry_runs_estimate_memory_and_refuse_what_cannot_fit(tmp_path, monkeypatch):
    """No cluster needed: nothing is submitted (submitit's own function renders the script),
    in-process (helpers.launch_in_process: `python launch.py` up to the launcher)."""
    cases = {
        "fits": ["method=qlora", "parallel=zero3"],
        "too_big": ["method=full", "parallel=ddp"],
        "secret_in_setup": ["method=qlora", "parallel=zero3", f"launcher.setup=['export HF_TOKEN={SECRET}']"],
    }
    monkeypatch.setenv("HF_TOKEN", SECRET)
    procs = {name: launch_in_process(tmp_path / name, "model=70b", *args, "launcher=slurm", "dry_run=true")
             for name, args in cases.items()}
    out = {name: (p.returncode, p.stdout, p.stderr) for name, p in procs.items()}
    for name, (code, stdout, stderr) in out.items():
        assert not procs[name].calls, name  # a dry run hands nothing to the launcher
        assert "Traceback" not in stdout + stderr, (name, stderr)
        assert SECRET not in stdout + stderr, name
        assert not list((tmp_path / name).glob("slurm/*")), f"{name}: something was written for submission"

    code, stdout, stderr = out["fits"]
    assert code == 0, stderr
    assert "#!/bin/bash" in stdout and "#SBATCH --signal=USR2@120" in stdout and "#SBATCH --requeue" in stdout
    assert "srun --unbuffered" in stdout and "--kill-on-bad-exit=1" in stdout and "submitit.core._submit" in stdout
    for part in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert part in stdout, stdout
    assert "70.55 B params, 4-bit base (sharded /8)" in stdout and "fits launcher.gpu_mem_gb=80" in stdout

    code, stdout, stderr = out["too_big"]
    assert code == 2 and stdout.strip() == "", stdout
    assert "needs about" in stderr and "launcher.gpu_mem_gb=80" in stderr and "nothing was submitted" in stderr
    assert "parallel=fsdp2 launcher.nodes=" in stderr and "method=qlora" in stderr, stderr

    code, _, stderr = out["secret_in_setup"]
    # refused as a credential typed into the config (launch/credentials.py), before anything is printed
    assert code == 2 and "`launcher.setup[0]`" in stderr and "HF_TOKEN" in stderr and "environment" in stderr, stderr


def test_script_quotes_config_values_and_refuses_injection(tmp_path):
    """In-process (no cluster): every value reaching the sbatch script is quoted or refused."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from launch.config import REPO_ROOT, finalize, register_resolvers
    from slurm.sbatch import render_script
    from trainers.errors import UserError

    register_resolvers()
    folder = tmp_path / "run dir" / "slurm" / "submission-1"

    def cfg_for(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            return finalize(compose("config", overrides=["launcher=slurm", *overrides]), str(tmp_path / "run dir"))

    cfg = cfg_for("launcher.account='acct; touch /tmp/pwned'", "+launcher.sbatch.comment='$(id) x'",
                  "+launcher.sbatch.exclusive=true", "launcher.setup=['module load cuda/12']")
    text = render_script(cfg, folder, str(REPO_ROOT))
    assert "#SBATCH --account='acct; touch /tmp/pwned'" in text
    assert "#SBATCH --comment='$(id) x'" in text and "#SBATCH --exclusive" in text
    assert f"export PYTHONPATH={REPO}" in text and "\nmodule load cuda/12\n" in text
    assert f"'{folder}/%j_0_log.out'" in text  # a path with a space, quoted
    for bad, needle in [
        ("+launcher.sbatch.output=/tmp/x", "set by the launcher"),
        ("+launcher.sbatch.nodes=4", "use launcher.nodes"),
    ]:
        with pytest.raises(UserError, match=needle):
            render_script(cfg_for(bad), folder, str(REPO_ROOT))
    for key, value, needle in [
        ("sbatch", {"a b": 1}, "not an sbatch option name"),
        ("partition", "gpu\n#SBATCH --wrap=rm", "newline"),
        ("sbatch", {"comment": "x\nrm -rf ~"}, "newline"),
    ]:
        cfg = cfg_for()
        with open_dict(cfg):
            cfg.launcher[key] = value
        with pytest.raises(UserError, match=needle):
            render_script(cfg, folder, str(REPO_ROOT))
