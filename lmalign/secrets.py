"""Secrets (HF, W&B, OpenAI tokens) reach the run through the environment and never its records.

`secrets.NAME=value` overrides are exported as environment variables for the run; every value
that is a secret (those, and environment variables named like tokens or keys) is replaced by
`***` in Hydra's saved config files and in the command line that run.json and loggers record.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any


MASK = "***"
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|API_KEY|SECRET|SECRET_KEY|PASSWORD|ACCESS_KEY)(_|$)")
_MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") would mask ordinary text


def secret_values(config_secrets: dict[str, Any] | None = None) -> list[str]:
    values = {str(v) for v in (config_secrets or {}).values() if v}
    values |= {v for k, v in os.environ.items() if _SECRET_NAME.search(k.upper())}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, MASK)
    return text


def redact_overrides(overrides, config_secrets: dict[str, Any] | None) -> list[str]:
    """Command-line overrides as records may keep them (`+secrets.HF_TOKEN=***`)."""
    values = secret_values(config_secrets)
    return [redact(str(o), values) for o in overrides]


def export(config_secrets: dict[str, str]) -> None:
    os.environ.update({k: str(v) for k, v in config_secrets.items()})


def scrub_argv(values: list[str]) -> None:
    """Libraries that record the command line (W&B, run.json) see it without secrets."""
    sys.argv[:] = [redact(arg, values) for arg in sys.argv]


def keep_in_environment(config) -> None:
    """For a composed config that is saved to run later elsewhere (a SLURM job's pickle): each
    secret becomes a reference to an environment variable exported here, which the job inherits
    (sbatch passes the environment on), and the command line recorded in it is redacted."""
    from omegaconf import open_dict

    found = dict(config.get("secrets") or {})
    export(found)
    with open_dict(config):
        for name in found:
            config.secrets[name] = "${oc.env:" + name + "}"
        config.hydra.overrides.task = redact_overrides(config.hydra.overrides.task, found)
        (config.hydra.job.override_dirname,) = redact_overrides(
            [config.hydra.job.override_dirname], found)
