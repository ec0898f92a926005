"""Checks that run before any process is spawned or job submitted.

Each failure is a UserError: one paragraph naming the bad value and what is accepted.
"""
from __future__ import annotations

from omegaconf import DictConfig

from launch.config import world_size
from parallel import refusal, resume_refusal
from trainers.data.sources import parse_sources
from trainers.errors import UserError
from trainers.data.neftune import check_alpha
from trainers.objectives.lm_loss import chunk_tokens_for
from trainers.optim import SCHEDULES
from trainers.data.rows import FORMATS, KIND_FORMATS

CHOICES = {
    "data.on_bad_row": ("error", "skip"),
    "data.format": FORMATS,
    "optim.schedule": SCHEDULES,
    "train.precision": ("auto", "fp32", "bf16"),
    "train.checkpoint.mode": ("async", "sync"),
    "train.host_memory": ("fast", "compact"),
}
POSITIVE_INTS = (
    "train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.save_every",
    "train.eval_every", "train.keep_last", "train.log_every", "data.max_seq_len",
)


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_values(cfg: DictConfig) -> None:
    for key, accepted in CHOICES.items():
        value = _get(cfg, key)
        if value not in accepted:
            raise UserError(f"{key}={value!r} is not accepted; use one of: {', '.join(accepted)}.")
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{key}={value!r} must be a positive integer.")
    if cfg.launcher.name == "local":
        restarts = cfg.launcher.get("max_restarts", 0)
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise UserError(
                f"launcher.max_restarts={restarts!r} is not accepted: it is how many times the local "
                f"launcher restarts the worker group after a worker dies, so a whole number, 0 (end "
                f"the job, the default) or more (e.g. launcher.max_restarts=3)."
            )
    for key in ("step_timeout_s", "startup_timeout_s"):
        value = cfg.train.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise UserError(
                f"train.{key}={value!r} is not accepted: the hang watchdog needs a number of "
                f"seconds greater than 0 (e.g. train.step_timeout_s=600 train.startup_timeout_s=3600), "
                f"or null to turn the watchdog off."
            )
    check_spike_guard(cfg.train)
    ac = cfg.train.get("activation_checkpointing", False)
    if not isinstance(ac, bool):
        raise UserError(f"train.activation_checkpointing={ac!r} must be true or false.")
    chunk_tokens_for(cfg.train.get("loss_chunk_tokens", "auto"), 1)
    if not parse_sources(cfg.data.train, "data.train"):
        raise UserError("data.train is empty: give a data file (data.train=PATH).")
    parse_sources(cfg.data.get("eval"), "data.eval")
    num_proc = cfg.data.get("num_proc", "auto")
    if num_proc != "auto" and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise UserError(f"data.num_proc={num_proc!r} must be auto or a positive integer (tokenizer processes).")
    check_alpha(cfg.train.get("neftune_alpha"))
    check_objective(cfg)
    lr = cfg.optim.lr
    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise UserError(f"optim.lr={lr!r} must be a number between 0 and 1 (e.g. 2e-4).")
    m = cfg.method
    if m.peft == "lora":
        if not isinstance(m.r, int) or m.r < 1:
            raise UserError(f"method.r={m.r!r} must be a positive integer (LoRA rank, e.g. 8, 16, 64).")
        if not 0 <= m.dropout < 1:
            raise UserError(f"method.dropout={m.dropout!r} must be in [0, 1).")


