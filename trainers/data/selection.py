"""data.max_samples and data.eval_split: which data rows of a training source are trained on
and which are held out, as token-cache entries derived from the file's entry.

The choice is a function of the rows the file's entry kept, the two settings and the seed
only, so a resume, a requeue or another rank always gets the same rows in the same (file)
order, and the batch order over them stays a function of (seed, step). A derived entry is
a copy of the selected examples' arrays (every example of a data row goes to the same side:
a text row's blocks, a pair's chosen and rejected), written then renamed like any entry, so
packing, batches and evaluation read it as they read a file's entry.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from trainers.errors import UserError
from trainers.files import atomic_write, locked

EVAL_SPLIT_HELP = ("data.eval_split holds out training rows as the eval set when data.eval is null: a fraction "
                   "in (0, 1) (0.05: 5 % of each training source's rows) or a whole number of rows per source "
                   "(Axolotl's val_set_size), or null for none")


def check_settings(eval_split, max_samples, has_eval: bool) -> None:
    """Pre-launch check of the two settings (plain Python)."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise UserError(f"data.max_samples={max_samples!r} must be a positive whole number (the first N rows of "
                        f"each data source are used), or null for every row.")
    if eval_split is None:
        return
    if isinstance(eval_split, bool) or not isinstance(eval_split, (int, float)) or eval_split <= 0 or (
            isinstance(eval_split, float) and eval_split >= 1 and not eval_split.is_integer()):
        raise UserError(f"data.eval_split={eval_split!r} is not accepted. {EVAL_SPLIT_HELP}.")
    if has_eval:
        raise UserError(f"data.eval_split={eval_split!r} holds out training rows as the eval set, but data.eval "
                        f"also names eval files (the data config's default, e.g. data=reverse's eval.jsonl). "
                        f"Use one: add data.eval=null to hold out rows, or drop data.eval_split.")


def held_out_count(eval_split, n_rows: int) -> int:
    """Rows held out of a source of n_rows: ceil(fraction x rows) (datasets' train_test_split
    rounding) or the count itself."""
    return math.ceil(eval_split * n_rows) if eval_split < 1 else int(eval_split)


def select(row_numbers: np.ndarray, max_samples, eval_split, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(data rows trained on, data rows held out or None), both sorted (file order), from the
    row numbers of a source's examples: the first max_samples rows, then a seeded draw of
    the held-out ones among them."""
    rows = np.unique(np.asarray(row_numbers))
    if max_samples is not None:
        rows = rows[: int(max_samples)]
    if eval_split is None:
        return rows, None
    n_eval = held_out_count(eval_split, len(rows))
    if not 0 < n_eval < len(rows):
        raise UserError(f"data.eval_split={eval_split!r} would hold out {n_eval} of the source's {len(rows)} rows, "
                        f"leaving {'none' if n_eval >= len(rows) else 'all'} to train on; {EVAL_SPLIT_HELP}.")
    held = np.zeros(len(rows), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(rows))[:n_eval]] = True
    return rows[~held], rows[held]


def derive(store, rows: np.ndarray, part: str, settings: dict, arrays: dict) -> Path:
    """The entry holding only the examples of `rows` of `store`'s entry (built if missing)."""
    key = hashlib.blake2b(json.dumps({"part": part, **settings}, sort_keys=True).encode()).hexdigest()[:12]
    final = store.folder.with_name(f"{store.folder.name}-{part}-{key}")
    if (final / "meta.json").exists():
        return final
    with locked(final):
        if (final / "meta.json").exists():
            return final
        keep = np.flatnonzero(np.isin(np.asarray(store.rows), rows))
        starts, ends = np.asarray(store.offsets[keep]), np.asarray(store.offsets[keep + 1])
        lengths = ends - starts
        # the token positions of the kept examples, in order
        tokens = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        out = {"ids": np.asarray(store.ids)[tokens], "mask": np.asarray(store.mask)[tokens],
               "offsets": np.concatenate([[0], np.cumsum(lengths)]), "rows": np.asarray(store.rows)[keep],
               "targets": np.asarray(store.targets)[keep], "desirable": np.asarray(store.desirable)[keep],
               "margin": np.asarray(store.margin)[keep]}
        for name, dtype in arrays.items():
            with open(tmp / f"{name}.bin", "wb") as f:
                f.write(np.ascontiguousarray(out[name], dtype=dtype).tobytes())
                f.flush()
                os.fsync(f.fileno())
        meta = dict(store.meta, rows=int(len(rows)), kept=int(len(keep)), tokens=int(lengths.sum()),
                    kept_rows=int(len(np.unique(out["rows"]))),
                    selection={"part": part, **settings})
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
        tmp.rename(final)
    return final
