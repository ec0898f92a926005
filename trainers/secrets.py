"""What looks like a secret in the environment (HF_TOKEN, WANDB_API_KEY, ...): the one
definition every writer of a job's files and every tracker's run parameters checks
against, so a credential never lands on disk or in a tracker."""
from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def secret_env() -> dict[str, str]:
    """Environment variables that look like credentials (name -> value); short values are
    left out, they would match ordinary text."""
    return {k: v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
