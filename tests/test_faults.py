"""Faults beyond a clean preemption, on 2 ddp processes: a damaged checkpoint, a dead rank,
a hung rank. Each fault is injected from here (bytes flipped, SIGKILL, SIGSTOP), and each
recovery must end exactly like the uninterrupted reference run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (FAST, assert_resumed_exactly, kill_tree, launch, losses, rel, start, summary, wait_until,
                           worker)

STEPS = 24


def common(tiny_model, plan: str = "ddp") -> list[str]:
    return [f"model.path={tiny_model}", *FAST, f"train.max_steps={STEPS}", "train.micro_batch_size=2",
            "train.grad_accum=2", f"parallel={plan}", "launcher.nproc_per_node=2", "train.save_every=3"]


def logged_steps(run: Path) -> int:
    m = run / "metrics.jsonl"
    return m.read_text().count('"loss"') if m.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> Path:
    run = tmp_path_factory.mktemp("faults") / "ref"
    launch(*common(tiny_model), f"hydra.run.dir={run}")
    return run


def flip_bytes(path: Path, offset: int = 100, n: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_for_the_newest_intact_one(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    launch(*common(tiny_model), "train.max_steps=7", "train.keep_last=3", f"hydra.run.dir={run}")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_3", "step_6", "step_7"]
    flipped, truncated = ckpts / "step_7" / "state" / "__1_0.distcp", ckpts / "step_6" / "rng" / "rank0.pt"
    flip_bytes(flipped)  # same size: only the checksum can tell
    os.truncate(truncated, 100)
    out = launch(*common(tiny_model), "train.keep_last=3", f"hydra.run.dir={run}")
    log = out.stderr
    assert f"{flipped} does not match its checksum" in log, log[-3000:]
    assert f"{truncated} has 100 bytes" in log
    assert "resumed from" in log and "step_3 (step 3)" in log
    assert_resumed_exactly(run, reference, STEPS)
    # The abandoned newer directories were replaced by the relaunch's own saves.
    assert {p.name for p in ckpts.glob("step_*")} == {f"step_{STEPS - 6}", f"step_{STEPS - 3}", f"step_{STEPS}"}


@pytest.mark.slow
def test_dead_rank_ends_the_job_in_seconds_or_restarts_the_group(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    proc = start(run, *common(tiny_model))
    try:
        wait_until(lambda: logged_steps(run) >= 4, proc)
        victim = worker(proc, rank=1).pid
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) == 1  # a TrainingError: one paragraph, exit code 1
        took = time.time() - t0
    finally:
        kill_tree(proc)
    assert took < 30, took
    out = Path(proc.log).read_text()
    assert f"Rank 1 (pid {victim}) was killed by SIGKILL" in out, out[-3000:]
    assert {"rank": 1, "pid": victim, "exitcode": -9, "signal": "SIGKILL"} in summary(run)["failed_ranks"]

    # Relaunched with a restart allowed: the same kill now costs a restart, not the job.
    proc = start(run, *common(tiny_model), "launcher.max_restarts=1")
    try:
        wait_until(lambda: "checkpoint committed" in Path(proc.log).read_text(), proc)
        os.kill(worker(proc, rank=1).pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, Path(proc.log).read_text()[-3000:]
    finally:
        kill_tree(proc)
    out = Path(proc.log).read_text()
    assert "worker group restart 1 of 1" in out and "resumed from" in out.split("worker group restart")[1]
    assert_resumed_exactly(run, reference, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["ddp", "fsdp2"])
def test_hung_rank_is_named_live_stacks_are_written_and_the_relaunch_resumes(tmp_path, tiny_model, reference, plan):
    timeout, long_timeout = 20, 120
    run = tmp_path / "run"
    proc = start(run, *common(tiny_model, plan), f"train.step_timeout_s={timeout}",
                 f"train.startup_timeout_s={long_timeout}")
    try:
        wait_until(lambda: logged_steps(run) >= 3, proc)
        frozen = worker(proc, rank=1)
        t0 = time.time()
        frozen.suspend()  # SIGSTOP: alive, holding its sockets, never answering
        # a freeze that lands in a checkpoint save (every 3 steps) gets the long allowance
        assert proc.wait(timeout=long_timeout + 120) == 1  # the workers' code 3 becomes the launcher's TrainingError
        took = time.time() - t0
    finally:
        kill_tree(proc)
    s = summary(run)
    assert s["status"] == "hung" and s["hang"]["stopped_ranks"] == [1], s
    budget = s["hang"]["timeout_s"]
    assert budget == (timeout if s["hang"]["phase"].startswith("step") else long_timeout), s["hang"]
    assert budget < took < budget + 60, (took, s["hang"])
    stacks = Path(s["hang"]["folder"])
    assert [p.name for p in stacks.glob("rank-*.txt")] == ["rank-0.txt"]  # the frozen rank cannot write
    text = (stacks / "rank-0.txt").read_text()
    # the main thread is waiting somewhere in the loop (a collective in forward_backward, the
    # loss all-reduce or the stop agreement, or a checkpoint save, depending on when the peer froze)
    assert f"no progress in {s['hang']['phase']} for" in text and "in run_job" in text and "Current thread" in text
    assert (stacks / "flight-recorder-rank-0.json").exists()
    out = Path(proc.log).read_text()
    assert "The run hung" in out and "rank(s) 1 stopped reporting" in out and str(stacks / "rank-0.txt") in out
    launch(*common(tiny_model, plan), f"hydra.run.dir={run}")
    if plan == "ddp":
        assert_resumed_exactly(run, reference, STEPS)
    else:  # the same numbers as ddp's up to summation order
        got, want = losses(run), losses(reference)
        assert sorted(got) == list(range(1, STEPS + 1)) and summary(run)["status"] == "completed"
        assert all(rel(got[s], want[s]) < 1e-5 for s in want), (got, want)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    """The verification itself, in-process: every candidate damaged -> one paragraph naming
    each checkpoint's damaged file; a directory without a manifest (older runs) is loaded."""
    import json

    from trainers.checkpoint import Checkpointer
    from trainers.checkpoint_files import MANIFEST, MARKER, describe_files
    from trainers.distributed import DistEnv
    from trainers.errors import TrainingError

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        (d / "model.bin").write_bytes(os.urandom(1000))
        manifest = {"files": describe_files(d, ["model.bin"])}
        (d / MANIFEST).write_text(json.dumps(manifest))
        (d / MARKER).write_text("ok\n")
    (root / "latest").write_text("step_4")
    ckpt = Checkpointer.__new__(Checkpointer)
    ckpt.root, ckpt.env = root, DistEnv(rank=0, world_size=1, local_rank=0, device=None)
    assert ckpt.intact_checkpoint() == root / "step_4"
    flip_bytes(root / "step_4" / "model.bin")
    assert ckpt.intact_checkpoint() == root / "step_2"
    os.truncate(root / "step_2" / "model.bin", 10)
    with pytest.raises(TrainingError) as e:
        ckpt.intact_checkpoint()
    msg = str(e.value)
    assert "No committed checkpoint" in msg and "step_4: " in msg and "step_2: " in msg
    assert "does not match its checksum" in msg and "has 10 bytes, 1000 when committed" in msg
    (root / "step_2" / MANIFEST).write_text('{"files": ')  # cut short
    with pytest.raises(TrainingError, match="MANIFEST.json is unreadable"):
        ckpt.intact_checkpoint()
    (root / "step_2" / MANIFEST).unlink()
    assert ckpt.intact_checkpoint() == root / "step_2"


