"""Entry point of one training process (spawned locally or started by SLURM).

`python -m launch.worker RUN_DIR/config.yaml`: the config was resolved and validated by
the launcher, so a worker only sets up logging and runs the shared loop.
"""
from __future__ import annotations

import logging
import os
import sys


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    from launch.quiet import quiet_libraries

    quiet_libraries()


def return_freed_memory() -> None:
    """Make glibc give freed blocks of 128 KiB and more back to the system at once
    (M_MMAP_THRESHOLD fixed at its default start value).

    By default glibc raises its mmap threshold to the size of each freed block (up to 32
    MiB), so the per-layer buffers FSDP2 and ZeRO-3 gather and free, and the activations
    recomputed between them, end up in heap arenas that never shrink: measured on a 360M
    model, an FSDP2 rank's forward grew RSS by 1.4 GiB for 0.55 GiB of activations (the
    sharded plans held more host memory than the single process), and activation
    checkpointing kept 0.34 GiB it had freed. A fixed threshold keeps what a rank holds
    equal to what it uses.

    The price is CPU time: every block of 128 KiB or more is a fresh mmap whose pages
    fault in on first touch. On the bundled tiny model on CPU, a DPO micro-batch of 16
    pairs (forward, reference forward, backward) took 0.25 CPU-s with a 4 MiB threshold
    and 0.6-0.8 CPU-s with 128 KiB, TRL's code the same way (measured back to back in one
    process; bench/results/preference_vs_trl.md).
    LLM_LAUNCHER_MMAP_THRESHOLD=BYTES sets another fixed threshold."""
    try:
        import ctypes

        threshold = int(os.environ.get("LLM_LAUNCHER_MMAP_THRESHOLD", 1 << 17))
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def run(cfg) -> int:
    """Train, turning expected failures into a message and an exit code (no traceback)."""
    from trainers.errors import TrainingError, UserError
    from trainers.loop import train

    return_freed_memory()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart and int(os.environ.get("RANK", 0)) == 0:  # set by torch's elastic agent
        logging.getLogger("train").info(
            "worker group restart %d of %s after a worker failed: resuming from the last committed checkpoint",
            restart, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    try:
        summary = train(cfg)
    except (UserError, TrainingError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    return 0 if summary["status"] in ("completed", "preempted") else 1


def die_with_parent() -> None:
    """A worker must not outlive a launcher killed with SIGKILL: an orphan would keep
    training and writing checkpoints into the run directory a relaunch resumes from."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


def main(argv: list[str]) -> int:
    from launch.config import load, register_resolvers

    die_with_parent()
    setup_logging()
    register_resolvers()
    return run(load(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
