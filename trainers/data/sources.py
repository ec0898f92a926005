"""The data a run trains and evaluates on: which files (with mixture weights), their
token caches, and their packing.

The launcher calls `prepare_data` before any process is spawned: it validates every row
and builds (or finds) each file's token cache, the same pass, and records the cache
folders in the run's config. Workers then only open those folders (`open_data`), so a
dataset is tokenized once, not once per rank and per requeue. Code that calls the loop
directly (tests, benchmarks) gets the same caches prepared on first use, under a lock.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainers.data.batches import BatchLayout, GlobalBatches, Source
from trainers.errors import UserError
from trainers.files import atomic_write, locked
from trainers.data.packing import best_fit_decreasing
from trainers.model.peft_methods import SUPPORTS_PACKING
from trainers.data.token_cache import DataReport, TokenStore, ensure

SPEC_HELP = (
    "Accepted: a path (JSONL, parquet or a datasets folder); a list of paths; or a list of "
    "{path: ..., weight: ..., name: ...} entries (weight and name optional), e.g. "
    "data.train='[{path: task.jsonl, weight: 0.8}, {path: replay.jsonl, weight: 0.2}]'"
)


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    weight: float = 1.0


def _default_name(path: str) -> str:
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
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise UserError(f"{key} entry {entry['path']!r} has weight {weight!r}; a weight must be a positive number.")
        specs.append(SourceSpec(str(entry.get("name") or _default_name(entry["path"])), entry["path"], float(weight)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"{key} has two sources named alike ({names}); give them distinct `name:` fields.")
    bad = [s.name for s in specs if not re.fullmatch(r"[\w./-]+", s.name)]
    if bad:
        raise UserError(f"{key} source names {bad} may use only letters, digits, '_', '-', '.', '/'.")
    return specs


def row_kind(cfg) -> str:
    """The kind of row the objective reads (trainers.data.rows.ROW_KINDS)."""
    from trainers.objectives.catalog import OBJECTIVE_ROWS, check_objective_name

    check_objective_name(cfg.objective.name)
    return OBJECTIVE_ROWS[cfg.objective.name]


def is_packed(cfg) -> bool:
    """data.packing, where the method keeps attention inside each packed sequence. SFT rows
    are packed once per cache entry (best-fit-decreasing bins over the whole file);
    preference sequences, scored one by one, are packed per micro-batch
    (batches.collate_sequences)."""
    return bool(cfg.data.packing) and cfg.method.peft in SUPPORTS_PACKING


def packs_bins(cfg) -> bool:
    return is_packed(cfg) and row_kind(cfg) == "sft"


def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir)


def _bins_paths(folder: Path, capacity: int) -> tuple[Path, Path]:
    return folder / f"bins-bfd-{capacity}.order.bin", folder / f"bins-bfd-{capacity}.offsets.bin"


def _ensure_bins(folder: Path, capacity: int) -> None:
    order_path, offsets_path = _bins_paths(folder, capacity)
    if offsets_path.exists():
        return
    with locked(folder):
        if offsets_path.exists():
            return
        order, offsets = best_fit_decreasing(TokenStore(folder).lengths, capacity)
        for path, arr in ((order_path, order), (offsets_path, offsets)):  # offsets last: it marks completion
            atomic_write(path, arr.astype(np.int64).tobytes())


def _open_bins(folder: Path, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    order_path, offsets_path = _bins_paths(folder, capacity)
    if not offsets_path.exists():
        raise UserError(
            f"The data cache {str(folder)!r} has no packing for data.max_seq_len={capacity}. Launch "
            f"through launch.py (it packs the cache before starting workers), or delete the folder."
        )
    return np.memmap(order_path, dtype=np.int64, mode="r"), np.memmap(offsets_path, dtype=np.int64, mode="r")


def prepare_data(cfg, tokenizer) -> tuple[dict, list[DataReport]]:
    """Validate, tokenize and pack every source (or find it cached). Returns what the
    workers open (saved in the run's config as data.prepared) and one report per file."""
    root = cache_root(cfg)
    kind = row_kind(cfg)
    prepared: dict = {"train": [], "eval": []}
    reports = []
    for split in ("train", "eval"):
        for spec in parse_sources(cfg.data.get(split), f"data.{split}"):
            folder, built = ensure(spec.path, tokenizer, cfg.data, root, kind)
            if packs_bins(cfg):
                _ensure_bins(folder, int(cfg.data.max_seq_len))
            report = TokenStore(folder).report()
            report.cached = not built
            reports.append(report)
            prepared[split].append({"name": spec.name, "path": spec.path, "weight": spec.weight, "dir": str(folder)})
    return prepared, reports


@dataclass
class TrainingData:
    train: list[Source]
    eval: list[Source]
    packed: bool
    reports: list[DataReport]


def open_data(cfg, tokenizer) -> TrainingData:
    """The memory-mapped sources the launcher prepared (prepared here if it did not)."""
    prepared = cfg.data.get("prepared")
    if prepared is None:
        prepared, _ = prepare_data(cfg, tokenizer)
    packed, binned = is_packed(cfg), packs_bins(cfg)

    def source(entry) -> Source:
        folder = Path(entry["dir"])
        bins = _open_bins(folder, int(cfg.data.max_seq_len)) if binned else None
        return Source(entry["name"], TokenStore(folder), entry["weight"], bins, str(entry["path"]))

    train = [source(e) for e in prepared["train"]]
    evals = [source(e) for e in prepared["eval"]]
    return TrainingData(train, evals, packed, [s.store.report() for s in train + evals])


def training_batches(cfg, tokenizer, dp_world: int) -> tuple[GlobalBatches, TrainingData]:
    """The (seed, step) batch order over the opened training sources."""
    data = open_data(cfg, tokenizer)
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if row_kind(cfg) == "prompts":  # GRPO: a row is a prompt; each becomes objective.num_generations completions
        mb, accum = mb * accum // int(cfg.objective.num_generations), 1
    layout = BatchLayout(mb, accum, dp_world)
    return GlobalBatches(data.train, layout, cfg.seed, tokenizer.pad_token_id, data.packed,
                         int(cfg.data.max_seq_len)), data