def check_spike_guard(train: DictConfig) -> None:
    guard = train.get("spike_guard") or {}
    enabled = guard.get("enabled", False)
    if not isinstance(enabled, bool):
        raise UserError(f"train.spike_guard.enabled={enabled!r} must be true or false.")
    factor = guard.get("factor", 3.0)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
        raise UserError(
            f"train.spike_guard.factor={factor!r} is not accepted: a step is skipped when its loss or "
            f"grad norm exceeds factor x the recent median, so it must be a number above 1 (e.g. 3)."
        )
    for key, low in (("window", 1), ("min_history", 1), ("max_skips", 1)):
        value = guard.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"train.spike_guard.{key}={value!r} must be a positive integer.")
    if guard.get("min_history", 1) > guard.get("window", 1):
        raise UserError(
            f"train.spike_guard.min_history={guard.get('min_history')} is larger than "
            f"train.spike_guard.window={guard.get('window')}: the median never gets that many "
            f"steps. Use a min_history of at most the window."
        )
    planted = train.get("debug_corrupt_steps") or []
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in planted):
        raise UserError(f"train.debug_corrupt_steps={list(planted)!r} must be a list of step numbers (1 or more).")
    shard = train.get("export_shard_mib", 2048)
    if not isinstance(shard, (int, float)) or isinstance(shard, bool) or shard <= 0:
        raise UserError(f"train.export_shard_mib={shard!r} must be a positive number of MiB (the largest "
                        f"safetensors file the export writes; e.g. 2048).")
    delay = train.get("debug_commit_delay_s") or 0
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
        raise UserError(f"train.debug_commit_delay_s={delay!r} must be a number of seconds, 0 or more (testing only; "
                        f"leave it 0).")


def check_objective(cfg: DictConfig) -> None:
    """The objective's knobs, and whether the data format suits it."""
    from trainers.objectives.catalog import OBJECTIVE_ROWS, check_knobs

    check_knobs(cfg.objective)
    name, fmt = cfg.objective.name, cfg.data.format
    kind = OBJECTIVE_ROWS[name]
    if fmt != "auto" and fmt not in KIND_FORMATS[kind]:
        takes = [o for o, k in OBJECTIVE_ROWS.items() if fmt in KIND_FORMATS[k]]
        raise UserError(
            f"data.format={fmt} is read by objective={'|'.join(takes)}, not objective={name}, which reads "
            f"data.format={'|'.join(KIND_FORMATS[kind])} (or auto). Pick the objective that matches the data, "
            f"e.g. `objective=dpo data=reverse_pref`, `objective=kto data=reverse_kto` or `objective=sft data=reverse`."
        )


def check(cfg: DictConfig) -> None:
    """Everything that can be checked without loading weights."""
    check_values(cfg)
    reason = refusal(cfg, world_size(cfg))
    if reason:
        raise UserError(f"parallel={cfg.parallel.name} with method={cfg.method.name}: {reason}")
    reason = resume_refusal(cfg)
    if reason:
        raise UserError(reason)
    from launch.merging.after_sweep import check as check_after_sweep

    check_after_sweep(cfg)


def check_data_suits_model(cfg: DictConfig) -> None:
    """A size preset with the bundled toy task would spend GPU hours learning to reverse
    strings with 2k-token rows: ask for the user's data instead."""
    from launch.config import REPO_ROOT

    if cfg.model.get("toy", True):
        return
    bundled = str(REPO_ROOT / "data")
    train = next((s.path for s in parse_sources(cfg.data.train, "data.train") if s.path.startswith(bundled)), None)
    if train:
        raise UserError(
            f"model={cfg.model.name} is a real model, but data.train={train!r} is the bundled toy task "
            f"(made for model=tiny). Pass your own data: data.train=PATH (and data.eval=PATH), in "
            f"chat `messages` or `prompt`/`completion` rows (JSONL, parquet or a datasets folder)."
        )


def prepare_data(cfg: DictConfig) -> list[str]:
    """Validate and tokenize every row into the token cache (needs only the tokenizer),
    or find it cached; record the cache folders in `cfg.data.prepared` for the workers.
    Returns report lines."""
    from omegaconf import open_dict

    from trainers.data.sources import prepare_data as prepare
    from trainers.model.load import load_tokenizer

    prepared, reports = prepare(cfg, load_tokenizer(cfg.model))
    with open_dict(cfg):
        cfg.data.prepared = prepared
    return [r.kept_and_skipped() for r in reports]
