"""Every enumerated setting in conf/ and the values this launcher implements: one table.

A value outside its set is refused before launch with the accepted ones
(launch/validate.check_choices), because a value taken and not honoured is worse than a
refusal: `method.quantize=int8` trained NF4 and `optim.name=adamw_8bit` ran plain AdamW. To
implement a new value (an 8-bit optimizer, int8 quantization), add it here and where it is
honoured. Values of a group's `name` are that group's conf/ options, read from conf/.

FREE_TEXT lists the string settings whose value is the user's own (paths, names, module
lists): tests/test_config_schema.py fails on a string setting in conf/ that is in neither,
so a new enumerated setting cannot be added without its accepted set.
"""
from __future__ import annotations

CHOICES: dict[str, tuple] = {
    "method.peft": (None, "lora", "prefix", "prompt", "ia3", "adalora", "vera"),
    "method.quantize": (None, "nf4", "int8"),  # NF4 with double quantization (method=qlora); LLM.int8
    "optim.name": ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant", "cosine_with_restarts", "polynomial", "constant_with_warmup"),
    "optim.bits": (32, 8),  # optim=lion: bitsandbytes' Lion or Lion8bit
    "train.precision": ("auto", "fp32", "bf16"),
    "train.checkpoint.mode": ("async", "sync"),
    "train.host_memory": ("fast", "compact"),
    "data.on_bad_row": ("error", "skip"),
    "data.format": ("auto", "messages", "prompt_completion", "preference", "unpaired_preference", "prompt_only",
                    "alpaca", "sharegpt", "text"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "parallel.schedule": ("1f1b", "gpipe", "interleaved_1f1b"),
    "train.best_mode": ("min", "max"),
    "train.export_from": ("last", "best"),
    "eval.forgetting_action": ("warn", "stop"),
}
# A group's `name`: one of its conf/ options' names (launcher=slurm_local is named slurm).
NAMED_GROUPS = ("method", "parallel", "objective", "launcher", "optim")
# Enumerated settings checked by the module that defines their values, before launch.
CHECKED_ELSEWHERE = {"objective.loss_type": "TRL's DPO loss types (trainers/objectives/settings.check_knobs)",
                     "objective.kl_pairs": "batch | file_order (trainers/objectives/settings.check_knobs)",
                     "objective.scale_rewards": "group | batch | none (trainers/objectives/grpo_settings.py)",
                     "objective.importance_sampling_level": "token | sequence (trainers/objectives/grpo_settings.py)",
                     "data.chat_template": "a shipped template's name or a jinja file (trainers/data/chat_template.py)",
                     "method.init_lora_weights": "true | gaussian | pissa | pissa_niter_N | olora "
                                                 "(trainers/model/method_settings.check_init)"}
# Settings whose value is `auto` or a number (checked where they are read, before launch).
AUTO_OR_NUMBER = ("data.num_proc", "train.loss_chunk_tokens", "parallel.reduce_bucket_size",
                  "parallel.stage3_max_live_parameters", "parallel.stage3_max_reuse_distance",
                  "parallel.stage3_prefetch_bucket_size")
FREE_TEXT = ("run_name", "train.best_metric", "train.tracker_project", "model.name", "model.path", "model.arch.model_type", "data.name", "data.train", "data.eval",
             "data.cache_dir", "method.target_modules", "method.modules_to_save", "launcher.partition", "launcher.account", "launcher.qos",
             "launcher.constraint")
