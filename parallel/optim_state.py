"""The optimizer's state bytes per trainable parameter, by `optim.name`: one table for the
memory estimate before launch (launch/estimate.py, from the architecture) and the runtime
plan's "expected model state" log line (parallel/base.py, from the loaded model), so the two
cannot disagree about what an optimizer keeps. Plain Python: the static half imports it.

AdamW keeps two fp32 moments (8 B/param); bitsandbytes' 8-bit state is blockwise, one fp32
absmax per 256 values; Lion one moment; SGD a momentum buffer or nothing; Adafactor a row and
a column vector per matrix (transformers' factored second moment), a full one per vector,
plus a first moment when beta1 is set. bitsandbytes keeps tensors under `min_8bit_size`
elements in 32-bit state.
"""
from __future__ import annotations

import math
from typing import Iterable

BNB_BLOCK = 256
EIGHT_BIT = 1 + 4 / BNB_BLOCK


def settings(optim_cfg) -> tuple[str, int, float, int]:
    """(name, bits, moments, min_8bit_size) of an `optim` config: Lion's bits (32 or 8); SGD's
    momentum or Adafactor's beta1 (0: no moment buffer); the 8-bit optimizers' min_8bit_size
    (0 for the others)."""
    name = optim_cfg.name
    bits = int(optim_cfg.bits) if name == "lion" else 32
    moments = float(optim_cfg.momentum if name == "sgd" else (optim_cfg.beta1 or 0) if name == "adafactor" else 0)
    return name, bits, moments, int(optim_cfg.min_8bit_size) if eight_bit(name, bits) else 0


def eight_bit(name: str, bits: int = 32) -> bool:
    return name in ("adamw8bit", "paged_adamw8bit") or (name == "lion" and bits == 8)


def per_param(name: str, bits: int = 32, moments: float = 0.0) -> float:
    """State bytes per trainable parameter of every optimizer but Adafactor (factored: see
    `adafactor`)."""
    table = {"adamw": 8.0, "paged_adamw32bit": 8.0, "adamw8bit": 2 * EIGHT_BIT, "paged_adamw8bit": 2 * EIGHT_BIT,
             "lion": 4.0 if bits == 32 else EIGHT_BIT, "sgd": 4.0 if moments else 0.0}
    return table[name]


def adafactor(matrices: Iterable[tuple[int, int]], vector_elements: int, moments: float, trainable: int) -> float:
    """Adafactor's state bytes: fp32 row + column statistics per matrix (rows, cols), a full
    fp32 second moment for the `vector_elements` of 1-d parameters, and a fp32 first moment
    of every trainable parameter when beta1 is set."""
    factored = 4.0 * (sum(r + c for r, c in matrices) + vector_elements)
    return factored + (4.0 * trainable if moments else 0.0)


def state_bytes(name: str, shapes: Iterable[tuple[int, ...]], bits: int = 32, moments: float = 0.0,
                min_8bit_size: int = 0) -> float:
    """The optimizer's state bytes for trainable parameters of these shapes, unsharded. An
    8-bit optimizer keeps 32-bit state for tensors under min_8bit_size elements, as
    bitsandbytes does (Optimizer8bit.init_state): a small model's LoRA factors, every norm."""
    shapes = [tuple(s) for s in shapes]
    numels = [math.prod(int(d) for d in s) for s in shapes]
    if name != "adafactor":
        small = sum(n for n in numels if n < min_8bit_size) if eight_bit(name, bits) else 0
        full = per_param("lion" if name == "lion" else "adamw", 32)
        return per_param(name, bits, moments) * (sum(numels) - small) + full * small
    # transformers' Adafactor factors every tensor of 2+ dims: a row over all but the last dim,
    # a column over all but the second-to-last
    matrices = [(n // s[-1], n // s[-2]) for s, n in zip(shapes, numels) if len(s) >= 2]
    vectors = sum(n for s, n in zip(shapes, numels) if len(s) < 2)
    return adafactor(matrices, vectors, moments, sum(numels))

