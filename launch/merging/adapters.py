"""adapters=true: combine the runs' LoRA adapters into one adapter with PEFT's own
`add_weighted_adapter` (called, not rewritten), then merge it into the base, so the result
is, like every merge, a model folder that loads with transformers (and `out/adapter`, the
combined adapter, for those who serve adapters on a shared base).

Why offer it beside merging the runs' merged models: the combined adapter is small and
swappable. Which of our methods PEFT has an adapter form of, and which of its
combination types computes our method's math on the weight deltas (dW = scale * B @ A):
- linear (soup): `cat` with the weights normalised to sum 1: the adapters stacked, so
  B_cat @ A_cat = sum_i w_i dW_i exactly (rank = the sum of the ranks).
- task_arithmetic: `cat` with weights lambda * w_i: exactly base + lambda * sum_i w_i dW_i.
- ties, dare_ties, dare_linear: the `*_svd` types: PEFT's TIES / DARE on the full deltas
  dW_i, then a rank-r SVD of the result (r = the largest input rank): the SVD truncation is
  the approximation. PEFT's plain `ties`, `dare_*`, `magnitude_prune` and `linear` apply
  the method to the A and B factors separately, which is not the method's math on dW
  (PEFT's docstring calls `linear` a rough approximation); `combination=` selects them.
slerp, model_stock and greedy_soup have no adapter form in PEFT and are refused.

Memory: the base is never loaded. PEFT builds the adapters on a skeleton of it whose weights
are one-element CPU placeholders of the right shape (PEFT reads shapes, device and dtype;
add_weighted_adapter reads and writes only the LoRA factors: cat, *_svd through
get_delta_weight, the plain types on A and B), and the merged model is written like a run's
export (trainers/model/export.py write_merged): each base tensor read, its combined delta
merged in by PEFT's own `merge`, written to files of at most out_shard_mib. Measured
(bench/adapter_merge_memory.py, two rank-16 adapters, out_shard_mib=64): the private memory
grows by ~130 MiB plus ~2.5x the adapters (PEFT holds the inputs and their combination),
whatever the model: 165 MiB (0.43x) for a 385 MiB fp32 Llama, 313 MiB (0.20x) for a 1.5 GiB
one, where loading the base whole grew it by 516 MiB (1.34x) for the 385 MiB one.
Adapters whose loading needs the real base weights (modules_to_save, trainable token rows,
layer_replication, PiSSA/OLoRA/LoftQ-style initialisation, a LoRA on an embedding layer:
`needs_base_weights`) take the
whole-model path: the base in fp32, merge_and_unload, save_pretrained.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from trainers.errors import UserError

log = logging.getLogger(__name__)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES (0.21)
# LoraConfig's fields marked is_lora_variant in peft 0.21 (a variant's layers may read or reshape
# the base weight; tests/test_adapter_merge_memory.py holds this to PEFT's list)
LORA_VARIANTS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                 "arrow_config", "kasa_config")

# our method -> the PEFT combination_type whose math on the deltas is ours
COMBINATION = {"linear": "cat", "task_arithmetic": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd",
               "dare_linear": "dare_linear_svd"}
# every combination_type of peft 0.21's LoraModel.add_weighted_adapter
PEFT_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
              "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # PEFT needs equal r for these
USES_DENSITY = tuple(t for t in PEFT_TYPES if t.startswith(("ties", "dare", "magnitude")))


def combination_type(method_name: str, combination) -> str:
    """The PEFT combination_type for `method` (or the one `combination=` names), or a refusal
    naming the methods PEFT has an adapter form of."""
    if method_name not in COMBINATION:
        raise UserError(f"adapters=true combines PEFT adapters with add_weighted_adapter, which has no form of "
                        f"method={method_name}; with adapters=true use method= one of {', '.join(COMBINATION)} "
                        f"(PEFT's {', '.join(sorted(set(COMBINATION.values())))}), or drop adapters=true to merge "
                        f"the runs' merged models with mergekit.")
    if combination is None:
        return COMBINATION[method_name]
    if str(combination) not in PEFT_TYPES:
        raise UserError(f"combination={combination!r} is not a combination_type of PEFT's add_weighted_adapter; "
                        f"accepted: {', '.join(PEFT_TYPES)} (or null: {COMBINATION[method_name]} for "
                        f"method={method_name}).")
    return str(combination)


def peft_weights(method_name: str, weights: list[float], lam: float) -> list[float]:
    """The weights handed to PEFT: a soup's normalised to sum 1 (mergekit's linear with
    normalize), the task-vector methods' scaled by lambda (which scales the summed deltas)."""
    if method_name == "linear":
        total = sum(weights)
        if total == 0:
            raise UserError(f"weights={weights} sum to 0, and method=linear divides by their sum.")
        return [w / total for w in weights]
    return [w * lam for w in weights]


