"""Checks that run before any process is spawned or job submitted.

Each failure is a UserError: one paragraph naming the bad value and what is accepted.
"""
from __future__ import annotations

from omegaconf import DictConfig

from launch.choices import CHOICES, NAMED_GROUPS
from launch.config import group_option, world_size
from launch.eval_checks import check_eval_settings
from launch.optim_checks import check as check_optim
from parallel import refusal, resume_refusal
from trainers.data.formats import check_settings as check_data_settings
from trainers.data.source_specs import parse_sources
from trainers.errors import UserError
from trainers.data.neftune import check_alpha
from trainers.memory import chunk_tokens_for
from trainers.model.method_settings import check_method
from trainers.model.special_tokens import check as check_special_tokens
from trainers.data.rows import KIND_FORMATS

POSITIVE_INTS = (
    "train.micro_batch_size", "train.grad_accum", "train.save_every",
    "train.eval_every", "train.keep_last", "train.log_every", "data.max_seq_len",
    "launcher.nproc_per_node", "launcher.nodes", "launcher.gpus_per_node",
)
_ABSENT = object()


def _get(cfg: DictConfig, dotted: str):
    """cfg's value at `dotted`, or _ABSENT where the chosen options do not define it
    (parallel.schedule outside parallel=pipeline)."""
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return _ABSENT
        node = node[part]
    return node


def _accepted(values) -> str:
    return ", ".join("null" if v is None else str(v) for v in values)


def check_choices(cfg: DictConfig) -> None:
    """Every enumerated setting holds a value this launcher implements (launch/choices.py)."""
    for key, accepted in CHOICES.items():
        value = _get(cfg, key)
        if value is not _ABSENT and value not in accepted:
            raise UserError(f"{key}={value!r} is not accepted; use one of: {_accepted(accepted)}. Other values "
                            f"are not implemented, and a value taken but not honoured would train something "
                            f"else than asked.")
    from launch.schema import options

    for group in NAMED_GROUPS:
        names = sorted({group_option(group, o)["name"] for o in options(group)})
        if cfg[group].name not in names:
            raise UserError(f"{group}.name={cfg[group].name!r} is not accepted; it names the {group} and must be "
                            f"one of: {', '.join(names)} (choose the {group} with `{group}=OPTION`).")


def check_values(cfg: DictConfig) -> None:
    check_choices(cfg)
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} is not accepted: the seed of every random draw (data order, adapter "
                        f"initialisation, dropout) must be a whole number from 0 to 2**32-1 (e.g. seed=1234).")
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if value is not _ABSENT and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{key}={value!r} must be a positive integer.")
    if cfg.launcher.name == "local":
        restarts = cfg.launcher.max_restarts
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise UserError(
                f"launcher.max_restarts={restarts!r} is not accepted: it is how many times the local "
                f"launcher restarts the worker group after a worker dies, so a whole number, 0 (end "
                f"the job, the default) or more (e.g. launcher.max_restarts=3)."
            )
    for key in ("step_timeout_s", "startup_timeout_s"):
        value = cfg.train[key]
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise UserError(
                f"train.{key}={value!r} is not accepted: the hang watchdog needs a number of "
                f"seconds greater than 0 (e.g. train.step_timeout_s=600 train.startup_timeout_s=3600), "
                f"or null to turn the watchdog off."
            )
    check_spike_guard(cfg.train)
    if not isinstance(cfg.data.shuffle, bool):
        raise UserError(f"data.shuffle={cfg.data.shuffle!r} must be true (a seeded order per pass) or false (file "
                        f"order, TRL's sequential sampling).")
    ac = cfg.train.activation_checkpointing
    if not isinstance(ac, bool):
        raise UserError(f"train.activation_checkpointing={ac!r} must be true or false.")
    chunk_tokens_for(cfg.train.loss_chunk_tokens, 1)
    if not parse_sources(cfg.data.train, "data.train"):
        raise UserError("data.train is empty: give a data file (data.train=PATH).")
    check_data_settings(cfg.data, bool(parse_sources(cfg.data.eval, "data.eval")))
    check_eval_settings(cfg)
    num_proc = cfg.data.num_proc
    if num_proc != "auto" and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise UserError(f"data.num_proc={num_proc!r} must be auto or a positive integer (tokenizer processes).")
    check_alpha(cfg.train.neftune_alpha)
    check_objective(cfg)
    lr = cfg.optim.lr
    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise UserError(f"optim.lr={lr!r} must be a number between 0 and 1 (e.g. 2e-4).")
    check_optim(cfg)  # the run's length (max_steps | epochs), warmup, schedule, optimizer x device x plan
    m = cfg.method
    if m.peft == "lora":
        if not isinstance(m.r, int) or m.r < 1:
            raise UserError(f"method.r={m.r!r} must be a positive integer (LoRA rank, e.g. 8, 16, 64).")
        if not 0 <= m.dropout < 1:
            raise UserError(f"method.dropout={m.dropout!r} must be in [0, 1).")
    check_method(m)
    check_special_tokens(cfg.model, m, cfg.parallel.name)


