"""A run dir is never written by two launches, never resumed with settings its checkpoint
cannot load, never handed more local workers than the machine's memory holds; Ctrl-C
saves, records `interrupted`, and the relaunch resumes exactly (docs/run-dir-lock.md,
docs/relaunch-and-stop.md).

The Ctrl-C runs are real launches in a session of their own; SIGINT goes to the
launcher's process group, as a terminal sends it. One uninterrupted run per world size is
the reference; the single-process run's directory is then reused for the relaunch checks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import (FAST, REPO, assert_resumed_exactly, launch, launch_in_process, launched_once, refused,
                           start, summary, wait_until)

STEPS = 20  # enough steps (0.2-0.5 s each here) that Ctrl-C lands mid-run


def common(tiny_model, world: int) -> list[str]:
    # micro 2 x accum 2 x 2 ranks == micro 2 x accum 4 x 1 rank: the same global batch
    return [f"model.path={tiny_model}", *FAST, f"train.max_steps={STEPS}", "train.micro_batch_size=2",
            f"train.grad_accum={4 // world}", f"parallel={'ddp' if world > 1 else 'none'}",
            f"launcher.nproc_per_node={world}", "train.save_every=1000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    get = launched_once(tmp_path_factory.mktemp("references"))
    return lambda world: get(f"world{world}", *common(tiny_model, world))[0]


def logged_steps(run: Path) -> int:
    m = run / "metrics.jsonl"
    return m.read_text().count('"loss"') if m.exists() else 0


def holder_text(run: Path) -> str:
    lock = run / "launch.lock"
    return lock.read_text() if lock.exists() else ""


def interrupt_and_resume(run: Path, args: list[str], ref: Path, while_running=None) -> str:
    """Ctrl-C the run after step 2; returns the launcher's output. Then the relaunch must
    end exactly like the uninterrupted reference."""
    proc = start(run, *args)
    try:
        if while_running:
            wait_until(lambda: f'"pid": {proc.pid},' in holder_text(run), proc, timeout=600, what="the lock")
            while_running(proc)
        wait_until(lambda: logged_steps(run) >= 2, proc, timeout=600, what="step 2")
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = Path(proc.log).read_text()
    assert code == 130, out[-3000:]
    s = summary(run)
    assert s["status"] == "interrupted" and 2 <= s["final_step"] < STEPS, s
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{s['final_step']}"  # the steps since the last save were committed
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    resume_lines = [line for line in out.splitlines() if "to resume" in line]
    assert resume_lines == [f"interrupted at step {s['final_step']} (checkpoint {latest} committed): relaunch "
                            f"with hydra.run.dir={run} to resume"], out[-3000:]
    launch(*args, f"hydra.run.dir={run}")
    assert_resumed_exactly(run, ref, STEPS)
    return out


@pytest.fixture(scope="module")
def resumed_single(tmp_path_factory, tiny_model, reference):
    """A single-process run interrupted by Ctrl-C, with a second launch tried while it ran,
    then resumed to the end: (run dir, what the second launch printed)."""
    run = tmp_path_factory.mktemp("single") / "run"
    args = common(tiny_model, 1)
    second: list[str] = []

    def second_launch(proc):
        out = launch_in_process(run, *args)  # in this process (the run goes on, so not helpers.refused)
        text = out.stdout + out.stderr
        assert out.returncode == 2 and not out.calls and "Traceback" not in text, text
        second.extend([text, str(proc.pid)])

    interrupt_and_resume(run, args, reference(1), second_launch)
    return run, second


@pytest.mark.slow
def test_ctrl_c_in_one_process_saves_records_interrupted_and_resumes_exactly(resumed_single):
    run, _ = resumed_single
    assert summary(run)["status"] == "completed"


@pytest.mark.slow
def test_second_launch_into_a_running_run_dir_is_refused_naming_the_holder(resumed_single):
    _, (text, pid) = resumed_single
    assert "is in use by another launch" in text and f"pid {pid} on host {socket.gethostname()}" in text, text
    assert "since 20" in text


@pytest.mark.slow
def test_ctrl_c_in_ddp_saves_records_interrupted_and_resumes_exactly(tmp_path, tiny_model, reference):
    interrupt_and_resume(tmp_path / "run", common(tiny_model, 2), reference(2))


@pytest.mark.slow
def test_relaunch_refuses_shape_changes_and_prints_accepted_ones(resumed_single, tiny_model, tmp_path):
    run, _ = resumed_single
    args = common(tiny_model, 1)
    for change, says in [("method.r=4", "method.r 16 -> 4"),
                         ("method.target_modules=[q_proj,v_proj]", "method.target_modules all-linear -> ['q_proj', 'v_proj']"),
                         (f"model.path={REPO / 'assets' / 'tiny-llama'}", "model architecture (hidden 64, 2 layers")]:
        text = refused(run, *args, change)
        assert says in text and "cannot be loaded" in text and "hydra.run.dir=NEW_DIR" in text, text
        assert "data ok" not in text  # before anything ran
    accepted = launch_in_process(run, *args, "optim.lr=1e-3", f"train.max_steps={STEPS + 2}")
    assert accepted.returncode == 0 and accepted.calls, accepted.stderr[-2000:]
    line = [x for x in accepted.stderr.splitlines() if "relaunch:" in x]
    assert len(line) == 1 and f"train.max_steps {STEPS} -> {STEPS + 2}" in line[0] and "optim.lr" in line[0], line
    fresh = launch_in_process(tmp_path / "fresh", *args, "method.r=4")  # a new run dir: nothing to compare
    assert fresh.returncode == 0 and "relaunch:" not in fresh.stderr


def test_local_workers_that_cannot_fit_host_memory_are_refused_and_the_dry_run_says_so(tmp_path):
    import psutil

    n = int(psutil.virtual_memory().total // (400 * 2**20)) + 1  # cannot fit even the libraries
    text = refused(tmp_path / "run", "parallel=ddp", f"launcher.nproc_per_node={n}")
    assert f"launcher.nproc_per_node={n} would start {n} processes" in text and "available" in text, text
    assert "launcher.check_memory=false" in text
    dry = launch_in_process(tmp_path / "dry", "parallel=ddp", f"launcher.nproc_per_node={n}", "dry_run=true")
    assert dry.returncode == 0 and "does NOT fit: a launch would be refused" in dry.stdout, dry.stdout[-2000:]
    ok = launch_in_process(tmp_path / "dry2", "parallel=ddp", "launcher.nproc_per_node=2", "dry_run=true")
    assert ok.returncode == 0 and "host memory: 2 local process(es)" in ok.stdout and "-> fits" in ok.stdout


HOLD = ("import sys, time; from launch.run_lock import RunDirLock; RunDirLock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def holder(run_dir: Path, job: str) -> subprocess.Popen:
    """Another process holding the run dir's lock as task 0 of SLURM job `job`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, SLURM_JOB_ID=job, SLURM_RESTART_COUNT="0"))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_a_slurm_holder_and_a_requeued_attempt_of_that_job_takes_it(tmp_path, monkeypatch):
    from launch.run_lock import RunDirLock
    from trainers.errors import UserError

    run = tmp_path / "run"
    first = holder(run, "77")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused at once
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f"SLURM job 77 \\(pid {first.pid} on host "):
            RunDirLock.acquire(run)
        assert time.monotonic() - t0 < 5
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # our own job's live previous attempt: waits, then refuses
        with pytest.raises(UserError, match="in use by another launch"):
            RunDirLock.acquire(run, same_job_wait_s=3)
        # A requeued attempt that starts while the previous attempt is still going away takes
        # the lock as soon as its holder is gone.
        threading.Timer(2, first.kill).start()
        t0 = time.monotonic()
        lock = RunDirLock.acquire(run, same_job_wait_s=60)
        assert 1 < time.monotonic() - t0 < 30
        lock.release()
    finally:
        first.kill()
        first.wait()
    second = holder(run, "77")  # released: another process takes it at once
    second.kill()
    second.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_launcher_while_workers_start_stops_them_within_seconds(tmp_path, tiny_model, sig):
    """Workers still importing or loading have nothing to save: they exit at once instead of
    first reaching a step (64 starting workers took 80 s to stop)."""
    import psutil

    run = tmp_path / "run"
    proc = start(run, *common(tiny_model, 2))
    try:
        def workers():
            try:
                return [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch.worker" in p.cmdline()]
            except psutil.Error:
                return []
        # both workers started and importing torch (past interpreter start-up, whose own
        # KeyboardInterrupt handling is Python's)
        wait_until(lambda: len(workers()) == 2 and all(w.memory_info().rss > 150 * 2**20 for w in workers()),
                   proc, timeout=600, what="2 workers importing torch")
        kids = workers()
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(kids, timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = Path(proc.log).read_text()
    assert not alive and took < 30, (took, out[-2000:])
    assert proc.returncode == 128 + sig and "Traceback" not in out, out[-3000:]
    assert f"relaunch with hydra.run.dir={run} to resume" in out