def _adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def recorded_base(item) -> str | None:
    """The model an input's adapter was trained on: its run's model.path, else what the
    adapter's config records."""
    if item.base_path is not None:
        return item.base_path
    return _adapter_config(item.adapter_dir).get("base_model_name_or_path")


def check_inputs(inputs: list, ctype: str) -> str:
    """Every input a LoRA adapter on one base model, of ranks PEFT can combine with
    `ctype`; returns that base's path. Refusals name the input and the reason."""
    bases = {}
    for item in inputs:
        if item.adapter_dir is None:
            raise UserError(f"input {item.given!r} cannot be combined with adapters=true: it is a model folder, not a "
                            f"run with a PEFT adapter (export/adapter) or an adapter folder (adapter_config.json). "
                            f"Drop adapters=true to merge models.")
        values = _adapter_config(item.adapter_dir)  # adapter_config.json, not ours
        if values.get("peft_type") != "LORA" or values.get("use_dora"):
            kind = "DoRA" if values.get("use_dora") else values.get("peft_type")
            raise UserError(f"input {item.given!r} is a {kind} adapter; PEFT's add_weighted_adapter combines LoRA "
                            f"adapters only. Drop adapters=true to merge the runs' merged models.")
        if item.run_cfg is not None and item.run_cfg.objective.name == "reward":
            raise UserError(f"input {item.given!r} is a reward model whose score head is trained in full beside "
                            f"its adapter, which add_weighted_adapter cannot combine: drop adapters=true.")
        base = recorded_base(item)
        if not base:
            raise UserError(f"input {item.given!r}: its adapter records no base model (base_model_name_or_path), so "
                            f"it is not known to share the others' base.")
        bases[item.given] = str(Path(base).expanduser().resolve())
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{g}: {b}" for g, b in bases.items())
        raise UserError(f"adapters=true combines adapters of one base model, and these were trained on different "
                        f"ones ({listed}). Combine adapters of one base, or drop adapters=true to merge the merged "
                        f"models (of one architecture).")
    ranks = {item.given: _adapter_config(item.adapter_dir)["r"] for item in inputs}
    if ctype in SAME_RANK and len(set(ranks.values())) > 1:
        raise UserError(f"combination {ctype} needs adapters of one rank, and these differ "
                        f"({', '.join(f'{g}: r={r}' for g, r in ranks.items())}); cat and the *_svd types "
                        f"combine different ranks.")
    return next(iter(bases.values()))


def check_base(base_dir: Path, recorded: str) -> None:
    """base=PATH given: it must be the model the adapters were trained on (same config)."""
    given, want = json.loads((base_dir / "config.json").read_text()), Path(recorded) / "config.json"
    if want.exists() and json.loads(want.read_text()) != given:
        raise UserError(f"base={str(base_dir)!r} is not the model the adapters were trained on ({recorded}): their "
                        f"config.json differ. Leave base= unset to use {recorded}.")


