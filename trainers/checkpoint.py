"""Checkpoint directories: atomic commit, `latest`, retention, and finding what to resume.

A checkpoint is written into `step_<N>.tmp/`, and only after every rank has finished
does rank 0 write the COMMITTED marker, rename it to `step_<N>/` and move `latest`
(an atomic os.replace). A crash at any moment therefore leaves the previous committed
checkpoint as the one that is resumed; half-written directories are never taken.

A file can still be damaged after its commit (a bad disk, a copy cut short, a stray
write). Before the marker, the ranks checksum every file of the checkpoint and rank 0
writes MANIFEST.json (size and sha256 of each file, checkable by hand with sha256sum); a resume verifies it and, if the
newest checkpoint does not match, warns with the file and falls back to the previous
committed one, so damaged state is never loaded silently.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.checkpoint_files import (MANIFEST, MARKER, STEP_DIR, check_files, checkpoint_files, committed_steps,
                                       describe_files, latest_checkpoint, read_manifest, resume_candidates)
from trainers.distributed import DistEnv, all_reduce_sum, barrier
from trainers.errors import TrainingError
from trainers.files import atomic_write
from trainers.rng import rng_state, set_rng_state

COMMIT_DELAY_ENV = "LAUNCH_DEBUG_COMMIT_DELAY_S"

log = logging.getLogger(__name__)


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


class Checkpointer:
    """Saves, commits, prunes and restores checkpoints for any plan.

    mode="async": the state is staged to CPU in the foreground (training waits only for
    that copy), then written by a background thread on a dedicated gloo process group (so
    its collectives never interleave with training's), and committed once every rank's
    write is done. At most one save is in flight: the next save, and the end of the run,
    wait for it. mode="sync" writes in the foreground.
    """

    def __init__(self, run_dir: Path, plan, env: DistEnv, keep_last: int, mode: str, objective=None):
        self.root = Path(run_dir) / "checkpoints"
        # An objective with state of its own between steps (grpo's rollout reused over
        # num_iterations steps) hands it over by checkpoint_state() / load_checkpoint_state():
        # one file per rank, objective/rank<r>.pt, loadable with weights_only=True.
        self.objective = objective if hasattr(objective, "checkpoint_state") else None
        # Testing only (an environment variable, no user setting): every rank holds its
        # finished write this many seconds before the ranks agree to commit, so a test's
        # kill lands mid-write.
        self.commit_delay_s = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
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
                     method=cfg.method.name, checkpoint_format=self.plan.checkpoint_format,
                     scheduler=self.plan.scheduler_state())
        rng = rng_state()
        if self.objective is not None:  # taken now: training goes on while a save is in flight
            rng = {"rng": rng, "objective": self.objective.checkpoint_state()}
        with self._disk_errors(final):
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            barrier()
            if not self.asynchronous:
                self._finish(lambda: self.plan.save(tmp), tmp, final, state, rng, group=None)
                return
            write = self.plan.save_async(tmp, self._group)

        self._inflight = threading.Thread(
            target=self._finish_in_background, args=(write.result, tmp, final, state, rng), daemon=True,
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
            if self.commit_delay_s:
                time.sleep(self.commit_delay_s)
            if "objective" in rng:
                objective, rng = rng["objective"], rng["rng"]
                if objective is not None:
                    (tmp / "objective").mkdir(exist_ok=True)
                    torch.save(objective, tmp / "objective" / f"rank{self.env.rank}.pt")
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
        described = self._checksum_shares(tmp, group)
        if self.env.is_main:
            atomic_write(tmp / "trainer_state.json", json.dumps(state, indent=1))
            described.update(describe_files(tmp, ["trainer_state.json"]))
            manifest = {"algorithm": "sha256", "files": dict(sorted(described.items()))}
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write(tmp / MARKER, "ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", final.name)
            self._prune()
            log.info("checkpoint committed: %s", final)
        barrier(group)

    def _gather(self, value, group) -> list:
        """`value` from every rank of `group` (just [value] in one process)."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return [value]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, value, group=group)
        return out

    def _share(self, names: list[str]) -> list[str]:
        """This rank's share of the files to checksum: reading is spread over the ranks,
        so a checkpoint of hundreds of GB is hashed at the speed of all of them."""
        return names[self.env.rank :: self.env.world_size]

    def _checksum_shares(self, tmp: Path, group) -> dict[str, dict]:
        """Sizes and checksums of every file written so far, each rank hashing its share;
        rank 0 gets them all. Runs after every rank finished writing (the failure count
        above is a collective)."""
        mine = describe_files(tmp, self._share(checkpoint_files(tmp)))
        merged: dict[str, dict] = {}
        for part in self._gather(mine, group):
            merged.update(part)
        return merged

    def _damage(self, directory: Path) -> list[str]:
        """Every rank verifies its share of `directory`'s manifest; all get every problem."""
        try:
            manifest = read_manifest(directory)
        except ValueError as e:
            return [str(e)]
        if manifest is None:
            return []
        names = sorted(manifest)
        mine = check_files(directory, {n: manifest[n] for n in self._share(names)})
        return [p for part in self._gather(mine, None) for p in part]

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
        """Keep the last `keep_last` checkpoints up to `latest`. Newer directories are what
        a resume from an older checkpoint (the newest was damaged) left behind: no resume
        takes them any more, so they go too rather than take the place of good ones."""
        latest = (self.root / "latest").read_text().strip()
        current = int(STEP_DIR.match(latest).group(1))
        steps = committed_steps(self.root)
        for s in [s for s in steps if s > current]:
            log.info("removing %s: it was written before the resume from an older checkpoint", f"step_{s}")
            shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)
        for s in [s for s in steps if s <= current][: -self.keep_last]:
            shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)

    # ---------------------------------------------------------------------- loading
    def intact_checkpoint(self, before_step: int | None = None) -> Path | None:
        """The newest committed checkpoint whose files match its manifest (all ranks agree);
        each damaged newer one is named in a warning. None if there is no checkpoint; an
        error if there are some and none is intact. `before_step`: only checkpoints of
        earlier steps (a spike-guard rollback)."""
        candidates = resume_candidates(self.root)
        if before_step is not None:
            candidates = [d for d in candidates if int(STEP_DIR.match(d.name).group(1)) < before_step]
        damaged: list[str] = []
        for directory in candidates:
            problems = self._damage(directory)
            if not problems:
                if read_manifest(directory) is None and self.env.is_main:
                    log.info("%s has no MANIFEST.json (written before checksums): loaded unverified", directory)
                if damaged and self.env.is_main:
                    log.warning("resuming from %s, the newest intact checkpoint", directory)
                return directory
            damaged.append(f"{directory.name}: {'; '.join(problems)}")
            if self.env.is_main:
                log.warning("checkpoint %s is damaged, skipping it: %s", directory, "; ".join(problems))
        if not candidates:
            return None
        raise TrainingError(
            f"No committed checkpoint in {self.root} is intact, so there is nothing safe to resume "
            f"from ({' | '.join(damaged)}). Restore the damaged files from a copy, or move "
            f"{self.root} away to start the run from the beginning."
        )

    def restore(self, before_step: int | None = None, directory: Path | None = None) -> dict | None:
        """Load the newest intact committed checkpoint into the plan; returns its trainer
        state. A rollback (`before_step`) keeps the live schedule, which is already at the
        step the run continues from, and sets the optimizer's lr from it. `directory`:
        load that checkpoint instead (the best one, for the export), checked likewise."""
        if directory is not None:
            problems = self._damage(directory)
            if problems:
                raise TrainingError(f"Checkpoint {directory} is damaged: {'; '.join(problems)}")
        else:
            directory = self.intact_checkpoint(before_step)
        if directory is None:
            return None
        state = json.loads((directory / "trainer_state.json").read_text())
        self.plan.load(directory)
        self.plan.load_scheduler_state(state["scheduler"] if before_step is None else self.plan.scheduler_state())
        rng_file = directory / "rng" / f"rank{self.env.rank}.pt"
        same_world = state["world_size"] == self.env.world_size
        if same_world and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("world size changed (%s -> %s): RNG streams restart from the seed",
                        state["world_size"], self.env.world_size)
        if self.objective is not None:  # a rank's share of the objective's state is its own: same world only
            own = directory / "objective" / f"rank{self.env.rank}.pt"
            self.objective.load_checkpoint_state(torch.load(own, weights_only=True)
                                                 if same_world and own.exists() else None)
        state["path"] = str(directory)
        return state
