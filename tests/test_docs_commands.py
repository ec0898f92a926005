"""Every `python launch.py ...` command that README.md and docs/*.md show works as shown, so a
command a user copies works. The commands are read from the files when the tests are
collected, so a doc added later is covered without touching this file.

How each command runs (a few steps: `SHORT` is appended, later overrides win):
- a local command trains for 2 steps with a small eval and must complete;
- a cluster command (`launcher=slurm...`) and a multirun (`-m`) run with `dry_run=true`:
  everything before submission (validation, the estimate, the sbatch script) must pass;
- a command in a fenced block marked, on the line right before the block, with
  `<!-- docs-test: dry-run (REASON) -->` (GPU-only, weights this machine lacks) runs with
  `dry_run=true`; the reason is required;
- a command in a block marked `<!-- docs-test: refused -->` shows a refusal: it must exit 2
  with one `error:` paragraph, before anything starts;
- Hydra's own flags (`--cfg job`) run as the command line they are.
Placeholders: `RUN` / `SFT_RUN` are the run directory of the default command (made first;
`RUN_PLACEHOLDERS` names the runs), and the file names in `PLACEHOLDER_FILES` are small slices of the bundled data. A doc that
shows another file name adds it there. Identical commands (the same overrides once the
appended ones win) run once. All launches share one process (tests/helpers.launch_many).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, launch_many

SHORT = ("train.max_steps=2", "train.eval_every=1000", "train.save_every=1000", "data.metric_rows=2")
DRY = ("dry_run=true",)
# name a doc uses -> (bundled file, first row, rows): written once per session
PLACEHOLDER_FILES = {
    "my.jsonl": ("data/reverse/train.jsonl", 0, 64),
    "my_eval.jsonl": ("data/reverse/eval.jsonl", 0, 16),
    "task.jsonl": ("data/reverse/train.jsonl", 0, 64),
    "replay.jsonl": ("data/reverse/train.jsonl", 64, 32),
    "task_eval.jsonl": ("data/reverse/eval.jsonl", 0, 16),
    "other_eval.jsonl": ("data/reverse/eval.jsonl", 16, 16),
    "pairs.jsonl": ("data/reverse_pref/train.jsonl", 0, 64),
    "heldout.jsonl": ("data/reverse_pref/eval.jsonl", 0, 16),
}
# placeholder -> the documented command (its overrides) whose run directory it names; each is
# launched first, once. A doc that needs another kind of run (a reward model, ...) adds it here.
RUN_PLACEHOLDERS = {"RUN": (), "SFT_RUN": ()}
RUN_PLACEHOLDER = re.compile(r"\b(" + "|".join(sorted(RUN_PLACEHOLDERS, key=len, reverse=True)) + r")\b")
FILE_PLACEHOLDER = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, PLACEHOLDER_FILES)) + r")(?![\w.-])")
MARKS = {"dry-run", "refused"}
FENCE = re.compile(r"^(?:<!--\s*docs-test:\s*(?P<mark>[^>]*?)\s*-->[ \t]*\n)?^```[^\n]*\n(?P<body>.*?)^```",
                   re.M | re.S)
COMMAND_LINE = re.compile(r"^(?:\$\s+)?(?:\S*/)?python3?\s+launch\.py(?=\s|$)")
INLINE = re.compile(r"`((?:\S*/)?python3?\s+launch\.py(?:\s[^`]*)?)`")


@dataclass(frozen=True)
class DocCommand:
    where: str                # README.md:12
    args: tuple[str, ...]     # what follows `python launch.py`, placeholders unresolved
    mark: str | None = None   # "dry-run" | "refused" | None

    @property
    def multirun(self) -> bool:
        return "-m" in self.args or "--multirun" in self.args

    @property
    def hydra_flags(self) -> bool:
        """--cfg, --help, ...: Hydra's own entry point, not a launch."""
        return any(a.startswith("-") and a not in ("-m", "--multirun") for a in self.args)

    @property
    def dry(self) -> bool:
        cluster = any(re.fullmatch(r"launcher=slurm\w*", a) for a in self.args)
        return self.mark == "dry-run" or cluster or self.multirun or "dry_run=true" in self.args

    def overrides(self) -> tuple[str, ...]:
        """What the launch gets: the doc's overrides (its own run/sweep dir left out: the test
        chooses it) and then SHORT or dry_run=true."""
        own = tuple(a for a in self.args if a not in ("-m", "--multirun")
                    and not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
        if self.hydra_flags:
            return own
        if self.dry or self.mark == "refused":
            return own + tuple(d for d in DRY if d not in own)
        return own + SHORT

    def key(self) -> tuple:
        """Commands that end up with the same effective overrides run once."""
        if self.hydra_flags:
            return ("hydra", self.overrides())
        last: dict[str, str] = {}
        for o in self.overrides():
            name, _, value = o.partition("=")
            last.pop(name, None)
            last[name] = RUN_PLACEHOLDER.sub(lambda m: repr(RUN_PLACEHOLDERS[m.group(1)]), value)
        return ("multirun" if self.multirun else "launch", self.mark == "refused", tuple(last.items()))


def _parse_mark(mark: str | None, where: str) -> str | None:
    if not mark:
        return None
    m = re.fullmatch(r"(?P<word>[\w-]+)(?:\s*\((?P<reason>[^)]+)\))?", mark)
    if not m or m["word"] not in MARKS:
        raise ValueError(f"{where}: unknown docs-test marker {mark!r}; known: {sorted(MARKS)}")
    if m["word"] == "dry-run" and not m["reason"]:
        raise ValueError(f"{where}: a dry-run marker says why the command cannot run here: "
                         f"<!-- docs-test: dry-run (needs 8 GPUs) -->")
    return m["word"]


def extract(text: str, name: str) -> list[DocCommand]:
    """The `python launch.py` commands of one markdown text: lines of fenced blocks (with `\\`
    continuations and `#` comments) and inline code spans outside them (which may wrap)."""
    found: list[tuple[int, DocCommand]] = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start("body")) + 1
        where = f"{name}:{first - 1}"
        mark = _parse_mark(block["mark"], where)
        lines = block["body"].split("\n")
        i = 0
        while i < len(lines):
            line, start = lines[i], i
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            if COMMAND_LINE.match(line.strip()):
                words = shlex.split(line.strip(), comments=True)
                launch_at = words.index("launch.py")
                found.append((block.start(), DocCommand(f"{name}:{first + start}", tuple(words[launch_at + 1:]), mark)))
    outside = FENCE.sub(lambda b: re.sub(r"[^\n]", " ", b.group(0)), text)  # same offsets, no blocks
    for span in INLINE.finditer(outside):
        words = shlex.split(span.group(1))
        line = text.count("\n", 0, span.start()) + 1
        found.append((span.start(), DocCommand(f"{name}:{line}", tuple(words[words.index("launch.py") + 1:]))))
    return [c for _, c in sorted(found, key=lambda f: f[0])]


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_commands() -> list[DocCommand]:
    return [c for path in doc_files() for c in extract(path.read_text(), str(path.relative_to(REPO)))]


