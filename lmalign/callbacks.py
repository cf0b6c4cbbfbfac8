"""Hydra callbacks that keep the run directory's record true and free of secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmalign import secrets

# Hydra rewrites `.hydra/*.yaml` before the job starts. What was there before, so that a re-run
# with different training settings can be refused with the original record restored.
previous_record: dict[str, str] = {}


class RunRecordCallback(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        previous_record.clear()
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        record = Path(OmegaConf.select(config, "hydra.run.dir")) / subdir
        for path in record.glob("*.yaml"):
            previous_record[path.name] = path.read_text()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:
            return
        values = secrets.secret_values(dict(config.get("secrets") or {}))
        record = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
        for path in record.glob("*.yaml"):
            text = path.read_text()
            cleaned = secrets.redact(text, values)
            if cleaned != text:
                path.write_text(cleaned)


def restore_previous_record(record_dir: Path) -> None:
    for name, text in previous_record.items():
        (record_dir / name).write_text(text)