def test_a_hang_past_launcher_max_requeues_is_recorded_and_not_requeued(tmp_path):
    """SlurmTask's hang handler once the job has used its requeues (the requeue itself, and
    the dead task's, are proved on the real cluster in tests/test_slurm_launcher.py): the
    attempt is recorded as hung and not requeued, and nothing is asked of SLURM (there is
    no cluster here: a `scontrol requeue` would fail with another note)."""
    from omegaconf import OmegaConf

    from launch.on_slurm import HANDS
    from launch.run_state import read_state, update_state
    from slurm.task import SlurmTask

    cfg = OmegaConf.create({"run_dir": str(tmp_path), "launcher": {"max_requeues": 1}})
    update_state(tmp_path, lambda s: s.update(attempts=[{"restart": 1}], requeues=1))
    task = SlurmTask(str(tmp_path / "config.yaml"), HANDS)
    task._requeue_after_hang(cfg, "42", 1, {"final_step": 7, "hang": {"stopped_ranks": [1]}})
    state = read_state(tmp_path)
    assert state["requeues"] == 1
    attempt = state["attempts"][-1]
    assert attempt["status"] == "hung" and attempt["step"] == 7 and attempt["requeued"] is False, attempt
    assert attempt["note"] == "launcher.max_requeues=1 reached", attempt


