"""Which rows form optimizer step s, which of them this rank computes, and their tensors.

The rows of a global batch depend only on (seed, step), never on how the batch is split
into micro-batches, accumulation steps or ranks. That is what makes every parallel plan
comparable to the single-process run, and what makes resume exact: the data position is
just the step number. Everything here is index arithmetic over memory-mapped token
arrays, so a rank holds a few bytes per batch row, not the dataset.

Mixtures: the global-batch positions 0, 1, 2, ... are dealt to the sources in a fixed
interleaving where source k's j-th row sits at time (j + 1/2) / weight_k (Webster's
divisor method). Every prefix of the stream then holds each source within one row of its
share, the share of a step never goes negative (no Alabama paradox), and the number of
rows source k supplied before step s is computed directly, so step s needs no history.
Within a source, rows come in a fresh seeded permutation per pass over it (its epoch),
evaluated index by index (`Shuffle`), so not even the order costs memory per row.

Preference data: a batch row is a pair (its chosen and rejected examples become two
sequences of the micro-batch, never packed) or, for KTO, one example plus its
mismatched sequence: the row's prompt with the completion of the row before it in the
global batch (the first row takes the last row's), TRL's rotation by one applied to the
global batch, so the KL estimate does not depend on how the batch is split. Since the
rows of step s depend only on (seed, s), so do these mismatched pairs (`kl_pairs`): with
method=full their reference log-probs are computed before training like every other
reference log-prob (trainers/objectives/reference.py) and kept in `GlobalBatches.kl_reference`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from trainers.errors import UserError
from trainers.data.packing import best_fit_decreasing
from trainers.data.rows import IGNORE, labels_of
from trainers.data.token_cache import TokenStore


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    grad_accum: int
    dp_world: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_world


class Source:
    """One dataset as batch rows: a row is a bin of packed examples, one example, or a
    preference pair (two examples: chosen at 2i, rejected at 2i+1).

    `reference` (set by trainers/objectives/reference.py for method=full) holds the reference model's
    summed completion log-prob of every example, computed once before training, and, for
    a held-out KTO set, `kl_reference` that of each row's mismatched sequence (row r's
    prompt with row r-1's completion, the evaluator's fixed rotation)."""

    def __init__(self, name: str, store: TokenStore, weight: float = 1.0,
                 bins: tuple[np.ndarray, np.ndarray] | None = None, path: str | None = None):
        self.name, self.store, self.weight = name, store, float(weight)
        # This run's data file. The token cache is keyed by content, so the path in the
        # entry's meta is whichever file first produced it, possibly moved or deleted since.
        self.path = path if path is not None else store.meta["path"]
        self.order, self.offsets = bins if bins is not None else (None, None)
        self.per_row = store.per_row
        self.reference: np.ndarray | None = None
        self.kl_reference: np.ndarray | None = None
        self.loss_only = False  # an eval.probes set: scored by loss, no generation

    def __len__(self) -> int:
        return len(self.store) // self.per_row if self.order is None else len(self.offsets) - 1

    def examples(self, row: int) -> np.ndarray:
        if self.order is None:
            return np.arange(row * self.per_row, (row + 1) * self.per_row)
        return self.order[int(self.offsets[row]) : int(self.offsets[row + 1])]

    def length(self, row: int) -> int:
        return sum(self.sequence_lengths(row))

    def sequence_lengths(self, row: int) -> list[int]:
        """Lengths of the sequences the row becomes in a micro-batch: one (an example or a
        packed bin), or two for a pair."""
        off = self.store.offsets
        lengths = [int(off[e + 1] - off[e]) for e in self.examples(row)]
        return lengths if self.per_row > 1 else [sum(lengths)]

    def targets(self, row: int) -> int:
        return int(sum(int(self.store.targets[e]) for e in self.examples(row)))

    def tensors(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, position_ids); positions restart per example, which is
        what keeps attention inside each packed example."""
        parts = [self.store.example(int(e)) for e in self.examples(row)]
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        labels = np.concatenate([labels_of(*p) for p in parts])
        pos = np.concatenate([np.arange(len(p[0])) for p in parts])
        return ids, labels, pos


