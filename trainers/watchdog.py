"""Hang watchdog: a rank that stops making progress ends the job with evidence instead of
holding its devices until the scheduler's time limit.

A rank stuck in a collective waits for a peer (stopped, deadlocked, swapping, on a dead
link) for the process group's timeout, 30 minutes by default, and then says nothing about
which peer or where. Here a thread per rank does two things every few seconds:

- it writes a heartbeat file, RUN_DIR/hangs/heartbeat/rank-<r>.json (the last completed
  step, the phase). A thread keeps running while the main thread waits in C code, so a
  live rank keeps beating; a frozen or dead process cannot, which is how the other ranks
  tell who stopped;
- it checks this rank's deadline: `train.step_timeout_s` after the last completed step,
  or `train.startup_timeout_s` during phases that legitimately take longer (start-up and
  resume up to the first step, evals, foreground checkpoint work, export). When it passes,
  the rank writes the Python stacks of all its threads to RUN_DIR/hangs/<attempt>/rank-<r>.txt
  (faulthandler writes them even while the main thread holds no interpreter lock to give)
  plus PyTorch's flight recorder of recent collectives when the backend keeps one, and exits
  with EXIT_HUNG. The lowest rank that is still beating waits a short grace for the others'
  stack files, then writes summary.json (status `hung`, the ranks whose heartbeat went
  stale, each rank's last step, the stack files). Relaunching resumes from the last
  committed checkpoint; the launcher restarts or requeues as it would for a dead rank
  (its `on_hang` callback, given when the watchdog is built, runs just before the exit).

The process group timeout is set above the watchdog's longest allowance (trainers/
distributed.py), so the watchdog, which leaves stacks, fires first; NCCL's own watchdog
and flight recorder (dumped into the same folder) stay as the backstop.

The watchdog thread is Python: it cannot run while the main thread sits in C code that
holds the interpreter lock (an extension call that never releases it, a runaway regex, a
deadlock inside a C library called with the lock held). Neither can its heartbeat, so
the peers still name this rank, but the rank itself would leave no stacks and never exit.
A C-level backstop covers it: faulthandler.dump_traceback_later, re-armed at every
deadline change with the current allowance plus BACKSTOP_MARGIN_S (more than the
watchdog needs to report: one beat plus the grace for the peers' stack files), runs on a
C thread of its own. If it ever fires, the Python watchdog could not act: it writes the
stacks of every thread to RUN_DIR/hangs/<attempt>/stuck-rank-<r>.txt (empty until then)
and exits the process with code 1 (no summary of its own; a peer's watchdog or the
launcher reports the run). A run that ends normally, or a hang the Python watchdog
handles, cancels it and removes the unused file; a killed process's empty one is
removed by the next attempt.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from trainers.files import atomic_write

log = logging.getLogger(__name__)

EXIT_HUNG = 3
# How long past a deadline the C-level backstop waits for the Python watchdog to act.
BACKSTOP_MARGIN_S = 60.0


def allowances(train_cfg) -> tuple[float | None, float | None]:
    """(step timeout, long-phase timeout) in seconds; None turns the watchdog off."""
    step = train_cfg.get("step_timeout_s")
    if step is None:
        return None, None
    long = train_cfg.get("startup_timeout_s")
    return float(step), float(max(long, step) if long is not None else step)


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, attempt: str,
                 step_timeout_s: float | None, long_timeout_s: float | None, start_step: int = 0,
                 backstop_margin_s: float = BACKSTOP_MARGIN_S,
                 on_hang: Callable[[dict], None] | None = None):
        self.run_dir = Path(run_dir)
        # The launcher's part of a hang (slurm/task.py requeues the job): called in the
        # watchdog thread, on the rank that writes summary.json, with that summary, just
        # before the process exits.
        self.on_hang = on_hang
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.step_timeout, self.long_timeout = step_timeout_s, long_timeout_s
        self.enabled = step_timeout_s is not None
        self.beats = self.run_dir / "hangs" / "heartbeat"
        self.folder = self.run_dir / "hangs" / attempt
        # Beat often enough that a stale heartbeat stands out well before the deadline.
        self.interval = min(5.0, max(0.5, (step_timeout_s or 10) / 10))
        self.stale_after = max(3 * self.interval, 5.0)
        self._lock = threading.Lock()
        self._step = start_step
        self._phase = "start-up"
        self._since = time.monotonic()
        self._budget = long_timeout_s
        self._stop = threading.Event()
        self._thread = None
        self.backstop_margin = backstop_margin_s
        self.backstop_path = self.folder / f"stuck-rank-{rank}.txt"
        self._backstop = None
        # One process has no peer to tell it is alive: no heartbeat files then.
        self.beating = self.enabled and world_size > 1
        if self.beating:
            self.beats.mkdir(parents=True, exist_ok=True)
            self._beat()
        if self.enabled:
            self._open_backstop()
            self._arm_backstop(self._budget)
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------- main thread
    def progress(self, step: int) -> None:
        """A step completed: the next one has `step_timeout_s`."""
        with self._lock:
            self._step, self._phase = step, f"step {step + 1}"
            self._since, self._budget = time.monotonic(), self.step_timeout
            self._arm_backstop(self._budget)

    @contextlib.contextmanager
    def long(self, what: str):
        """A phase that may take much longer than a step (eval, checkpoint, export)."""
        with self._lock:
            self._phase, self._since, self._budget = what, time.monotonic(), self.long_timeout
            self._arm_backstop(self._budget)
        try:
            yield
        finally:
            self.progress(self._step)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close_backstop()

    # ------------------------------------------------------- C-level backstop
    def _open_backstop(self) -> None:
        """The file the backstop would write into: faulthandler needs an open file when it
        is armed (it writes from its C thread, without the interpreter). It stays empty
        unless the backstop fires; empty ones that killed attempts of this rank left
        behind are removed here, with their folder if nothing else is in it."""
        for old in self.run_dir.glob(f"hangs/*/stuck-rank-{self.rank}.txt"):
            with contextlib.suppress(OSError):
                if old.stat().st_size == 0:
                    old.unlink()
                    old.parent.rmdir()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._backstop = open(self.backstop_path, "w")
        except OSError:  # a full or read-only disk: no backstop rather than no training
            self._backstop = None

    def _arm_backstop(self, budget: float | None) -> None:
        if self._backstop is not None and budget is not None:
            faulthandler.dump_traceback_later(budget + self.backstop_margin, exit=True, file=self._backstop)

    def _close_backstop(self) -> None:
        """Disarm, and remove the unused file (and the attempt's folder if nothing else is in it)."""
        with self._lock:  # (the main thread may be re-arming it)
            if self._backstop is None:
                return
            faulthandler.cancel_dump_traceback_later()
            self._backstop.close()
            self._backstop = None
        with contextlib.suppress(OSError):
            self.backstop_path.unlink()
            self.folder.rmdir()  # only if empty

    # ---------------------------------------------------------- watchdog thread
    def _beat(self) -> None:
        with self._lock:
            state = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                     "attempt": self.attempt, "step": self._step, "phase": self._phase, "time": time.time()}
        atomic_write(self.beats / f"rank-{self.rank}.json", json.dumps(state), durable=False)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.beating:
                    self._beat()
            except OSError:  # a full or vanished disk must not kill training from here
                pass
            with self._lock:
                waited = time.monotonic() - self._since
                budget, phase = self._budget, self._phase
            if budget is not None and waited > budget:
                self._hung(phase, waited, budget)

    def heartbeats(self) -> dict[int, dict]:
        """This attempt's heartbeat of every rank that wrote one."""
        out = {}
        for r in range(self.world_size):
            try:
                beat = json.loads((self.beats / f"rank-{r}.json").read_text())
            except (OSError, ValueError):
                continue
            if beat.get("attempt") == self.attempt:
                out[r] = beat
        return out

    def _hung(self, phase: str, waited: float, budget: float) -> None:
        """Dump this rank's evidence, let the lowest live rank write the verdict, exit."""
        self._close_backstop()  # this thread is running: it reports, the backstop must not
        self.folder.mkdir(parents=True, exist_ok=True)
        stack_file = self.folder / f"rank-{self.rank}.txt"
        with open(stack_file, "w") as f:
            f.write(f"rank {self.rank} pid {os.getpid()} host {socket.gethostname()}: no progress in "
                    f"{phase} for {waited:.0f} s (allowed {budget:.0f} s); last completed step "
                    f"{self._step}. Python stacks of all threads, most recent call first:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        self._dump_flight_recorder()
        now = time.time()
        beats = self.heartbeats()
        stopped = sorted(r for r in range(self.world_size) if r != self.rank and
                         (r not in beats or now - beats[r]["time"] > self.stale_after))
        live = [r for r in range(self.world_size) if r not in stopped] or [self.rank]
        print(f"[rank{self.rank}] hang: no progress in {phase} for {waited:.0f} s; stacks in {stack_file}",
              file=sys.stderr, flush=True)
        if self.rank == min(live):
            # The other live ranks hit their own deadline within about one beat.
            deadline = time.monotonic() + min(30.0, 3 * self.interval + 5)
            while time.monotonic() < deadline and not all((self.folder / f"rank-{r}.txt").exists() for r in live):
                time.sleep(0.2)
            self._write_summary(phase, budget, stopped, beats)
        os._exit(EXIT_HUNG)

    def _dump_flight_recorder(self) -> None:
        """PyTorch's record of this rank's recent collectives (which one is outstanding and
        with which sequence number): kept when TORCH_FR_BUFFER_SIZE > 0 (trainers/distributed.py
        sets it for every backend, gloo included)."""
        if not int(os.environ.get("TORCH_FR_BUFFER_SIZE") or os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE") or 0):
            return
        try:
            import torch._C._distributed_c10d as c10d

            dump = getattr(c10d, "_dump_nccl_trace_json", None) or c10d._dump_fr_trace_json
            trace = dump()
        except Exception:  # noqa: BLE001 - best effort evidence, never a second failure
            return
        (self.folder / f"flight-recorder-rank-{self.rank}.json").write_text(
            trace.decode() if isinstance(trace, bytes) else str(trace))

    def _write_summary(self, phase: str, budget: float, stopped: list[int], beats: dict) -> None:
        stacks = sorted(str(p) for p in self.folder.glob("rank-*.txt"))
        last = dict(sorted({**{r: beat["step"] for r, beat in beats.items()}, self.rank: self._step}.items()))
        who = (f"rank(s) {', '.join(map(str, stopped))} stopped reporting (no heartbeat for "
               f"{self.stale_after:.0f} s: frozen, swapped out or dead)" if stopped else
               "every rank is alive, so one of them is stuck (see the stacks)")
        message = (
            f"The run hung: no rank completed {phase} within {budget:.0f} s (train.step_timeout_s"
            f"{'' if budget == self.step_timeout else ' / train.startup_timeout_s'}); {who}. "
            f"Last completed step per rank, as of its last heartbeat: {last}. Python stacks of the live ranks: "
            f"{', '.join(stacks) or 'none written'}. Nothing past the last committed checkpoint is "
            f"lost: relaunch with hydra.run.dir={self.run_dir} to resume, or raise the timeouts "
            f"if this phase is just slow."
        )
        summary_path = self.run_dir / "summary.json"
        summary = dict(status="hung", final_step=max([self._step, *last.values()]), error=message,
                       world_size=self.world_size,
                       hang={"stopped_ranks": stopped, "phase": phase, "timeout_s": budget,
                             "last_step": {str(r): s for r, s in last.items()}, "stack_files": stacks,
                             "folder": str(self.folder)})
        atomic_write(summary_path, json.dumps(summary, indent=1))
        print(f"error: {message}", file=sys.stderr, flush=True)
        if self.on_hang is not None:
            with contextlib.suppress(Exception):
                self.on_hang(summary)
