"""Keep run logs readable: silence known-harmless library noise at the entry points."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed otherwise probes for accelerators and warns on every import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    for name in ("bitsandbytes", "httpx", "urllib3", "datasets", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
