"""Tokenize a dataset once per version; every later run, rank and requeue memory-maps it.

A cache entry is a folder of flat arrays: all kept examples' token ids back to back,
their loss masks, an offsets array, the source row numbers, a desirable flag per example
(KTO's label), a margin per example (a pair's optional `margin` column, objective=reward)
and, once packed, the bins. A preference pair is two consecutive examples (chosen, then
rejected) with the same row number. Its name is a hash of everything that
changes the tokens: the data file's bytes, the tokenizer (vocabulary, merges, special
tokens, chat template), the library versions that tokenize, the data settings, and the
kind of row the objective reads (trainers.data.rows.ROW_KINDS: it decides the fields and the
tokenization conventions). Nothing is ever updated in place: a build writes
a temporary folder and renames it, so a killed build leaves no entry a reader could
mistake for a complete one.

Memory: a rank holds only the pages of the arrays it touches (the rows of its batches),
so what a rank holds does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.data.encoding import EncodedChunk, encode_chunk
from trainers.errors import UserError
from trainers.files import atomic_write, file_digest, locked, read_json, update_json
from trainers.data.formats import file_format
from trainers.data.rows import hf_dataset, hf_name_split, is_hf, missing_file_error, read_raw, source_exists

log = logging.getLogger("data")

# Bump when the layout or the tokenization rules change: old entries are then ignored.
CACHE_VERSION = 6  # 5: the margin array; 6: the file's format in meta.json
ARRAYS = {"ids": np.int32, "mask": np.uint8, "offsets": np.int64, "rows": np.int64, "targets": np.int32,
          "desirable": np.uint8, "margin": np.float32}
# Below this many bytes of input a pool of tokenizer processes costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20


@dataclass
class DataReport:
    path: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    cached: bool = False
    per_row: int = 1  # examples per kept row: 2 for preference pairs
    kept_rows: int = 0  # data rows kept (a plain-text row may become several blocks)

    def kept_and_skipped(self) -> str:
        what = "pairs" if self.per_row == 2 else "rows"
        s = f"{self.path}: {self.kept_rows}/{self.rows} {what} kept, {self.tokens:,} tokens"
        if self.kept != self.kept_rows * self.per_row:
            s += f" in {self.kept} blocks of at most data.max_seq_len tokens"
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.skipped:
            s += ", skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items()))
        return s + (" (cached)" if self.cached else "")


# ------------------------------------------------------------------------------ keys
def content_digest(path: str, cache_root: Path) -> str:
    """Hash of a data file's bytes (or a datasets folder's files). Remembered per
    (path, size, mtime, inode) in the cache root, so a relaunch does not re-read a
    multi-GB file just to learn it has not changed."""
    if is_hf(path):
        name, split = hf_name_split(path)
        if not Path(name).is_dir():  # a Hub dataset: datasets' fingerprint of its cached files
            return "hf-" + hf_dataset(path)._fingerprint
        return content_digest(name, cache_root) + f":{split}"
    p = Path(path).resolve()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    stats = [(str(f), (s := f.stat()).st_size, s.st_mtime_ns, s.st_ino) for f in files]
    memo_path = cache_root / "digests.json"
    memo_key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()
    known = read_json(memo_path).get(memo_key)
    if known:
        return known
    h = hashlib.blake2b()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else "").encode())
        h.update(file_digest(f, "blake2b")[:32].encode())
    digest = h.hexdigest()[:32]
    update_json(memo_path, lambda memo: memo.__setitem__(memo_key, digest))
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    import tokenizers
    import transformers

    h = hashlib.blake2b()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (
        type(tokenizer).__name__, vocab, str(tokenizer.chat_template),
        str((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)),
        transformers.__version__, tokenizers.__version__,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def entry_key(path: str, tokenizer, data_cfg, cache_root: Path, kind: str = "sft") -> str:
    settings = {
        "rows": kind,
        "version": CACHE_VERSION,
        "data": content_digest(path, cache_root),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": data_cfg.format,
        "max_seq_len": int(data_cfg.max_seq_len),
        "truncation": bool(data_cfg.truncation),
        "on_bad_row": data_cfg.on_bad_row,
        "columns": sorted(dict(data_cfg.columns or {}).items()),
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def entry_dir(path: str, key: str, cache_root: Path) -> Path:
    name = hf_name_split(path)[0] if is_hf(path) else path
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:40] or "data"
    return cache_root / f"{stem}-{key}"


# --------------------------------------------------------------------------- reading
class TokenStore:
    """A cache entry, memory-mapped: example i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            if self.meta.get("version") != CACHE_VERSION:
                raise ValueError(f"cache version {self.meta.get('version')}, expected {CACHE_VERSION}")
            n, t = self.meta["kept"], self.meta["tokens"]
            sizes = {"ids": t, "mask": t, "offsets": n + 1, "rows": n, "targets": n, "desirable": n, "margin": n}
            for name, dtype in ARRAYS.items():
                arr = np.memmap(self.folder / f"{name}.bin", dtype=dtype, mode="r", shape=(sizes[name],))
                setattr(self, name, arr)
            if int(self.offsets[-1]) != t:
                raise ValueError("offsets do not cover the token array")
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"The data cache {str(self.folder)!r} is unreadable ({e}). Delete that folder and "
                f"launch again: the launcher rebuilds it from the data file."
            ) from None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "sft")

    @property
    def per_row(self) -> int:
        """Examples per data row: 2 for preference pairs (chosen at 2i, rejected at 2i+1)."""
        return 2 if self.kind in ("pairs", "pairs_text") else 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def report(self) -> DataReport:
        m = self.meta
        return DataReport(m["path"], m["rows"], m["kept"], Counter(m["skipped"]), m["truncated"], m["tokens"], True,
                          self.per_row, m["kept_rows"])


