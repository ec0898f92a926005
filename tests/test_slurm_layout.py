"""slurm/ is a backend the launcher calls: launch/ -> slurm/ is the only arrow between them."""
from __future__ import annotations

import ast

from tests.helpers import REPO


def imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative: from . import x / from .. import y
            out.add("." * node.level + (node.module or ""))
    return out


def test_nothing_in_slurm_imports_launch():
    files = sorted((REPO / "slurm").glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "submit.py", "task.py", "after_srun.py", "sbatch.py",
                                       "scheduler.py", "secrets.py", "hands.py"}
    bad = {p.name: sorted(m for m in imported_modules(p) if m == "launch" or m.startswith(("launch.", "..")))
           for p in files}
    assert not {k: v for k, v in bad.items() if v}, bad
    assert not (REPO / "launch" / "slurm.py").exists() and not (REPO / "launch" / "sbatch.py").exists()