def test_after_srun_does_not_requeue_a_task_that_exited_with_an_error(tmp_path, monkeypatch, capsys):
    """The batch script's teardown (slurm.after_srun) when srun's first verdict of the
    attempt is an error exit, not a signal: the run's record is left as rank 0 wrote it, no
    requeue, and the log says why. (The requeue after a death by signal is proved on the
    real cluster in tests/test_slurm_launcher.py.)"""
    from submitit.core.utils import DelayedSubmission, JobPaths

    from launch.on_slurm import HANDS
    from launch.run_state import read_state, update_state
    from slurm.after_srun import after_srun
    from slurm.sbatch import ATTEMPT_MARK
    from slurm.task import SlurmTask

    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path}\nlauncher: {{max_requeues: 3}}\n")
    folder = tmp_path / "slurm" / "submission-1"
    folder.mkdir(parents=True)
    paths = JobPaths(folder, job_id="7", task_id=0)
    DelayedSubmission(SlurmTask(str(config), HANDS)).dump(paths.submitted_pickle)
    paths.stderr.write_text("\n".join([
        f"{ATTEMPT_MARK} 0 of job 7", "srun: error: n2: task 1: Killed",  # the previous attempt's
        f"{ATTEMPT_MARK} 1 of job 7", "error: The loss became nan at step 12 ...",
        "srun: error: n1: task 0: Exited with exit code 1", "srun: error: n2: task 1: Terminated", ""]))
    record = {"restart": 1, "ended": "t", "status": "failed", "requeued": False}
    update_state(tmp_path, lambda s: s.update(attempts=[{"restart": 0, "requeued": True}, dict(record)],
                                              requeues=1))
    after_srun(folder, 143)
    state = read_state(tmp_path)
    assert state["attempts"][-1] == record and state["requeues"] == 1, state
    assert "task 0 on n1: Exited with exit code 1 (its error is above); not requeued" in capsys.readouterr().err


def run_stuck_process(tmp_path, watchdog_args: str, stuck: str):
    """A child process whose watchdog (1 s step allowance, 3 s long one, step 6 reported)
    watches a main thread that then runs `stuck`: (completed process, seconds taken)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    script = (f"from trainers.watchdog import Watchdog\n"
              f"w = Watchdog({str(tmp_path)!r}, 0, 1, 'attempt', 1.0, 3.0, start_step=5{watchdog_args})\n"
              "w.progress(6)\n" + stuck)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    return proc, time.time() - t0


def test_watchdog_in_one_process_dumps_the_stuck_main_thread(tmp_path):
    """No peers, no heartbeat files: the rank itself times out, writes its stacks and the
    verdict, calls the launcher's on_hang with it, and exits with EXIT_HUNG (in a child
    process: the watchdog ends its process)."""
    import json

    on_hang = ", on_hang=lambda s: print('on_hang:', s['status'], s['final_step'], flush=True)"
    proc, took = run_stuck_process(tmp_path, on_hang, "def stuck_in_a_collective():\n    import time; time.sleep(60)\n"
                                   "stuck_in_a_collective()\n")
    assert proc.returncode == 3 and took < 20, proc.stderr
    assert proc.stdout.splitlines() == ["on_hang: hung 6"], proc.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "hung" and s["final_step"] == 6 and s["hang"]["stopped_ranks"] == []
    assert "every rank is alive, so one of them is stuck" in s["error"] and "step 7" in s["error"]
    stacks = (tmp_path / "hangs" / "attempt" / "rank-0.txt").read_text()
    assert "in stuck_in_a_collective" in stacks and "last completed step 6" in stacks
    assert not (tmp_path / "hangs" / "heartbeat").exists()
    assert not (tmp_path / "hangs" / "attempt" / "stuck-rank-0.txt").exists()  # the backstop was disarmed


def test_backstop_dumps_and_exits_when_c_code_holds_the_interpreter_lock(tmp_path):
    """The main thread stuck in a C call that keeps the interpreter lock (a ctypes.PyDLL
    function does not release it; libc's sleep stands for an extension that never
    returns): the Python watchdog thread cannot run, so only faulthandler's C thread,
    armed for the allowance plus the margin, can write the stacks and end the process."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc, took = run_stuck_process(tmp_path, ", backstop_margin_s=2.0",
                                   "def stuck_in_c_holding_the_lock():\n    import ctypes; ctypes.PyDLL(None).sleep(60)\n"
                                   "stuck_in_c_holding_the_lock()\n")
    assert proc.returncode == 1 and took < 20, (proc.returncode, took, proc.stderr)
    # the Python watchdog (1 s allowance) never ran: no stacks, no verdict of its own
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "hangs" / "attempt" / "rank-0.txt").exists()
    stacks = (tmp_path / "hangs" / "attempt" / "stuck-rank-0.txt").read_text()
    assert stacks.startswith("Timeout (0:00:03)!") and "in stuck_in_c_holding_the_lock" in stacks, stacks
    assert "in _watch" in stacks  # the Python watchdog thread, waiting for the lock

    # A run that ends normally leaves no backstop file (nor an empty attempt folder); a
    # killed one's empty file goes at the next start, a fired one's stays.
    killed = tmp_path / "hangs" / "killed" / "stuck-rank-0.txt"
    killed.parent.mkdir()
    killed.touch()
    script = (f"from trainers.watchdog import Watchdog\nw = Watchdog({str(tmp_path)!r}, 0, 1, 'done', 1.0, 3.0)\n"
              "w.progress(1)\nw.close()\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / "hangs").iterdir()) == ["attempt"]
    assert (tmp_path / "hangs" / "attempt" / "stuck-rank-0.txt").read_text() == stacks
