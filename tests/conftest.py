"""Shared fixtures: tiny random-init models built from a config (nothing downloaded)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# DeepSpeed JIT-compiles an op once per machine: keep the cache across test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def build_tiny_model(out: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random-init Llama with the bundled character tokenizer, saved with save_pretrained."""
    import torch
    from build_tiny_base import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


# (lr, minimum first/last loss ratio after 30 steps) of tests/test_methods.py. Virtual-token
# methods and IA3 train far fewer, less expressive parameters: a higher lr, a lower bar.
# vera: a few thousand trained scalars on shared random projections (measured 8.73 -> 1.17, 7.5x)
METHOD_SETTINGS = {"prompt": (0.1, 1.8), "prefix": (3e-2, 2.0), "ia3": (5e-2, 4.0), "vera": (None, 5.0)}
DEFAULT_METHOD_SETTING = (None, 10.0)


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory) -> dict[str, Path]:
    """method -> run dir of 30 steps of every method in conf/method overfitting one batch (4
    rows of the bundled task) on the bundled base, exports included (in files of 0.1 MiB): launched once, all in
    one process (helpers.launch_many), for tests/test_methods.py and tests/test_export.py."""
    from tests.helpers import launch_many

    root = tmp_path_factory.mktemp("method-runs")
    one_batch = root / "train.jsonl"
    one_batch.write_text("\n".join((REPO / "data" / "reverse" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    methods = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    launches = {}
    for method in methods:
        lr, _ = METHOD_SETTINGS.get(method, DEFAULT_METHOD_SETTING)
        launches[method] = (root / method, [
            f"method={method}", f"data.train={one_batch}", "data.eval=null", "data.packing=false",
            "train.max_steps=30", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_every=1000",
            "optim.warmup_steps=0", "optim.schedule=constant", *([f"optim.lr={lr}"] if lr else []),
            "train.export_shard_mib=0.1"])  # exports in several files: the streamed writer's index
    launch_many(root, launches)
    return {method: root / method for method in methods}


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """`python launch.py` with no argument but its run directory: the bundled SFT job (200
    steps), launched once for tests/test_default_run.py and the runs that start from its
    export (tests/test_dpo_after_sft.py)."""
    from tests.helpers import launch

    run = tmp_path_factory.mktemp("default-run") / "run"
    launch(f"hydra.run.dir={run}", timeout=1800)  # the run directory is the only override
    return run


from tests.conftest_slurm import slurm_cluster  # noqa: F401,E402
