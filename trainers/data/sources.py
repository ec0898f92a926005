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
from trainers.data.source_specs import parse_sources, probe_specs, row_kind
from trainers.errors import UserError
from trainers.files import atomic_write, locked
from trainers.data.packing import best_fit_decreasing
from trainers.model.peft_methods import SUPPORTS_PACKING
from trainers.data.token_cache import DataReport, TokenStore, ensure

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
        for spec in parse_sources(cfg.data[split], f"data.{split}"):
            folder, built = ensure(spec.path, tokenizer, cfg.data, root, kind)
            if packs_bins(cfg):
                _ensure_bins(folder, int(cfg.data.max_seq_len))
            report = TokenStore(folder).report()
            report.cached = not built
            reports.append(report)
            prepared[split].append({"name": spec.name, "path": spec.path, "weight": spec.weight, "dir": str(folder)})
    for spec in probe_specs(cfg, [e["name"] for e in prepared["eval"]]):
        folder, built = ensure(spec.path, tokenizer, OmegaConf.merge(cfg.data, {"format": "auto"}), root, kind)
        if packs_bins(cfg):
            _ensure_bins(folder, int(cfg.data.max_seq_len))
        reports.append(TokenStore(folder).report())
        reports[-1].cached = not built
        prepared["eval"].append({"name": spec.name, "path": spec.path, "weight": 1.0, "dir": str(folder),
                                 "loss_only": True})
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
    for s, e in zip(evals, prepared["eval"]):
        s.loss_only = bool(e.get("loss_only", False))
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
