"""The data a run trains and evaluates on: which files (with mixture weights), their
token caches, and their packing.

The launcher calls `prepare_data` before any process is spawned: it validates every row
and builds (or finds) each file's token cache, the same pass, and records the cache
folders in the run's config. Workers then only open those folders (`open_data`), so a
dataset is tokenized once, not once per rank and per requeue. Code that calls the loop
directly (tests, benchmarks) gets the same caches prepared on first use, under a lock.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from trainers.data.batches import BatchLayout, GlobalBatches, Source
from trainers.data.source_specs import held_out_names, parse_sources, probe_specs, row_kind
from trainers.errors import UserError
from trainers.files import atomic_write, locked
from trainers.data.packing import best_fit_decreasing
from trainers.model.peft_methods import SUPPORTS_PACKING
from trainers.data.selection import derive, select
from trainers.data.token_cache import ARRAYS, DataReport, TokenStore, ensure

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
    held_out_sets = iter(held_out_names(cfg))
    for split in ("train", "eval"):
        for spec in parse_sources(cfg.data[split], f"data.{split}"):
            folder, built = ensure(spec.path, tokenizer, cfg.data, root, kind)
            entries = [(split, spec.name, spec.weight, folder)]
            if cfg.data.max_samples is not None or (split == "train" and cfg.data.eval_split is not None):
                kept, held_out = _select(cfg, TokenStore(folder), split)
                entries = [(split, spec.name, spec.weight, kept)]
                if held_out is not None:
                    entries.append(("eval", next(held_out_sets), 1.0, held_out))
            for part, name, weight, where in entries:
                if packs_bins(cfg):
                    _ensure_bins(where, int(cfg.data.max_seq_len))
                report = TokenStore(where).report()
                report.cached = not built
                reports.append(report)
                prepared[part].append({"name": name, "path": spec.path, "weight": weight, "dir": str(where)})
    for spec in probe_specs(cfg, [e["name"] for e in prepared["eval"]]):
        probe_cfg = OmegaConf.merge(cfg.data, {"format": "auto"})
        probe_cfg.columns = {}  # the probes are the launcher's files, not the user's columns
        folder, built = ensure(spec.path, tokenizer, probe_cfg, root, kind)
        if packs_bins(cfg):
            _ensure_bins(folder, int(cfg.data.max_seq_len))
        reports.append(TokenStore(folder).report())
        reports[-1].cached = not built
        prepared["eval"].append({"name": spec.name, "path": spec.path, "weight": 1.0, "dir": str(folder),
                                 "loss_only": True})
    return prepared, reports


def _select(cfg, store: TokenStore, split: str) -> tuple[Path, Path | None]:
    """data.max_samples and (training sources) data.eval_split: the entries of the rows
    trained on and of the rows held out (trainers/data/selection.py)."""
    eval_split = cfg.data.eval_split if split == "train" else None
    settings = {"max_samples": cfg.data.max_samples, "eval_split": eval_split,
                "seed": cfg.seed if eval_split is not None else None}
    train_rows, eval_rows = select(store.rows, cfg.data.max_samples, eval_split, int(cfg.seed))
    train = derive(store, train_rows, "train", settings, ARRAYS)
    return train, None if eval_rows is None else derive(store, eval_rows, "held_out", settings, ARRAYS)


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
        src = Source(entry["name"], TokenStore(folder), 1.0, bins, str(entry["path"]))
        # no weight: the sources are concatenated, each contributing rows in proportion to its size
        src.weight = float(len(src)) if entry["weight"] is None else float(entry["weight"])
        return src

    train = [source(e) for e in prepared["train"]]
    evals = [source(e) for e in prepared["eval"]]
    for s, e in zip(evals, prepared["eval"]):
        # plain text has no answer to generate: scored by loss only
        s.loss_only = bool(e.get("loss_only", False)) or s.store.meta["format"] == "text"
    return TrainingData(train, evals, packed, [s.store.report() for s in train + evals])


def training_batches(cfg, tokenizer, dp_world: int) -> tuple[GlobalBatches, TrainingData]:
    """The (seed, step) batch order over the opened training sources."""
    data = open_data(cfg, tokenizer)
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    if row_kind(cfg) == "prompts":  # GRPO: a row is a prompt; each becomes objective.num_generations completions
        mb, accum = mb * accum // int(cfg.objective.num_generations), 1
    layout = BatchLayout(mb, accum, dp_world)
    kl_pairs = cfg.objective.kl_pairs if cfg.objective.name == "kto" else "batch"
    return GlobalBatches(data.train, layout, cfg.seed, tokenizer.pad_token_id, data.packed,
                         int(cfg.data.max_seq_len), shuffle=bool(cfg.data.shuffle), kl_pairs=kl_pairs), data
