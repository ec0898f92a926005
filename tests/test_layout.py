"""The floor plan stays readable: the arrows between packages point one way (launch ->
slurm, parallel -> trainers; trainers imports none of them; slurm not launch), and the top of
trainers/ holds the loop's own components, at most 15 files, the rest in wings."""
from __future__ import annotations

import ast

from tests.helpers import REPO

FORBIDDEN = {"trainers": ("launch", "slurm", "parallel"), "parallel": ("launch", "slurm"), "slurm": ("launch",)}


def imported_packages(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way():
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            bad = imported_packages(path) & set(forbidden)
            if bad:
                wrong.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not wrong, "\n".join(wrong)


def test_trainers_top_level_holds_at_most_15_files_and_each_wing_says_what_lives_there():
    top = sorted(p.name for p in (REPO / "trainers").glob("*.py"))
    assert len(top) <= 15, top
    for wing in (p for p in (REPO / "trainers").iterdir() if p.is_dir() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse((wing / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"trainers/{wing.name}/__init__.py needs a docstring saying what lives there"


# Binary files the tree may hold above 1 MB, each with its reason. Anything else (a wheel, a
# checkpoint, a dataset dump) comes from a registry or is generated, never committed.
LARGE_BINARIES = {
    "assets/tiny-llama/model.safetensors": "the bundled 0.8M-parameter base the default run and the tests train "
                                            "(3.2 MB fp32; scripts/build_tiny_base.py rebuilds it byte for byte)",
}


def test_no_binary_over_1_mb_is_committed():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    large = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.stat().st_size <= 2**20 or name in LARGE_BINARIES:
            continue
        if b"\0" in path.read_bytes()[:8192]:  # text (a corpus, JSONL) has no NUL bytes
            large.append(f"{name} ({path.stat().st_size / 2**20:.1f} MiB)")
    assert not large, large
