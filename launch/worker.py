"""Entry point of one training process (spawned locally or started by SLURM).

`python -m launch.worker RUN_DIR/config.yaml`: the config was resolved and validated by
the launcher, so a worker only sets up logging and runs the shared loop.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

if __name__ == "__main__":
    # Until the training loop takes the signals over (trainers/loop.py StopRequest), a Ctrl-C
    # the launcher forwards while this worker starts up has nothing to save: exit quietly, at
    # once (an exception raised in the middle of importing numpy or torch breaks the import
    # machinery instead of ending the process).
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))


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


def set_host_allocator(mode: str) -> None:
    """`train.host_memory`: how glibc's malloc treats the host memory a process frees.

    fast (default): glibc's own policy. Its mmap threshold rises to the size of each
    freed block (up to 32 MiB), so freed activations and gathered buffers stay in heap
    arenas and are reused without touching the kernel. RSS can sit above what the live
    tensors need (measured on a 360M model, an FSDP2 rank's forward grew RSS by 1.4 GiB
    for 0.55 GiB of activations; activation checkpointing kept memory it had freed).

    compact: a fixed 128 KiB threshold, so every block of 128 KiB or more is its own mmap,
    returned to the system when freed: RSS follows the live tensors, which is what
    launch/estimate.py predicts and bench/memory_estimate.py measures. The price is CPU
    time, since each such block's pages fault in on first touch: on CPU, 1.9-2.2x the CPU
    time of an SFT step on the tiny model, same losses (bench/sft_vs_trl.py; README,
    "Memory at scale").

    On a GPU the activations and gathered parameters live in device memory, so the choice
    only matters for host-side state (loading, offloaded optimizer state)."""
    if mode != "compact":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def run(cfg, on_hang=None) -> int:
    """Train, turning expected failures into a message and an exit code (no traceback).
    `on_hang(summary)`: what the launcher does when the hang watchdog stops the run (the
    SLURM task requeues the job), called before the rank exits."""
    from launch.lean_imports import defer_unused_imports

    defer_unused_imports()  # before anything imports a model
    from trainers.errors import TrainingError, UserError
    from parallel import build_plan
    from trainers.loop import train

    set_host_allocator(cfg.train.host_memory)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart and int(os.environ.get("RANK", 0)) == 0:  # set by torch's elastic agent
        logging.getLogger("train").info(
            "worker group restart %d of %s after a worker failed: resuming from the last committed checkpoint",
            restart, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    try:
        summary = train(cfg, build_plan, on_hang=on_hang)
    except (UserError, TrainingError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    return 0 if summary["status"] in ("completed", "preempted", "interrupted") else 1


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
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C forwarded while starting up, or a second one: the launcher says what happened
        sys.exit(130)
