"""Secrets (HF_TOKEN, ...) reach SLURM jobs through the environment only (sbatch exports
the submitting environment): anything written to disk for a job (the sbatch script, the
saved config) is checked for their values and refused, because those files outlive the
job and are often shared."""
from __future__ import annotations

from trainers.errors import UserError
from trainers.secrets import secret_env


def refuse_secrets(texts: dict[str, str]) -> None:
    for name, value in secret_env().items():
        for where, text in texts.items():
            if value in text:
                raise UserError(
                    f"The {where} would contain the value of ${name}. Secrets reach SLURM jobs "
                    f"through the environment only (sbatch exports it): remove the value from the "
                    f"config / launcher.setup and keep it in ${name}."
                )
