"""What `data.train` / `data.eval` name: files with mixture weights and names, checked
before launch. Kept apart from sources.py (which imports torch through the batches) so
the launcher's checks and dry run stay light."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainers.errors import UserError

SPEC_HELP = (
    "Accepted: a path (JSONL, parquet or a datasets folder) or hf:NAME[:SPLIT] (datasets' "
    "load_dataset / a save_to_disk folder); a list of them (concatenated); or a list of "
    "{path: ..., weight: ..., name: ...} entries (name optional; weights on every entry or on none), e.g. "
    "data.train='[{path: task.jsonl, weight: 0.8}, {path: replay.jsonl, weight: 0.2}]'"
)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    # None: the sources are concatenated, each contributing rows in proportion to its
    # size (trainers/data/sources.open_data sets the weight to its row count)
    weight: float | None = 1.0


def _default_name(path: str) -> str:
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        base = re.sub(r"[^\w.-]+", "_", Path(name).name or name)
        return f"{base}/{split}" if split else base
    p = Path(path)
    stem = p.stem if p.suffix else p.name
    return f"{p.parent.name}/{stem}" if stem in ("train", "eval", "test", "validation") else stem


def parse_sources(value, key: str) -> list[SourceSpec]:
    """data.train / data.eval -> named sources; a clear error for anything else."""
    if value is None:
        return []
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        value = [{"name": k, "path": v} for k, v in value.items()]
    if not isinstance(value, list) or not value:
        raise UserError(f"{key}={value!r} is not a data source. {SPEC_HELP}.")
    specs = []
    for entry in value:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or set(entry) - {"path", "weight", "name"}:
            raise UserError(f"{key} entry {entry!r} is not a data source. {SPEC_HELP}.")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
            raise UserError(f"{key} entry {entry['path']!r} has weight {weight!r}; a weight must be a positive number.")
        specs.append(SourceSpec(str(entry.get("name") or _default_name(entry["path"])), entry["path"],
                                None if weight is None else float(weight)))
    weighted = [s.name for s in specs if s.weight is not None]
    if weighted and len(weighted) < len(specs):
        raise UserError(
            f"{key} gives a weight to {weighted} but not to {[s.name for s in specs if s.weight is None]}. "
            f"Weight every entry (a mixture: each source's share of every batch) or none (the files "
            f"are concatenated: each contributes rows in proportion to its size)."
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"{key} has two sources named alike ({names}); give them distinct `name:` fields.")
    bad = [s.name for s in specs if not re.fullmatch(r"[\w./-]+", s.name)]
    if bad:
        raise UserError(f"{key} source names {bad} may use only letters, digits, '_', '-', '.', '/'.")
    return specs


def held_out_names(cfg) -> list[str]:
    """The eval sets data.eval_split holds out: one per training source."""
    if cfg.data.eval_split is None:
        return []
    train = parse_sources(cfg.data.train, "data.train")
    return ["held_out"] if len(train) == 1 else [f"held_out/{s.name}" for s in train]


def row_kind(cfg) -> str:
    """The kind of row the objective reads (trainers.data.rows.ROW_KINDS)."""
    from trainers.objectives.settings import OBJECTIVE_ROWS, check_objective_name

    check_objective_name(cfg.objective.name)
    return OBJECTIVE_ROWS[cfg.objective.name]


def probe_specs(cfg, eval_names: list[str]) -> list[SourceSpec]:
    """eval.probes: held-out sets scored by loss only, after data.eval's (the general-ability
    probe that measures forgetting). SFT objectives only: a preference loss needs pairs.
    They ride along with data.eval: data.eval=null still means no evaluation at all."""
    if row_kind(cfg) != "sft" or not cfg.eval.probes or not eval_names:
        return []
    specs = parse_sources(cfg.eval.probes, "eval.probes")
    for spec in specs:
        if spec.name in eval_names:
            raise UserError(f"eval.probes has a set named {spec.name!r}, like one of data.eval's sets "
                            f"({', '.join(eval_names)}); give the probe another name, e.g. "
                            f"'eval.probes={{general_probe: {spec.path}}}'.")
    return specs