# --------------------------------------------------------------------------- writing
_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_tokenizer = tokenizer


def _encode_in_worker(chunk, data_cfg, kind, fmt) -> EncodedChunk:
    return encode_chunk(_worker_tokenizer, chunk, data_cfg, kind, fmt)


def _processes(data_cfg, path: str) -> int:
    p = Path(hf_name_split(path)[0] if is_hf(path) else path)
    if not p.exists():  # a Hub dataset: tokenized in this process
        return 1 if data_cfg.num_proc == "auto" else max(1, int(data_cfg.num_proc))
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    wanted = data_cfg.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if wanted == "auto":
        return cores if size >= PARALLEL_MIN_BYTES else 1
    return max(1, int(wanted))


def _encoded_chunks(path: str, tokenizer, data_cfg, procs: int, kind: str, fmt: str):
    """Encoded chunks in file order; with several processes, a bounded number in flight."""
    if procs == 1:
        for chunk in read_raw(path):
            yield encode_chunk(tokenizer, chunk, data_cfg, kind, fmt)
        return
    import multiprocessing as mp

    pending: list[Future] = []
    # fork: a spawned worker would re-import transformers and unpickle the tokenizer, which
    # measured 1.7x the CPU time of the tokenization itself on a 100k-row file
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(procs, mp_context=mp.get_context(method), initializer=_init_worker,
                             initargs=(tokenizer,)) as pool:
        try:
            for chunk in read_raw(path):
                pending.append(pool.submit(_encode_in_worker, chunk, data_cfg, kind, fmt))
                if len(pending) >= 2 * procs:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def _append(files: dict, enc: EncodedChunk, report: DataReport, path: str) -> None:
    if enc.error is not None:
        n, why, bad_kind = enc.error
        if bad_kind == "wrong_kind":  # the file (or the objective) is wrong, not one row
            raise UserError(f"{path}, row {n}: {why}.")
        raise UserError(
            f"Bad row in {path}, row {n}: {why}. Fix the row, or set data.on_bad_row=skip to "
            f"drop bad rows (they are counted and reported)."
        )
    report.rows += enc.rows
    report.skipped.update(enc.skipped)
    report.truncated += enc.truncated
    starts = np.cumsum(enc.lengths, dtype=np.int64) - enc.lengths
    # label t is token t+1 where t+1 is an answer token: an example's first token is
    # never a target
    targets = np.add.reduceat(enc.mask.astype(np.int64), starts) - enc.mask[starts] if len(starts) else starts
    for name, arr in (("ids", enc.ids), ("mask", enc.mask), ("offsets", report.tokens + starts + enc.lengths),
                      ("rows", enc.row_numbers), ("targets", targets), ("desirable", enc.desirable),
                      ("margin", enc.margin)):
        files[name].write(np.ascontiguousarray(arr, dtype=ARRAYS[name]).tobytes())
    report.kept += len(enc.lengths)
    report.kept_rows += len(np.unique(enc.row_numbers))  # a row's examples never straddle two chunks
    report.tokens += int(enc.lengths.sum())


def build(path: str, tokenizer, data_cfg, final: Path, kind: str = "sft") -> DataReport:
    """Tokenize `path` into the cache entry `final` (write, then rename)."""
    t0 = time.perf_counter()
    procs = _processes(data_cfg, path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report = DataReport(path=path, per_row=2 if kind in ("pairs", "pairs_text") else 1)
    fmt = file_format(path, data_cfg)
    with ExitStack() as files_open:
        files = {name: files_open.enter_context(open(tmp / f"{name}.bin", "wb")) for name in ARRAYS}
        try:
            files["offsets"].write(np.zeros(1, np.int64).tobytes())
            for enc in _encoded_chunks(path, tokenizer, data_cfg, procs, kind, fmt):
                _append(files, enc, report, path)
            for f in files.values():  # durable before the rename makes the entry visible
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if report.kept == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"No usable rows in {path} ({report.kept_and_skipped()}).")
    meta = {"version": CACHE_VERSION, "kind": kind, "format": fmt, "path": str(path), "rows": report.rows, "kept": report.kept, "kept_rows": report.kept_rows,
            "skipped": dict(report.skipped), "truncated": report.truncated, "tokens": report.tokens,
            "processes": procs, "build_s": round(time.perf_counter() - t0, 2), "created": time.time()}
    atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
    if final.exists():  # an unreadable leftover the user was told to delete, or a race we lost
        shutil.rmtree(final)
    tmp.rename(final)
    log.info("data: tokenized in %.1fs with %d process(es): %s", meta["build_s"], procs, report.kept_and_skipped())
    return report


def prepare(path: str, tokenizer, data_cfg, cache_root: Path, kind: str = "sft") -> Path:
    """The cache entry of `path` (rows of `kind`) under the current settings, built if missing."""
    return ensure(path, tokenizer, data_cfg, cache_root, kind)[0]


def ensure(path: str, tokenizer, data_cfg, cache_root: Path, kind: str = "sft") -> tuple[Path, bool]:
    """(entry folder, whether this call built it)."""
    if not source_exists(path):
        raise missing_file_error(path)
    cache_root = Path(cache_root)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.cache_dir={str(cache_root)!r} cannot be created ({e.strerror}); point it at a "
                        f"writable folder, shared by the nodes of multi-node runs.") from None
    final = entry_dir(path, entry_key(path, tokenizer, data_cfg, cache_root, kind), cache_root)
    if (final / "meta.json").exists():
        return final, False
    with locked(final):
        if (final / "meta.json").exists():
            return final, False
        build(path, tokenizer, data_cfg, final, kind)
    return final, True
