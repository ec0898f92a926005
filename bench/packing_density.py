"""Packing density: non-padding tokens per optimizer step, ours (best fit decreasing over
the whole file) against TRL's `pack_dataset(strategy="bfd")` and the greedy in-order
packing this project used before, on the same tokenized rows.

    python bench/packing_density.py [--data data/reverse/train.jsonl] [--max-len 64] [--rows-per-step 16]

Rows per step = micro_batch_size x grad_accum (the bundled default: 8 x 2). Every packed
row holds at most --max-len tokens, so tokens per step = rows per step x mean packed length.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def greedy_rows(lengths: np.ndarray, cap: int) -> int:
    rows, cur = 0, 0
    for n in lengths:
        if cur and cur + n > cap:
            rows, cur = rows + 1, 0
        cur += int(n)
    return rows + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO / "data/reverse/train.jsonl"))
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--rows-per-step", type=int, default=16)
    args = ap.parse_args()
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    from trainers.data.packing import best_fit_decreasing
    from trainers.data.token_cache import TokenStore, prepare

    tok = AutoTokenizer.from_pretrained(REPO / "assets/tiny-llama")
    cfg = OmegaConf.create(dict(format="auto", max_seq_len=args.max_len, truncation=True, on_bad_row="skip", num_proc=1, columns={}))
    with tempfile.TemporaryDirectory() as cache:
        lengths = TokenStore(prepare(args.data, tok, cfg, Path(cache))).lengths.astype(np.int64)
    total = int(lengths.sum())
    _, offsets = best_fit_decreasing(lengths, args.max_len)
    trl_rows = len(pack_dataset(Dataset.from_dict({"input_ids": [[0] * int(n) for n in lengths]}),
                                seq_length=args.max_len, strategy="bfd"))
    print(f"{len(lengths)} rows, {total:,} tokens, packed into rows of <= {args.max_len} tokens, "
          f"{args.rows_per_step} packed rows per step\n")
    print("| packing | packed rows | non-padding tokens per step |\n|---|---:|---:|")
    for name, rows in (("ours: best fit decreasing, whole file", len(offsets) - 1),
                       ("TRL pack_dataset(strategy='bfd')", trl_rows),
                       ("before: greedy in file order", greedy_rows(lengths, args.max_len))):
        print(f"| {name} | {rows:,} | {args.rows_per_step * total / rows:,.0f} |")


if __name__ == "__main__":
    main()
