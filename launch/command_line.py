"""What is refused on the raw command line, before Hydra composes, prints or writes anything.

Hydra prints the config (`--cfg job`), creates the run directory and writes
RUN_DIR/.hydra/ before the launcher's own checks run: a credential typed on the command
line would already be on screen and on disk, and a run directory that is a file or cannot
be written would end in Hydra's traceback. A mistyped group option (`optim=adamw9bit`) would
end in Hydra's "Could not find" text, and under `-m` only after the points before it ran.
These three are checked here first; everything else is checked on the composed config
(launch/validate.py).
"""
from __future__ import annotations

import contextlib
import difflib
import io
import math
import re
import sys
import tempfile
from pathlib import Path

from launch import credentials
from trainers.errors import UserError

RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
CONF = Path(__file__).resolve().parent.parent / "conf"


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


def _group_overrides(argv: list[str], groups: list[str]) -> list:
    """Hydra's parse of the overrides that choose an option of one of `groups`; none when the
    command line points Hydra at another config (it checks those itself) or does not parse
    (Hydra reports that in its own words)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
        if args.config_path or args.config_name or args.config_dir or args.shell_completion:
            return []
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, Exception):  # noqa: BLE001 - Hydra refuses it next, with its own message
        return []
    if any(o.key_or_group == "hydra.searchpath" for o in overrides):
        return []
    return [o for o in overrides if o.key_or_group in groups and not o.is_delete()]


def _chosen(override) -> list[str]:
    """The option names an override chooses: one, a list (`g=[a,b]`) or a sweep (`g=a,b`,
    `g=choice(a,b)`); a glob or range sweep chooses among existing options only."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [str(v) for v in value.list]
    if isinstance(value, list):
        return [str(v) for v in value]
    if value is None or override.is_sweep_override():
        return []
    return [str(value)]


def _nearest(value: str, accepted: list[str]) -> str | None:
    """The accepted option a typo most likely meant: for sizes (model=7b) the nearest size,
    since by spelling 7b is closer to 70b than to 8b; else the closest spelling."""
    size = re.fullmatch(r"(\d+(?:\.\d+)?)b", value.lower())
    sizes = {o: float(o[:-1]) for o in accepted if re.fullmatch(r"\d+(?:\.\d+)?b", o)}
    if size and sizes:
        return min(sizes, key=lambda o: abs(math.log(sizes[o] / max(float(size[1]), 1e-3))))
    close = difflib.get_close_matches(value, accepted, n=1, cutoff=0.5)
    return close[0] if close else None


def check_group_options(argv: list[str]) -> None:
    """Every `group=option` names a file conf/group/option.yaml, the sweep's points included."""
    named = {a.lstrip("+~").partition("=")[0] for a in argv}
    if not any((CONF / name).is_dir() for name in named if name and "/" not in name and "." not in name):
        return  # no group chosen: the common case costs no parse
    from launch.schema import groups, options

    known = groups()
    for override in _group_overrides(argv, known):
        group = override.key_or_group
        accepted = options(group)
        for value in _chosen(override):
            if value in accepted:
                continue
            nearest = _nearest(value, accepted)
            hint = f" Did you mean {group}={nearest}?" if nearest else ""
            raise UserError(f"{group}={value} is not an option of the config group `{group}`: conf/{group}/ holds "
                            f"{', '.join(accepted)} (one .yaml file per option).{hint}")


def check(argv: list[str]) -> None:
    credentials.check_overrides(argv)
    check_group_options(argv)
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