def needs_base_weights(inputs: list) -> str | None:
    """Why combining these adapters needs the base's real weights, or None. PEFT copies a
    module trained in full (modules_to_save, trainable token rows) from the base module,
    duplicates base layers (layer_replication), initialises PiSSA/OLoRA/LoftQ/EVA/CorDA
    adapters from the base weights, and LoRA variants have layers of their own; plain LoRA
    factors (every adapter this project exports: PiSSA/OLoRA are exported converted to plain
    LoRA) never read them. PEFT also saves the
    base's embedding weights in an adapter that targets an embedding layer (peft
    save_embedding_layers="auto"; "all-linear" never does, a name or pattern naming one may)."""
    for item in inputs:
        values = _adapter_config(item.adapter_dir)
        for key in ("modules_to_save", "trainable_token_indices", "layer_replication"):
            if values.get(key):
                return f"input {item.given!r} has {key}"
        variant = next((key for key in LORA_VARIANTS if values.get(key)), None)
        if variant:
            return f"input {item.given!r} is a LoRA variant ({variant})"
        if values.get("init_lora_weights") not in (True, False, "gaussian", None):
            return f"input {item.given!r} has init_lora_weights={values.get('init_lora_weights')!r}"
        targets = values.get("target_modules") or []
        named = [] if targets == "all-linear" else [targets] if isinstance(targets, str) else list(targets)
        if any(e in str(t) for t in named for e in EMBEDDING_LAYER_NAMES):
            return f"input {item.given!r} targets an embedding layer, whose base weights PEFT saves in the adapter"
    return None


def _skeleton(base_dir: Path):
    """The base model, fp32, with every weight a CPU placeholder that owns one element
    (trainers/model/weights.py make_placeholder): PEFT reads its shapes, device and dtype to
    build the adapters, add_weighted_adapter reads and writes LoRA factors only, and the
    base's values are read from its files one tensor at a time when the merge is written."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.model.weights import make_placeholder, replace_parameters

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)), dtype=torch.float32)
    replace_parameters(model, lambda _, p: make_placeholder(p.shape, torch.float32))
    return model


def combine(base_dir: Path, inputs: list, weights: list[float], ctype: str, density: float, seed: int,
            out: Path, shard_bytes: int) -> None:
    """PEFT loads every adapter on the base and adds their weighted combination as the
    adapter `default`; `out/adapter` gets it, `out` the base with it merged in, written one
    tensor at a time (or, for the inputs `needs_base_weights` names, PEFT's merge_and_unload
    of the whole base), in safetensors files of at most `shard_bytes` (out_shard_mib, as the
    mergekit path writes)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    whole = needs_base_weights(inputs)
    if whole:
        log.info("adapters=true: %s, so the base model is loaded whole (fp32)", whole)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    else:
        base = _skeleton(base_dir)
    names = [f"input{k}" for k in range(len(inputs))]
    model = PeftModel.from_pretrained(base, str(inputs[0].adapter_dir), adapter_name=names[0])
    for name, item in zip(names[1:], inputs[1:]):
        model.load_adapter(str(item.adapter_dir), adapter_name=name)
    torch.manual_seed(seed)  # dare_*: the drop masks
    model.add_weighted_adapter(names, weights, "default", combination_type=ctype,
                               density=float(density) if ctype in USES_DENSITY else None)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    model.save_pretrained(str(out / "adapter"), selected_adapters=["default"], safe_serialization=True)
    if whole:
        model.merge_and_unload().save_pretrained(str(out), safe_serialization=True, max_shard_size=shard_bytes)
    else:
        _write_streamed(model, base_dir, out, shard_bytes)


def _write_streamed(model, base_dir: Path, out: Path, shard_bytes: int) -> None:
    """`out` as merge_and_unload().save_pretrained(max_shard_size=shard_bytes) writes it
    (byte for byte on the bundled model: fp32 weights, the base's config with dtype float32,
    its generation config), one base tensor at a time with the combined adapter merged in
    by PEFT's own `merge` (trainers/model/export.py): the peak is one file being filled plus
    one tensor."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from launch.worker import set_host_allocator
    from trainers.model.export import SafetensorsShards, write_merged
    from trainers.model.weights import CheckpointFiles

    # glibc raises its mmap threshold each time a large block is freed, so the tensors read
    # and merged one after another would land in the heap, whose freed pages RSS keeps:
    # measured, private memory grew by 0.8x the model instead of ~0.4x
    # (bench/adapter_merge_memory.py). train.host_memory=compact's fixed threshold maps
    # every tensor and unmaps it when freed.
    set_host_allocator("compact")
    files = CheckpointFiles(base_dir)
    try:
        writer = SafetensorsShards(out, shard_bytes)
        write_merged(model, files, writer)
        writer.close()
    finally:
        files.close()
    config = AutoConfig.from_pretrained(str(base_dir))
    config.dtype = torch.float32
    config.save_pretrained(str(out))
    if (base_dir / "generation_config.json").exists():
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out))
