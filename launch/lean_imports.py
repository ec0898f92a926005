"""What a training process does not import: libraries that another library loads for
features a rank never uses, deferred until something calls them. Each one is measured per
process by bench/rank_fixed.py (docs/plans-and-memory.md, "The fixed part of a rank")."""
from __future__ import annotations

import sys


def defer_unused_imports() -> None:
    """transformers' loss registry, imported by every model through modeling_utils, imports
    its object-detection losses, and they import scipy for a Hungarian matcher that a causal
    LM never calls: 35 MiB of every rank (measured). The registry is imported here with scipy
    reported absent for the duration, and those modules get a `linear_sum_assignment` that
    imports scipy's on its first call: the same function, loaded only if used. Nothing else
    reads the flag at import (QLoRA's bitsandbytes imports scipy itself when it needs it)."""
    if "transformers.loss.loss_utils" in sys.modules:
        return
    try:
        import transformers.utils as hf_utils
    except ImportError:
        return
    available = hf_utils.is_scipy_available
    if not available():
        return
    hf_utils.is_scipy_available = lambda: False
    try:
        import transformers.loss.loss_utils  # noqa: F401
    finally:
        hf_utils.is_scipy_available = available
    for name, module in list(sys.modules.items()):
        if (name.startswith("transformers.loss.") and module is not None
                and hasattr(module, "is_scipy_available") and not hasattr(module, "linear_sum_assignment")):
            module.linear_sum_assignment = _linear_sum_assignment


def _linear_sum_assignment(*args, **kwargs):
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(*args, **kwargs)
