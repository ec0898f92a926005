"""Checkpoints under faults, for every torch-native and DeepSpeed plan (2 processes):
SIGTERM saves and exits `preempted`, SIGKILL during a background write falls back to the
previous committed checkpoint, and N -> M ranks reshard with the same next-step loss.

The uninterrupted reference of each plan is launched once per module (`reference`) and
shared by that plan's fault tests: saving a checkpoint does not change the numbers."""
from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import (FAST, assert_resumed_exactly, cannot_run, kill_tree, launch, launched_once, losses, refused,
                           start, summary, wait_until)

pytestmark = pytest.mark.slow
STEPS = 10


def common(tiny_model, plan: str, world: int = 2) -> list[str]:
    # micro 2 x accum 2 x 2 ranks == micro 2 x accum 4 x 1 rank: the same global batch
    accum = 4 // world
    return [f"model.path={tiny_model}", *FAST, f"train.max_steps={STEPS}", "train.micro_batch_size=2",
            f"train.grad_accum={accum}", f"parallel={plan}", f"launcher.nproc_per_node={world}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """plan -> run dir of its uninterrupted 2-process run (checkpoints every 3 steps),
    launched on first use."""
    get = launched_once(tmp_path_factory.mktemp("references"))
    return lambda plan: get(plan, *common(tiny_model, plan), "train.save_every=3")[0]


def logged_steps(run: Path) -> int:
    m = run / "metrics.jsonl"
    return m.read_text().count('"loss"') if m.exists() else 0


@pytest.mark.parametrize("plan", ["ddp", "zero2", "zero3", "fsdp2"])
def test_sigterm_saves_preempted_and_resumes_exactly(tmp_path, tiny_model, reference, plan):
    args = common(tiny_model, plan) + ["train.save_every=1000"]
    ref = reference(plan)
    stop_after = random.Random(plan).randint(2, STEPS - 3)
    run = tmp_path / "run"
    proc = start(run, *args)
    wait_until(lambda: logged_steps(run) >= stop_after, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # stopped by the signal, as a shell reports it
    s = summary(run)
    assert s["status"] == "preempted" and s["final_step"] >= stop_after
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{s['final_step']}"
    launch(*args, f"hydra.run.dir={run}")
    assert summary(run)["status"] == "completed"
    assert_resumed_exactly(run, ref, STEPS)


@pytest.mark.parametrize("plan", ["ddp", "zero3"])  # DCP's async_save and DeepSpeed's staged files
def test_sigkill_during_async_write_resumes_from_previous_commit(tmp_path, tiny_model, reference, plan):
    args = common(tiny_model, plan) + ["train.save_every=3"]
    ref = reference(plan)
    run = tmp_path / "run"
    # Fault injection (a testing-only environment variable): each write waits 30 s before its commit,
    # so the kill lands mid-write.
    proc = start(run, *args, env={"LAUNCH_DEBUG_COMMIT_DELAY_S": "30"})
    ckpts = run / "checkpoints"
    try:
        wait_until(lambda: (ckpts / "step_3" / "COMMITTED").exists() and (ckpts / "step_6.tmp").exists(), proc)
        wait_until(lambda: logged_steps(run) >= 7, proc)  # training went on during the write
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher only: its workers must die with it
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their SIGKILLed launcher: {alive}"
    finally:
        kill_tree(proc)
    assert (ckpts / "latest").read_text().strip() == "step_3" and not (ckpts / "step_6").exists()
    out = launch(*args, f"hydra.run.dir={run}")
    assert "step_3 (step 3)" in out.stderr
    assert_resumed_exactly(run, ref, STEPS)


RESHARDS = [(plan, 2, 1) for plan in ("ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3_offload")] + [
    (plan, 1, 2) for plan in ("fsdp2", "zero2", "zero3")]


@pytest.mark.parametrize("plan, before, after", RESHARDS)
def test_reshard_gives_same_next_step_loss(tmp_path, tiny_model, plan, before, after):
    ref = tmp_path / "ref"
    launch(*common(tiny_model, plan, after), "train.max_steps=5", f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    launch(*common(tiny_model, plan, before), "train.max_steps=4", "train.save_every=4", f"hydra.run.dir={run}")
    out = launch(*common(tiny_model, plan, after), "train.max_steps=5", f"hydra.run.dir={run}")
    assert "step_4 (step 4)" in out.stderr
    assert losses(run)[5] == pytest.approx(losses(ref)[5], rel=1e-5)
    if plan.startswith("zero"):  # converted once by DeepSpeed, kept beside the original
        assert (run / "checkpoints" / "step_4" / "deepspeed_universal" / "zero").is_dir()


def test_resume_under_another_plan_format_or_method_is_refused_before_launch(tmp_path, tiny_model):
    run = tmp_path / "run"
    args = common(tiny_model, "zero2", 1)
    launch(*args, "train.max_steps=2", "train.save_every=2", f"hydra.run.dir={run}")
    for override, says in [
        ("parallel=zero3", "parallel=zero2 (deepspeed-zero2 checkpoint), which parallel=zero3"),
        ("parallel=fsdp2", "parallel=zero2 (deepspeed-zero2 checkpoint), which parallel=fsdp2 (dcp)"),
        ("method=full", "written by method=lora, and method=full"),
    ]:
        resume = [a for a in args if not a.startswith("method.dropout")] + [override, "train.max_steps=3"]
        out = refused(run, *resume)  # in-process: exit code 2, nothing handed to the launcher
        assert says in out, (override, out[-2000:])
        assert "data ok" not in out  # before anything ran
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"


def allocated_bytes(directory: Path) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in directory.rglob("*") if f.is_file())


@pytest.fixture
def small_disk():
    """mount(path, bytes): a real tmpfs of that size at `path` (unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            cannot_run(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("plan", ["fsdp2", "zero2"])
def test_full_disk_fails_clearly_and_loses_nothing_committed(tmp_path, tiny_model, reference, small_disk, plan):
    args = common(tiny_model, plan) + ["train.save_every=3"]
    ref = reference(plan)
    one = max(allocated_bytes(d) for d in (ref / "checkpoints").glob("step_*"))
    run = tmp_path / "run"
    # Room for one checkpoint but not two: step_3 commits, step_6 runs out of space.
    small_disk(run / "checkpoints", one * 3 // 2)
    out = launch(*args, f"hydra.run.dir={run}", check=False)
    assert out.returncode == 1
    assert "the disk is full" in out.stderr and "step_3" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_3"
    assert not list(ckpts.glob("step_*.tmp"))  # the partial write was cleaned up
    # Make room (what the message asks for) and relaunch: resumes from the committed step_3.
    subprocess.run(["mount", "-o", f"remount,size={one * 4}", str(ckpts)], check=True)
    out = launch(*args, f"hydra.run.dir={run}")
    assert "step_3 (step 3)" in out.stderr
    assert_resumed_exactly(run, ref, STEPS)
