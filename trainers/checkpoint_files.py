"""What a checkpoint directory holds, read without torch: which steps are committed, the
order a resume tries them, and the manifest that proves a file unchanged since its
commit. The launcher's pre-launch checks read these; trainers/checkpoint.py writes them."""
from __future__ import annotations

import json
import re
from pathlib import Path

from trainers.files import file_digest

MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


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
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


def resume_candidates(root: Path) -> list[Path]:
    """Committed checkpoints in the order a resume tries them: the one `latest` names,
    then older ones, newest first. Newer directories than `latest` are left out: they
    belong to a timeline that a resume from an older checkpoint has since replaced."""
    steps = committed_steps(root)
    pointer = root / "latest"
    if pointer.exists():
        m = STEP_DIR.match(pointer.read_text().strip())
        if m and int(m.group(1)) in steps:
            steps = [s for s in steps if s <= int(m.group(1))]
    return [root / f"step_{s}" for s in reversed(steps)]


# ----------------------------------------------------------------------- integrity
def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint that the manifest covers, as sorted relative paths."""
    skip = {MANIFEST, MARKER}
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*")
                  if f.is_file() and str(f.relative_to(directory)) not in skip)


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": file_digest(directory / n)} for n in names}


def check_files(directory: Path, expected: dict[str, dict]) -> list[str]:
    """What is wrong with these files of a checkpoint (empty if they match). The size is
    compared first: a truncated file is reported without reading it."""
    problems = []
    for name, want in expected.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{path} has {size} bytes, {want['bytes']} when committed (truncated or overwritten)")
        elif file_digest(path) != want["sha256"]:
            problems.append(f"{path} does not match its checksum (its bytes changed after the commit)")
    return problems


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's files, None for a checkpoint written before manifests existed;
    ValueError if it is unreadable (itself damage)."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__})") from None


def readable_trainer_state(directory: Path) -> dict | None:
    """trainer_state.json if it matches the manifest (cheap: one small file), else None.
    Lets the launcher's pre-checks skip a damaged newest checkpoint like the resume will."""
    try:
        manifest = read_manifest(directory)
    except ValueError:
        return None
    name = "trainer_state.json"
    if manifest is not None and (name not in manifest or check_files(directory, {name: manifest[name]})):
        return None
    try:
        return json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return None
