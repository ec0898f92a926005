"""What is refused on the raw command line, before Hydra composes, prints or writes anything.

Hydra prints the config (`--cfg job`), creates the run directory and writes
RUN_DIR/.hydra/ before the launcher's own checks run: a credential typed on the command
line would already be on screen and on disk, and a run directory that is a file or cannot
be written would end in Hydra's traceback. These two are checked here first; everything
else is checked on the composed config (launch/validate.py).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from launch import credentials
from trainers.errors import UserError

RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def check_run_dir(value: str, key: str = "hydra.run.dir") -> None:
    """`value` is a directory this process can create or write into."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={value!r} is an existing file, not a directory: the run directory holds the "
                        f"config, checkpoints, metrics and export. Give a new or existing directory, e.g. "
                        f"{key}=runs/my-run.")
    here = path
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise UserError(f"{key}={value!r} cannot be created: {here} is a file. Give a directory path, e.g. "
                        f"{key}=runs/my-run.")
    try:  # os.access says yes to root even on a read-only file system: try it
        with tempfile.TemporaryFile(dir=here):
            pass
    except OSError as e:
        raise UserError(f"{key}={value!r} cannot be written: creating a file in {here} fails ({e.strerror}). "
                        f"Give a directory you can write, e.g. {key}=runs/my-run.") from None


def check(argv: list[str]) -> None:
    credentials.check_overrides(argv)
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in RUN_DIR_KEYS and value:
            check_run_dir(value, key)


def refuse_or_continue(argv: list[str]) -> None:
    """Exit with code 2 and one paragraph if the command line is refused."""
    try:
        check(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def composed_refusal(cfg) -> int:
    """The composed config's credentials and unknown keys, refused before the launcher's
    heavier imports (launch.main checks them again for in-process callers): exit code 2
    and one paragraph, or 0."""
    from launch.schema import check_closed

    try:
        credentials.check_config(cfg)
        check_closed(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
