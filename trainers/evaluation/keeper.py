"""The best checkpoint, kept apart from the keep_last rotation.

`checkpoints/best/` holds hard links to the files of the committed checkpoint of the best
eval (a copy where the filesystem refuses links), so it costs no disk while that step is
still in the rotation and survives its pruning. Checkpoint files are never rewritten in
place (a save writes a new step_N.tmp and renames it), so the links never change under
it. A resume never reads `best` (it takes `latest`); `train.export_from=best` does.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from trainers.distributed import barrier

log = logging.getLogger("train")


def link_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


class BestKeeper:
    def __init__(self, ckpt, is_main: bool, enabled: bool):
        self.ckpt, self.is_main, self.enabled = ckpt, is_main, enabled
        self.path = ckpt.root / "best"

    def keep(self, step: int) -> None:
        """After the save of `step` (the best eval so far): wait for its commit, then make
        checkpoints/best point at it (built aside, then swapped in)."""
        self.ckpt.wait()
        if self.is_main:
            src, tmp, old = self.ckpt.root / f"step_{step}", self.path.with_name("best.tmp"), self.path.with_name("best.old")
            shutil.rmtree(tmp, ignore_errors=True)
            link_tree(src, tmp)
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
            log.info("best checkpoint: %s (step %d)", self.path, step)
        barrier()

    def directory(self) -> Path | None:
        return self.path if (self.path / "COMMITTED").exists() else None
