"""DeepSpeed checkpoints with the guarantees of the DCP plans: background writes and reshard.

DeepSpeed writes its own files (one optimizer partition per rank, model states on rank 0)
through a pluggable checkpoint engine. Two pieces adapt that format to the Checkpointer:

- StagingCheckpointEngine: while a save is staged, every file DeepSpeed asks for is copied
  to CPU memory (pinned on a GPU) instead of written; the copies are then written from the
  Checkpointer's background thread. Training is blocked for the copy only, as with DCP's
  async_save, and the Checkpointer's commit protocol (marker last, atomic `latest`) applies
  unchanged.
- to_universal: a checkpoint written by N ranks is converted once, by DeepSpeed's own
  ds_to_universal, into its topology-free "universal" layout (one folder per parameter with
  fp32 weights and Adam moments), which the same ZeRO stage loads at any world size. (A
  change of stage does not load: the engine looks for the other stage's file names.)
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from trainers.errors import TrainingError

log = logging.getLogger(__name__)

UNIVERSAL = "deepspeed_universal"  # sub-directory of a checkpoint holding the converted copy


def universal_checkpoint_info() -> dict:
    """The client-state entry ds_to_universal requires (data parallelism only: no TP/PP
    patterns to declare)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _copy_to_cpu(obj, pin: bool):
    """A copy of a (nested) state dict that training can no longer change: tensors are
    cloned to CPU, other leaves deep-copied."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        out = torch.empty_like(obj, device="cpu", pin_memory=pin)
        return out.copy_(obj.detach(), non_blocking=pin)
    if isinstance(obj, dict):
        return type(obj)((k, _copy_to_cpu(v, pin)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to_cpu(v, pin) for v in obj)
    return copy.deepcopy(obj)


def _write(state, path: str) -> None:
    """torch.save through a file we fsync: the Checkpointer's commit marker must never be
    on disk before the data it vouches for (and a full disk then surfaces as ENOSPC)."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


class StagingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, with fsync, except that inside `stage()` files are
    kept in CPU memory and written later by `write_staged()`."""

    def __init__(self, config_params, pin_memory: bool):
        super().__init__(config_params)
        self.pin_memory = pin_memory
        self._staged: list[tuple[str, object]] | None = None

    def save(self, state_dict, path: str):
        if self._staged is None:
            return _write(state_dict, path)
        self._staged.append((path, _copy_to_cpu(state_dict, self.pin_memory)))

    def stage(self, save) -> list[tuple[str, object]]:
        """Run `save()` (engine.save_checkpoint) with writes captured; returns the files."""
        self._staged = []
        try:
            save()
            if self.pin_memory:
                torch.cuda.synchronize()
            return self._staged
        finally:
            self._staged = None

    def write_staged(self, files: list[tuple[str, object]]) -> Future:
        """Write staged files from a background thread; the future fails with any OSError."""
        def write():
            for path, state in files:
                _write(state, path)
            files.clear()  # release the CPU copies as soon as they are on disk

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepspeed-ckpt-write")
        future = pool.submit(write)
        pool.shutdown(wait=False)
        return future


def to_universal(source: Path, target: Path) -> Path:
    """Convert DeepSpeed checkpoint folder `source` into `target` (once; reused after).

    Runs DeepSpeed's ds_to_universal in a child process (it is a CLI, uses worker pools, and
    holds a whole parameter at a time), into `target`.tmp first so that a crash mid-way
    never leaves a half-converted folder that a later resume would trust."""
    if (target / "zero").is_dir():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers]
    log.info("converting DeepSpeed checkpoint %s to the universal layout (new world size)", source)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"DeepSpeed could not convert the checkpoint {source} to its universal layout, which "
            f"resuming under another world size needs. Resume with the world size and "
            f"plan that wrote it (see config.yaml in the run directory). ds_to_universal said:\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    os.replace(tmp, target)
    latest = source.parent / "latest_universal"  # ds_to_universal's pointer; we pass tags
    latest.unlink(missing_ok=True)
    return target
