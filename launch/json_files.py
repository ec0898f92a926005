"""Small JSON files that several processes update (SLURM run state, sweep manifest and
summary): reads that tolerate a missing or half-written file, atomic writes, and
read-modify-write under a file lock."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on PATH.lock (PATH's directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def update_json(path: Path, change) -> dict:
    """Apply `change(data)` to the JSON object in `path` under its lock; returns the result."""
    with locked(path):
        data = read_json(path)
        change(data)
        write_json(path, data)
    return data
