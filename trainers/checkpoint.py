"""Checkpoint directories: atomic commit, `latest`, retention, and finding what to resume.

A checkpoint is written into `step_<N>.tmp/`, and only after every rank has finished
does rank 0 write the COMMITTED marker, rename it to `step_<N>/` and move `latest`
(an atomic os.replace). A crash at any moment therefore leaves the previous committed
checkpoint as the one that is resumed; half-written directories are never taken.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.distributed import DistEnv, all_reduce_sum, barrier
from trainers.errors import TrainingError
from trainers.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_disk_full(error: BaseException) -> bool:
    """Whether ENOSPC is behind `error`: writers wrap it (torch.save raises a RuntimeError
    whose context is the OSError; DCP collects every rank's exception in a
    CheckpointException's `failures`)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        stack += [e.__cause__, e.__context__]
        stack += [failure[0] for failure in getattr(e, "failures", {}).values()]
    return False


def committed_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / MARKER).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint: `latest` if it is valid, else a scan."""
    pointer = root / "latest"
    if pointer.exists():
        d = root / pointer.read_text().strip()
        if (d / MARKER).exists():
            return d
    steps = committed_steps(root)
    return root / f"step_{steps[-1]}" if steps else None


class Checkpointer:
    """Saves, commits, prunes and restores checkpoints for any plan.

    mode="async": the state is staged to CPU in the foreground (training waits only for
    that copy), then written by a background thread on a dedicated gloo process group (so
    its collectives never interleave with training's), and committed once every rank's
    write is done. At most one save is in flight: the next save, and the end of the run,
    wait for it. mode="sync" writes in the foreground.
    """

    def __init__(self, run_dir: Path, plan, env: DistEnv, keep_last: int, mode: str = "async"):
        self.root = Path(run_dir) / "checkpoints"
        self.plan = plan
        self.env = env
        self.keep_last = max(1, int(keep_last))
        self.asynchronous = mode == "async"
        self._inflight: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._group = None
        if self.asynchronous and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in self.root.glob("step_*.tmp"):  # left by a crash mid-write
                shutil.rmtree(d, ignore_errors=True)
        barrier()

    # ----------------------------------------------------------------------- saving
    def save(self, step: int, trainer_state: dict) -> None:
        self.wait()
        final = self.root / f"step_{step}"
        tmp = self.root / f"step_{step}.tmp"
        cfg = self.plan.cfg
        state = dict(trainer_state, step=step, world_size=self.env.world_size, plan=cfg.parallel.name,
                     method=cfg.method.name, checkpoint_format=self.plan.checkpoint_format(cfg),
                     scheduler=self.plan.scheduler_state())
        rng = rng_state()
        with self._disk_errors(final):
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            barrier()
            if not self.asynchronous:
                self._finish(lambda: self.plan.save(tmp), tmp, final, state, rng, group=None)
                return
            write = self.plan.save_async(tmp, self._group)

        def finish_write():
            write.result()
            # Fault injection for tests: hold the write open so a kill lands mid-write.
            time.sleep(float(os.environ.get("LLM_LAUNCHER_CKPT_COMMIT_DELAY_S", 0)))

        self._inflight = threading.Thread(
            target=self._finish_in_background, args=(finish_write, tmp, final, state, rng), daemon=True,
            name=f"checkpoint-step-{step}",
        )
        self._inflight.start()

    def _finish_in_background(self, write, tmp: Path, final: Path, state: dict, rng: dict) -> None:
        try:
            with self._disk_errors(final):
                self._finish(write, tmp, final, state, rng, group=self._group)
        except BaseException as e:  # reported by wait() on the training thread
            self._failure = e

    def _finish(self, write, tmp: Path, final: Path, state: dict, rng: dict, group) -> None:
        """Every rank completes its write and adds its RNG state; the ranks then agree on
        the outcome, so that either all of them commit (rank 0 writes the marker and moves
        `latest`) or all of them report the failure (none waits forever for a peer)."""
        error = None
        try:
            write()
            torch.save(rng, tmp / "rng" / f"rank{self.env.rank}.pt")
        except BaseException as e:
            error = e
        failed, disk_full = self._count_failures(error, group)
        if error is not None:
            raise error
        if disk_full:
            raise OSError(errno.ENOSPC, f"another rank ran out of space writing {tmp}")
        if failed:
            raise TrainingError(f"Another rank failed to write checkpoint {final}; its error is printed above.")
        if self.env.is_main:
            _fsync_write(tmp / "trainer_state.json", json.dumps(state, indent=1))
            _fsync_write(tmp / MARKER, "ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / "latest", final.name)
            self._prune()
            log.info("checkpoint committed: %s", final)
        barrier(group)

    def _count_failures(self, error: BaseException | None, group) -> tuple[int, int]:
        """(ranks whose write failed, ranks whose disk was full), summed over `group` (the
        gloo group of background writes, or the default group)."""
        device = torch.device("cpu") if group is not None else self.env.device
        failed, full = all_reduce_sum([error is not None, error is not None and is_disk_full(error)], device, group)
        return int(failed), int(full)

    @contextlib.contextmanager
    def _disk_errors(self, final: Path):
        try:
            yield
        except BaseException as e:
            if is_disk_full(e):
                why, fix = "the disk is full", "Free space or point hydra.run.dir at a larger disk"
            elif isinstance(e, OSError):  # e.g. permissions, a vanished mount
                why, fix = str(e), "Fix that, or point hydra.run.dir at another disk"
            else:
                raise
            if self.env.is_main:
                shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
            prev = latest_checkpoint(self.root)
            raise TrainingError(
                f"Could not write checkpoint {final}: {why}. Nothing committed was lost: the "
                f"last committed checkpoint is {prev or 'none'}. {fix}, then relaunch to resume."
            ) from None

    def wait(self) -> None:
        """Block until the in-flight save is committed; re-raise its failure here."""
        if self._inflight is not None:
            self._inflight.join()
            self._inflight = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if isinstance(failure, TrainingError):
                raise failure
            raise TrainingError(f"Background checkpoint write failed: {failure}") from failure

    def _prune(self) -> None:
        steps = committed_steps(self.root)
        latest = (self.root / "latest").read_text().strip()
        for s in steps[: -self.keep_last]:
            if f"step_{s}" != latest:
                shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)

    # ---------------------------------------------------------------------- loading
    def restore(self) -> dict | None:
        """Load the newest committed checkpoint into the plan; returns its trainer state."""
        directory = latest_checkpoint(self.root)
        if directory is None:
            return None
        state = json.loads((directory / "trainer_state.json").read_text())
        self.plan.load(directory)
        self.plan.load_scheduler_state(state["scheduler"])
        rng_file = directory / "rng" / f"rank{self.env.rank}.pt"
        if state["world_size"] == self.env.world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("world size changed (%s -> %s): RNG streams restart from the seed",
                        state["world_size"], self.env.world_size)
        state["path"] = str(directory)
        return state
