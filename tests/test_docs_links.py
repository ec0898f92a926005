"""README.md and docs/*.md link each other by relative paths and heading anchors: every such
link leads to a file that exists and, with `#anchor`, to a heading of that file (GitHub's
slugs). Each doc starts with one line saying what a reader finds there."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, re.M)}


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_lead_to_a_file_and_heading(doc):
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in LINK.findall(text):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name} (has {sorted(anchors(dest))})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS[1:], ids=[d.name for d in DOCS[1:]])
def test_each_doc_starts_with_what_a_reader_finds_there(doc):
    first = doc.read_text().split("\n", 1)[0]
    assert first and not first.startswith(("#", "<!--", "```")) and first.endswith("."), first


def test_slug_is_githubs():
    assert slug("Memory at scale") == "memory-at-scale"
    assert slug("What `python launch.py` does") == "what-python-launchpy-does"
    assert slug("SLURM and sweeps") == "slurm-and-sweeps"
