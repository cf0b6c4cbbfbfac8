"""Experiment loggers, through the trainer's own reporting (`report_to`)."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lmalign.schema import LoggerConfig

log = logging.getLogger(__name__)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def configure(logger: LoggerConfig, run_dir: Path) -> list[str]:
    """Point the chosen logger at the run directory; return the trainer's report_to."""
    if logger.name == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
        return ["tensorboard"]
    if logger.name == "wandb":
        mode = logger.mode
        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
            if mode == "offline":
                log.info("W&B: not logged in, logging offline to %s/wandb "
                         "(upload later with `wandb sync`)", run_dir)
        os.environ["WANDB_MODE"] = mode
        os.environ["WANDB_DIR"] = str(run_dir)
        if logger.project:
            os.environ["WANDB_PROJECT"] = logger.project
        return ["wandb"]
    return []


def finish(logger: LoggerConfig) -> None:
    if logger.name == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
