"""Pure parts of trainers/checkpoint.py, in-process: disk-full detection through the
wrappers writers put around ENOSPC, and which committed checkpoint a resume tries first."""
from __future__ import annotations

import errno
import os

from trainers.checkpoint import is_disk_full
from trainers.checkpoint_files import MARKER, committed_steps, latest_checkpoint, resume_candidates


def raised(make):
    """The exception `make()` raises, with its __cause__/__context__ as Python sets them."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - the point is to keep whatever it was
        return e
    raise AssertionError("nothing raised")


def enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/x.pt")


def test_enospc_itself_and_other_os_errors():
    assert is_disk_full(raised(enospc))
    assert is_disk_full(OSError(errno.ENOSPC, "another rank ran out of space writing /tmp/step_4.tmp"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    assert not is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))  # a quota, not a full disk
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("No space left on device"))  # text alone is not evidence


def test_enospc_found_behind_wrappers():
    def torch_save_style():  # torch.save: RuntimeError raised while handling the OSError
        try:
            enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 0")

    def explicit_cause():
        try:
            torch_save_style()
        except RuntimeError as e:
            raise ValueError("save failed") from e

    assert is_disk_full(raised(torch_save_style))
    assert is_disk_full(raised(explicit_cause))  # two levels down
    hidden = raised(explicit_cause)
    hidden.__suppress_context__ = True  # `from None` hides it from the traceback, not from the check
    assert is_disk_full(hidden)


def test_enospc_in_one_rank_of_a_dcp_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    other = raised(lambda: 1 / 0)
    full = CheckpointException("CheckpointException ranks:dict_keys([0, 1])",
                               {0: _wrap_exception(other), 1: _wrap_exception(raised(enospc))})
    assert is_disk_full(full)
    assert not is_disk_full(CheckpointException("x", {0: _wrap_exception(other)}))

    def async_save_failed():  # the async writer's future re-raises it wrapped
        try:
            raise full
        except CheckpointException:
            raise RuntimeError("async save failed")

    assert is_disk_full(raised(async_save_failed))


def test_cycles_in_the_exception_chain_end():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_disk_full(a)
    b.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(a)


def commit(root, *steps, uncommitted=()):
    for s in (*steps, *uncommitted):
        (root / f"step_{s}").mkdir(parents=True)
    for s in steps:
        (root / f"step_{s}" / MARKER).write_text("ok\n")


def test_resume_tries_latest_then_older_commits_never_a_newer_timeline(tmp_path):
    root = tmp_path / "checkpoints"
    assert committed_steps(root) == [] and latest_checkpoint(root) is None
    commit(root, 3, 12, 6, 9, uncommitted=(15,))
    (root / "step_x").mkdir()
    (root / "notes").write_text("")
    assert committed_steps(root) == [3, 6, 9, 12]  # numeric order, committed only
    assert latest_checkpoint(root) == root / "step_12"  # no pointer: a scan
    (root / "latest").write_text("step_6\n")  # a resume from 6 replaced 9 and 12's timeline
    assert resume_candidates(root) == [root / "step_6", root / "step_3"]
    for pointer in ("step_15", "garbage", ""):  # names no committed step: a scan again
        (root / "latest").write_text(pointer)
        assert resume_candidates(root) == [root / f"step_{s}" for s in (12, 9, 6, 3)], pointer