_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (wrapping uint64 arithmetic; callers silence overflow)."""
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


class Shuffle:
    """A seeded permutation of range(n), evaluated per index in O(1) memory: a 4-round
    Feistel network on the smallest even-bit domain >= n (at most 4n), cycle-walking
    the values that land outside [0, n). A materialised permutation would cost every rank
    8 bytes per row of the dataset (800 MB at 100M rows)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        with np.errstate(over="ignore"):
            self.keys = list(_splitmix64(np.arange(self.ROUNDS, dtype=np.uint64) + np.uint64(seed * self.ROUNDS % 2**64)))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, i):
        with np.errstate(over="ignore"):
            x = self._feistel(np.atleast_1d(np.asarray(i, dtype=np.uint64)))
            while (out := x >= self.n).any():
                x[out] = self._feistel(x[out])
        return x.astype(np.int64) if np.ndim(i) else int(x[0])


class Mixture:
    """Counts of each source in the first P positions of the interleaved stream."""

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()

    def _time(self, k: int, j: int) -> tuple[float, int]:
        return ((j + 0.5) / self.w[k], k)

    def counts(self, p: int) -> np.ndarray:
        k_n = len(self.w)
        if k_n == 1:
            return np.array([p])
        c = np.floor(self.w * p).astype(np.int64)
        while True:  # move to the exact prefix of size p: O(number of sources) steps
            nxt = min(self._time(k, int(c[k])) for k in range(k_n))
            last = max((self._time(k, int(c[k]) - 1) for k in range(k_n) if c[k] > 0), default=None)
            if c.sum() < p:
                c[nxt[1]] += 1
            elif c.sum() > p or (last is not None and last > nxt):
                c[last[1]] -= 1
                if c.sum() < p:
                    c[nxt[1]] += 1
            else:
                return c

    def positions(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(source, index within the source's stream) of positions [start, stop)."""
        a, b = self.counts(start), self.counts(stop)
        items = [(self._time(k, j), k, j) for k in range(len(self.w)) for j in range(int(a[k]), int(b[k]))]
        return [(k, j) for _, k, j in sorted(items)]


class GlobalBatches:
    def __init__(self, sources: list[Source], layout: BatchLayout, seed: int, pad_id: int, packed: bool,
                 max_len: int | None = None, shuffle: bool = True, kl_pairs: str = "batch"):
        self.sources, self.layout, self.seed = sources, layout, seed
        # data.shuffle=false: each source is read in file order, pass after pass (TRL's
        # train_sampling_strategy="sequential"); objective.kl_pairs: KTO's mismatched pairs
        # (`kl_pairs`)
        self.shuffle, self.kl_order = shuffle, kl_pairs
        self.pad_id, self.packed, self.max_len = pad_id, packed, max_len
        # KTO with method=full: reference log-prob of the mismatched sequence at each
        # (step, position of the global batch), set by trainers/objectives/reference.py.
        self.kl_reference: np.ndarray | None = None
        kinds = {s.store.kind for s in sources}
        if len(kinds) > 1:
            raise UserError(f"data.train mixes row kinds {sorted(kinds)}; every source of a run must hold the rows "
                            f"its objective reads.")
        self.kind = kinds.pop()
        self.mixture = Mixture([s.weight for s in sources])
        total = sum(len(s) for s in sources)
        if total < layout.rows_per_step:
            raise UserError(
                f"The training set has {total} sequences but one global batch needs "
                f"{layout.rows_per_step} (micro_batch_size {layout.micro_batch_size} x grad_accum "
                f"{layout.grad_accum} x {layout.dp_world} data-parallel ranks). Use more data or a "
                f"smaller train.micro_batch_size / train.grad_accum."
            )

    # ------------------------------------------------------------------ which rows
    def _shuffle(self, k: int, epoch: int) -> Shuffle:
        return Shuffle(len(self.sources[k]), self.seed * 100_003 + epoch + 1_000_003 * k)

    @functools.lru_cache(maxsize=2)  # a step's rows are asked for its batches, stats and row ids
    def rows(self, step: int) -> tuple[tuple[int, int], ...]:
        """(source, row) of every row of the global batch of `step`, in rank order."""
        n = self.layout.rows_per_step
        positions = np.array(self.mixture.positions(step * n, (step + 1) * n), dtype=np.int64)
        ks, js = positions[:, 0], positions[:, 1]
        rows = np.empty(n, dtype=np.int64)
        for k in np.unique(ks):
            size = len(self.sources[k])
            for epoch in np.unique(js[ks == k] // size):
                sel = (ks == k) & (js // size == epoch)
                rows[sel] = self._shuffle(int(k), int(epoch))[js[sel] % size] if self.shuffle else js[sel] % size
        return tuple(zip(ks.tolist(), rows.tolist()))  # shared by the cache: immutable

    def epoch_of(self, step: int) -> int:
        """Passes completed over the first source before `step`."""
        return int(self.mixture.counts(step * self.layout.rows_per_step)[0]) // len(self.sources[0])

    def row_ids(self, step: int) -> list[str]:
        """`source:row_number` of the data rows in the global batch (file line numbers
        for JSONL), to find a bad batch in the data."""
        out = []
        for k, r in self.rows(step):
            src = self.sources[k]
            out += [f"{src.name}:{int(src.store.rows[e])}" for e in src.examples(r)[:: src.per_row]]
        return out

    # ----------------------------------------------------------------- the tensors
    def micro_batches(self, step: int, dp_rank: int, unit: str = "targets") -> tuple[list[dict], int]:
        """This rank's collated micro-batches for `step`, and what the step's loss sum is
        divided by: the target-token count of the whole global batch (unit "targets") or
        its number of rows (unit "rows": pairs, KTO rows). Every rank computes it locally:
        no collective needed."""
        rows = self.rows(step)
        count = sum(self.sources[k].targets(r) for k, r in rows) if unit == "targets" else len(rows)
        mb, per_rank = self.layout.micro_batch_size, self.layout.micro_batch_size * self.layout.grad_accum
        lo = dp_rank * per_rank
        if self.kind != "unpaired":
            return [self.collate(rows[lo + i : lo + i + mb]) for i in range(0, per_rank, mb)], count
        partners = [p for _, p in self.kl_pairs(step)]  # KTO's mismatched completions
        out = []
        for i in range(lo, lo + per_rank, mb):
            kl_ref = None
            if self.kl_reference is not None:
                if step >= len(self.kl_reference):
                    raise RuntimeError(f"no precomputed KL reference for step {step + 1} (computed for "
                                       f"{len(self.kl_reference)} steps)")
                kl_ref = self.kl_reference[step, i : i + mb]
            out.append(collate_preference(self.sources, rows[i : i + mb], self.pad_id, None, partners[i : i + mb],
                                          self.max_len, packed=self.packed, kl_ref=kl_ref))
        return out, count

    def kl_pairs(self, step: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """KTO: ((source, row), (source, row) whose completion it is paired with) for every
        row of the global batch of `step`, in rank order. Both are TRL's rotation by one,
        over different rows:
        - "batch" (objective.kl_pairs default): within the step's global batch, whatever
          order it was drawn in, so the mismatched completions are the batch's own and the
          pairs do not depend on how the batch is split;
        - "file_order": within each chunk of train.micro_batch_size consecutive rows of the
          file (TRL's per_device_train_batch_size; a last, shorter chunk rotates within
          itself), as TRL's KTOTrainer pairs them once, before training. With
          data.shuffle=false and the global batch in one micro-batch (or split over ranks
          only) every step then holds TRL's rows, pairs and KL reference point."""
        rows = self.rows(step)
        if self.kl_order == "batch":
            return list(zip(rows, rows[-1:] + rows[:-1]))
        chunk = self.layout.micro_batch_size
        return [((k, r), (k, file_order_partner(r, len(self.sources[k]), chunk))) for k, r in rows]

    def stats(self, step: int) -> dict:
        """Tokens each source supplied to the step, and the fraction of computed
        positions that were padding (over every rank's micro-batches)."""
        rows = self.rows(step)
        mb = self.layout.micro_batch_size
        seqs = [self.sources[k].sequence_lengths(r) for k, r in rows]
        padded = 0
        for i in range(0, len(seqs), mb):
            group = [n for row in seqs[i : i + mb] for n in row]
            padded += computed_positions(group, self.packed and self.kind != "sft", self.max_len)
        out = {"padding_fraction": 1 - sum(map(sum, seqs)) / padded}
        for s in self.sources:
            out[f"tokens/{s.name}"] = 0
        for (k, _), row in zip(rows, seqs):
            out[f"tokens/{self.sources[k].name}"] += sum(row)
        return out

    def collate(self, items: list[tuple[int, int]]) -> dict:
        """One training micro-batch of SFT rows or pairs (KTO rows: `micro_batches`)."""
        if self.kind == "sft":
            return collate([self.sources[k].tensors(r) for k, r in items], self.pad_id, self.packed)
        if self.kind == "prompts":  # GRPO: the rollout (trainers/objectives/rollout.py) makes the tensors
            return {"prompts": [prompt_item(self.sources[k], r) for k, r in items], "n_real_tokens": 0}
        return collate_preference(self.sources, items, self.pad_id, max_len=self.max_len, packed=self.packed)


def prompt_item(source: Source, row: int) -> dict:
    """A prompt row: its token ids and where its data row is (for the rewards' columns)."""
    e = int(source.examples(row)[0])
    number = int(source.store.rows[e])
    return {"ids": source.store.example(e)[0], "path": source.path, "row": number, "name": f"{source.name}:{number}"}


def completion_start(mask: np.ndarray) -> int:
    """Where a preference/KTO example's completion begins (its one target span)."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else len(mask)


def _sequences(parts: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(ids.astype(np.int64), labels_of(ids, mask), np.arange(len(ids))) for ids, mask in parts]


def file_order_partner(row: int, n: int, chunk: int) -> int:
    """TRL's KTO partner of `row` among `n` rows in file order: the row before it within
    its chunk of `chunk` rows (the chunk's first row takes its last row's completion)."""
    start = row - row % chunk
    return start + (row - start - 1) % min(chunk, n - start)


def heldout_partners(rows, n: int):
    """KTO on a held-out set of n rows: row r's prompt takes the completion of row r-1
    (the first row the last one's), a fixed rotation over the whole set. Works on ints
    and numpy arrays alike (the evaluator and the precomputed reference share it)."""
    return (rows - 1) % n


def mismatched_sequences(sources: list[Source], items: list[tuple[int, int]], partners: list[tuple[int, int]],
                         max_len: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """KTO's KL sequences: the prompt of row `items[i]` followed by the completion of row
    `partners[i]` (ids, completion mask), cut to `max_len`."""
    out = []
    for (k, r), (pk, pr) in zip(items, partners):
        ids, mask = sources[k].store.example(int(sources[k].examples(r)[0]))
        p_ids, p_mask = sources[pk].store.example(int(sources[pk].examples(pr)[0]))
        start, p_start = completion_start(mask), completion_start(p_mask)
        seq = (np.concatenate([ids[:start], p_ids[p_start:]]), np.concatenate([mask[:start], p_mask[p_start:]]))
        if max_len is not None:
            seq = (seq[0][:max_len], seq[1][:max_len])
        out.append(seq)
    return out


def collate_preference(sources: list[Source], items: list[tuple[int, int]], pad_id: int,
                       keep: list[bool] | None = None, partners: list[tuple[int, int]] | None = None,
                       max_len: int | None = None, packed: bool = False, kl_ref=None) -> dict:
    """A micro-batch of pairs (sequences chosen_0 .. chosen_n-1, rejected_0 .. rejected_n-1)
    or KTO rows, laid out by `collate_sequences` (one per row, or packed).

    Keys besides collate_sequences': `keep` (one flag per pair / row; evaluation pads short
    shards with rows that are computed but not counted), `ref_logps` (per sequence, when
    the reference was precomputed), `desirable` (KTO) and `kl_batch` (KTO: the mismatched
    sequences, prompt of row i + completion of `partners[i]`, collated the same way, with
    `ref_logps` = `kl_ref` when their reference log-probs were precomputed)."""
    # pairs: all chosen sequences, then all rejected ones, in the same order (TRL's layout)
    per_row = sources[items[0][0]].per_row
    examples = [(k, int(sources[k].examples(r)[j])) for j in range(per_row) for k, r in items]
    batch = collate_sequences([sources[k].store.example(e) for k, e in examples], pad_id, packed, max_len)
    batch["keep"] = torch.tensor(keep if keep is not None else [True] * len(items), dtype=torch.bool)
    if per_row == 2:  # pairs: the row's `margin` column (0 without one), stored with each of its examples
        batch["margin"] = torch.tensor([float(sources[k].store.margin[e]) for k, e in examples[: len(items)]])
    if all(sources[k].reference is not None for k, _ in examples):
        batch["ref_logps"] = torch.tensor([float(sources[k].reference[e]) for k, e in examples], dtype=torch.float32)
    if partners is not None:
        batch["desirable"] = torch.tensor([bool(sources[k].store.desirable[e]) for k, e in examples])
        batch["kl_batch"] = collate_sequences(mismatched_sequences(sources, items, partners, max_len), pad_id, packed,
                                                max_len)
        batch["kl_batch"]["keep"] = batch["keep"]
        if kl_ref is not None:
            batch["kl_batch"]["ref_logps"] = torch.tensor(np.asarray(kl_ref, dtype=np.float32))
    return batch


def sequence_rows(lengths: np.ndarray, packed: bool, width: int | None) -> list[list[int]]:
    """The sequences (indices into `lengths`) each row of a micro-batch holds."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    order, offsets = best_fit_decreasing(lengths, max(int(lengths.max()), width or 0))
    return [order[offsets[b] : offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]


def computed_positions(lengths: list[int], packed: bool, width: int | None) -> int:
    """Positions a micro-batch of these sequences computes, padding included."""
    lengths = np.asarray(lengths, dtype=np.int64)
    fills = [int(lengths[row].sum()) for row in sequence_rows(lengths, packed, width)]
    return max(fills) * len(fills)


def collate_sequences(parts: list[tuple[np.ndarray, np.ndarray]], pad_id: int, packed: bool,
                      width: int | None = None) -> dict[str, torch.Tensor]:
    """Sequences that are scored one by one (preference pairs, KTO rows, the reference
    pass), from their (ids, target mask).

    Unpacked: one sequence per row, right-padded to the longest. Packed (data.packing):
    best-fit-decreasing into rows of `width` tokens (at least the longest sequence), with
    positions restarting per sequence and no attention mask, so transformers keeps
    attention inside each sequence as for packed SFT rows. Pairs padded to a common length
    spend 30 % of the bundled task's positions on padding; packed rows about 15 %.

    Either way `segments[r, t]` is the index of the sequence position t of row r belongs to
    (-1: padding) and `seq_lengths[i]` the length of sequence i: per-sequence sums
    (`preference.sequence_logps`) read them and never the layout."""
    seqs = _sequences(parts)
    lengths = np.array([len(ids) for ids, _, _ in seqs], dtype=np.int64)
    rows = sequence_rows(lengths, packed, width)
    merged = [tuple(np.concatenate([seqs[i][j] for i in row]) for j in range(3)) for row in rows]
    batch = collate(merged, pad_id, packed)
    segments = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            segments[r, at : at + lengths[i]] = i
            at += lengths[i]
    batch["segments"] = segments
    batch["seq_lengths"] = torch.from_numpy(lengths)
    return batch


def collate(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int, packed: bool,
            keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch of (ids, labels, positions). Packed batches pass
    position_ids and no attention mask, which makes transformers build a block-diagonal
    causal mask (no cross-example attention). `keep[i]=False` blanks row i's targets
    (evaluation pads short shards with such rows)."""
    width = max(len(s[0]) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(n, 1)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (x, y, p) in enumerate(seqs):
        L = len(x)
        ids[i, :L] = torch.from_numpy(x)
        if keep is None or keep[i]:
            labels[i, :L] = torch.from_numpy(y)
        pos[i, :L] = torch.from_numpy(p)
        pos[i, L:] = torch.arange(width - L)
        mask[i, :L] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos,
             "n_real_tokens": sum(len(s[0]) for s in seqs)}
    if not packed:
        batch["attention_mask"] = mask
    return batch
