"""A credential typed into the config is refused before anything is written or printed.

The config is printed (`--cfg job`, the dry run), saved in the run directory and in SLURM
job folders, and those files outlive the run and are shared; a token belongs in the
environment, where transformers, huggingface_hub and wandb read it. So a value shaped like
a known credential, or any value under a key named like one, stops the launch naming the
key (never the value) and the environment variable to use. Checked twice: on the raw
command line before Hydra prints or writes anything (launch.py), and on the composed config
(a secret in a conf/ file), before the launcher writes config.yaml.
"""
from __future__ import annotations

import re

from trainers.errors import UserError

# (value pattern, what it is, the environment variable its library reads)
SHAPES = (
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token", "HF_TOKEN"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an OpenAI-style API key", "OPENAI_API_KEY (or your provider's variable)"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}"), "a GitHub token", "GITHUB_TOKEN"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key", "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "a Slack token", "an environment variable"),
)
# W&B API keys are 40 hex digits: only under a wandb key (a 40-hex git commit is ordinary).
WANDB_KEY = re.compile(r"\b[0-9a-f]{40}\b")
# A key's last part named like a credential: token, hf_token, api_key, password, secret, ...
# (not `loss_chunk_tokens` or `max_new_tokens`: those count tokens).
SECRET_KEY = re.compile(r"(^|[_-])(token|api_?key|apikey|password|passwd|secret|secret_key|access_key|"
                        r"private_key|credentials?|auth_token)$", re.I)
# Keys whose names say `token` in the vocabulary's sense (model.special_tokens.pad_token: a
# token string such as "<|pad|>"): their values are still checked for credential shapes.
VOCABULARY_KEYS = ("model.special_tokens.",)


def env_for_key(key: str) -> str:
    low = key.lower()
    if "wandb" in low:
        return "WANDB_API_KEY"
    if "hf" in low or "hub" in low or key.split(".")[-1].lower() == "token":
        return "HF_TOKEN"
    if "openai" in low:
        return "OPENAI_API_KEY"
    return "an environment variable (HF_TOKEN for the Hugging Face hub, WANDB_API_KEY for W&B)"


def credential_in(key: str, value) -> tuple[str, str] | None:
    """(why `key=value` looks like a credential, without the value; the environment
    variable to use instead), or None."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    last = key.split("[")[0].rsplit(".", 1)[-1].lstrip("+~")
    if SECRET_KEY.search(last) and not key.lstrip("+~").startswith(VOCABULARY_KEYS):
        return f"`{key}` is named like a credential", env_for_key(key)
    text = str(value)
    for pattern, what, env in SHAPES:
        if pattern.search(text):
            return f"the value of `{key}` looks like {what}", env
    if "wandb" in key.lower() and WANDB_KEY.search(text):
        return f"the value of `{key}` looks like a W&B API key", "WANDB_API_KEY"
    return None


def refuse(key: str, found: tuple[str, str]) -> None:
    why, env = found
    raise UserError(
        f"{why}. Credentials are not accepted in the config: it is printed (--cfg job, dry_run=true) and "
        f"saved with the run (RUN_DIR/config.yaml, SLURM job folders), files that outlive the run and are "
        f"shared. Remove `{key}` from the command line or conf/ and export the secret in the environment "
        f"instead: {env} (the libraries read it from there, and SLURM jobs inherit it)."
    )


def check_overrides(argv: list[str]) -> None:
    """The raw command line (`key=value` overrides, `+key=value`, `--flag`s skipped), before
    Hydra composes, prints or writes anything."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        found = credential_in(key, value if value not in ("null", "") else None)
        if found:
            refuse(key, found)


def check_config(cfg) -> None:
    """Every key and value of the composed config (a secret typed into a conf/ file)."""
    from omegaconf import OmegaConf

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{prefix}[{i}]")
        else:
            yield prefix, node

    for key, value in walk(OmegaConf.to_container(cfg, resolve=False), ""):
        found = credential_in(key, value)
        if found:
            refuse(key, found)