def unique_commands() -> dict[tuple, list[DocCommand]]:
    out: dict[tuple, list[DocCommand]] = {}
    for c in doc_commands():
        out.setdefault(c.key(), []).append(c)
    return out


UNIQUE = unique_commands()


def named_runs() -> dict[str, DocCommand]:
    """A doc that runs `python launch.py ... hydra.run.dir=runs/sft` and then points a later
    command at `runs/sft/export/merged` names a run by its directory: PATH -> its command."""
    out = {}
    for c in doc_commands():
        for a in c.args:
            if a.startswith("hydra.run.dir="):
                out.setdefault(a.partition("=")[2], DocCommand(c.where, tuple(
                    x for x in c.args if not x.startswith("hydra.run.dir=")), c.mark))
    return out


def resolve(args: tuple[str, ...], runs: dict[str, Path], files: dict[str, Path]) -> list[str]:
    out = []
    for a in args:
        a = RUN_PLACEHOLDER.sub(lambda m: str(runs[m.group(1)]), a)
        for path in sorted((r for r in runs if r not in RUN_PLACEHOLDERS), key=len, reverse=True):
            if "=" in a and not a.startswith("hydra."):
                a = re.sub(r"(?<=[=\[{ ,])" + re.escape(path) + r"(?=/|$|[],} ])", str(runs[path]), a)
        out.append(FILE_PLACEHOLDER.sub(lambda m: str(files[m.group(1)]), a))
    return out


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> dict[tuple, subprocess.CompletedProcess]:
    """key -> outcome of every distinct documented command: the default run first (it is
    RUN), then every other launch in one process, then Hydra flag commands and multiruns as
    the command lines they are."""
    root = tmp_path_factory.mktemp("docs-commands")
    files = {}
    for name, (source, first, count) in PLACEHOLDER_FILES.items():
        rows = (REPO / source).read_text().splitlines()[first:first + count]
        files[name] = root / "files" / name
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_text("\n".join(rows) + "\n")
    made = {name: DocCommand("", args) for name, args in RUN_PLACEHOLDERS.items()}  # the runs, first
    made.update(named_runs())
    keys = list(dict.fromkeys([c.key() for c in made.values()] + [k for k in UNIQUE if k[0] == "launch"]))
    runs = {name: root / f"c{keys.index(c.key())}" for name, c in made.items()}
    first = {c.key(): c for c in made.values()}
    launches = {f"c{i}": (root / f"c{i}", resolve((UNIQUE.get(k) or [first[k]])[0].overrides(), runs, files))
                for i, k in enumerate(keys)}
    results = launch_many(root, launches, timeout=1500, check=False)
    out = {k: results[f"c{i}"] for i, k in enumerate(keys)}
    for i, (k, commands) in enumerate(UNIQUE.items()):
        if k[0] == "launch":
            continue
        c = commands[0]
        extra = [f"hydra.sweep.dir={root / f'sweep{i}'}"] if c.multirun else [f"hydra.run.dir={root / f'h{i}'}"]
        cmd = [sys.executable, str(REPO / "launch.py"), *(["-m"] if c.multirun else []),
               *resolve(c.overrides(), runs, files), *extra]
        out[k] = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    return out


