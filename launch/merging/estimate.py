"""What a merge holds in memory, estimated from the tensor headers before anything is read.

mergekit plans the merge per output tensor and its executor loads each input's copy of
that tensor when the tensor is due and frees it when it is written, so the peak is set by
the largest tensor, not by the models: the inputs' copies of it (and the base's), the
method's working copies in the math dtype (stacked inputs for linear; deltas, masks and
their weighted sums for the task-vector methods), plus the output shard being filled
(out_shard_mib) and the process itself (torch, transformers, mergekit imported).
bench/merge_memory.py measures it against this estimate.
"""
from __future__ import annotations

import math

# Copies of the largest tensor, in the math dtype, that a method holds at once besides
# the inputs' own copies: a rough count from the methods' code; bench/merge_memory.py compares
# the estimate with measured peaks (docs/merging.md).
WORKING_COPIES = {"linear": 2, "greedy_soup": 2, "slerp": 3, "model_stock": 3, "task_arithmetic": 3,
                  "ties": 4, "dare_ties": 4, "dare_linear": 3}
PROCESS_MIB = 600  # interpreter with torch, transformers and mergekit imported

BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _size(dtype: str, shape) -> int:
    return BYTES.get(dtype, 4) * math.prod(shape)


def estimate(method: str, shapes: dict, n_models: int, math_bytes: int, shard_mib: float) -> dict:
    """{"model_mib", "largest_tensor", "largest_mib", "peak_mib", "whole_models_mib"} for a merge
    of n_models folders (base included) whose tensors have `shapes` (name -> (dtype, shape))."""
    model = sum(_size(d, s) for d, s in shapes.values())
    name, (dtype, shape) = max(shapes.items(), key=lambda kv: math.prod(kv[1][1]))
    largest_in = _size(dtype, shape)
    largest_math = math_bytes * math.prod(shape)
    inputs = n_models * largest_in
    n_deltas = max(n_models - 1, 1)
    working = WORKING_COPIES.get(method, 4) * largest_math + (n_deltas * largest_math if method != "slerp" else 0)
    out_shard = min(float(shard_mib) * 2**20, model)
    peak = PROCESS_MIB * 2**20 + inputs + working + out_shard
    return {"model_mib": model / 2**20, "largest_tensor": name, "largest_mib": largest_in / 2**20,
            "peak_mib": peak / 2**20, "whole_models_mib": (n_models * model) / 2**20}


def describe(est: dict, n_models: int) -> str:
    return (f"memory estimate: peak ~{est['peak_mib']:.0f} MiB = ~{PROCESS_MIB} MiB process + {n_models} "
            f"x the largest tensor ({est['largest_tensor']}, {est['largest_mib']:.1f} MiB) and its working copies "
            f"+ one output shard (<= out_shard_mib); the {n_models} model(s) are {est['model_mib']:.1f} MiB each "
            f"({est['whole_models_mib']:.0f} MiB if they were loaded whole)")