def check_spike_guard(train: DictConfig) -> None:
    guard = train.spike_guard
    enabled = guard.enabled
    if not isinstance(enabled, bool):
        raise UserError(f"train.spike_guard.enabled={enabled!r} must be true or false.")
    factor = guard.factor
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
        raise UserError(
            f"train.spike_guard.factor={factor!r} is not accepted: a step is skipped when its loss or "
            f"grad norm exceeds factor x the recent median, so it must be a number above 1 (e.g. 3)."
        )
    for key, low in (("window", 1), ("min_history", 1), ("max_skips", 1)):
        value = guard[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"train.spike_guard.{key}={value!r} must be a positive integer.")
    if guard.min_history > guard.window:
        raise UserError(
            f"train.spike_guard.min_history={guard.min_history} is larger than "
            f"train.spike_guard.window={guard.window}: the median never gets that many "
            f"steps. Use a min_history of at most the window."
        )
    shard = train.export_shard_mib
    if not isinstance(shard, (int, float)) or isinstance(shard, bool) or shard <= 0:
        raise UserError(f"train.export_shard_mib={shard!r} must be a positive number of MiB (the largest "
                        f"safetensors file the export writes; e.g. 2048).")


def check_objective(cfg: DictConfig) -> None:
    """The objective's knobs, and whether the data format suits it."""
    from trainers.objectives.settings import OBJECTIVE_ROWS, check_knobs

    check_knobs(cfg.objective)
    name, fmt = cfg.objective.name, cfg.data.format
    if name == "grpo":
        from trainers.objectives.grpo_settings import check_run

        check_run(cfg)
    kind = OBJECTIVE_ROWS[name]
    if fmt != "auto" and fmt not in KIND_FORMATS[kind]:
        takes = [o for o, k in OBJECTIVE_ROWS.items() if fmt in KIND_FORMATS[k]]
        raise UserError(
            f"data.format={fmt} is read by objective={'|'.join(takes)}, not objective={name}, which reads "
            f"data.format={'|'.join(KIND_FORMATS[kind])} (or auto). Pick the objective that matches the data, "
            f"e.g. `objective=dpo data=reverse_pref`, `objective=kto data=reverse_kto`, `objective=grpo data=reverse_rl` "
            f"or `objective=sft data=reverse`."
        )


def check(cfg: DictConfig) -> None:
    """Everything that can be checked without loading weights."""
    from trainers.model.config_json import local_config_json

    check_values(cfg)
    local_config_json(cfg.model)  # a local model.path's config.json must name its model_type
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

    if cfg.model.toy:
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

    prepared, reports = prepare(cfg, load_tokenizer(cfg.model, cfg.data.chat_template))
    with open_dict(cfg):
        cfg.data.prepared = prepared
    return [r.kept_and_skipped() for r in reports]