def _case_id(key: tuple) -> str:
    c = UNIQUE[key][0]
    return f"{c.where} {' '.join(c.args)}"[:120]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(UNIQUE), ids=[_case_id(k) for k in UNIQUE])
def test_documented_command_works(key, doc_runs):
    commands = UNIQUE[key]
    c = commands[0]
    got = doc_runs[key]
    shown = "\n".join(f"{d.where}: python launch.py {' '.join(d.args)}" for d in commands)
    text = f"{shown}\nran with: {' '.join(c.overrides())}\n--- stdout\n{got.stdout[-3000:]}\n--- stderr\n{got.stderr[-5000:]}"
    if c.mark == "refused":
        assert got.returncode == 2 and "error: " in got.stderr and "Traceback" not in got.stderr, text
        assert got.left["summary"] is None, text
    elif c.hydra_flags or c.multirun:
        assert got.returncode == 0 and "Traceback" not in got.stderr and "error: " not in got.stderr, text
        if c.multirun:  # every point of the sweep passed its dry run
            points = 1
            for a in c.args:
                if "=" in a and "," in a.partition("=")[2] and not a.partition("=")[2].startswith(("[", "{")):
                    points *= len(a.partition("=")[2].split(","))
            assert got.stdout.count("dry run: nothing started") == points, text
    elif c.dry:
        assert got.returncode == 0 and "dry run: nothing started" in got.stdout, text
        assert got.left["summary"] is None, text
    else:
        assert got.returncode == 0, text
        summary = got.left["summary"]
        assert summary and summary["status"] == "completed" and summary["final_step"] == 2, text


MARKDOWN = """Intro `python launch.py a=1
b=2` and `python -m launch.status RUN_DIR`.

```bash
export X=1
python launch.py c=3 \\
    'd=["e f"]'   # a comment
.venv/bin/python launch.py -m g=1,2
```

<!-- docs-test: dry-run (needs GPUs) -->
```bash
python launch.py model=8b
```

<!-- docs-test: refused -->
```
python launch.py model=70b method=full parallel=ddp launcher=slurm
```
"""


def test_extract_reads_blocks_continuations_inline_spans_and_markers():
    got = extract(MARKDOWN, "x.md")
    assert [(c.where, c.args, c.mark) for c in got] == [
        ("x.md:1", ("a=1", "b=2"), None),
        ("x.md:6", ("c=3", 'd=["e f"]'), None),
        ("x.md:8", ("-m", "g=1,2"), None),
        ("x.md:13", ("model=8b",), "dry-run"),
        ("x.md:18", ("model=70b", "method=full", "parallel=ddp", "launcher=slurm"), "refused"),
    ]
    assert got[0].overrides() == ("a=1", "b=2", *SHORT) and got[3].overrides() == ("model=8b", *DRY)
    assert got[2].multirun and got[2].dry and got[4].dry
    # a later override of the same key wins, so these two are one command
    assert DocCommand("", ("train.max_steps=2000",)).key() == DocCommand("", ()).key()
    with pytest.raises(ValueError, match="says why"):
        extract("<!-- docs-test: dry-run -->\n```\npython launch.py\n```\n", "y.md")
    with pytest.raises(ValueError, match="unknown docs-test marker"):
        extract("<!-- docs-test: skip -->\n```\npython launch.py\n```\n", "y.md")


def test_docs_show_the_headline_commands():
    """The extraction finds what README promises (guards against a regex that finds nothing)."""
    shown = {" ".join(c.args) for c in doc_commands()}
    assert "" in shown  # `python launch.py`
    assert any(s.startswith("model=70b method=qlora parallel=zero3 launcher=slurm") for s in shown), shown
    assert len(UNIQUE) >= 10, UNIQUE.keys()
