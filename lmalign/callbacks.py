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


def stash_record(record: Path | None) -> None:
    previous_record.clear()
    if record is not None:
        for path in Path(record).glob("*.yaml"):
            previous_record[path.name] = path.read_text()


class RunRecordCallback(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        stash_record(None if subdir is None else
                     Path(OmegaConf.select(config, "hydra.run.dir")) / subdir)

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


class ComparisonTableCallback(Callback):
    """At the end of a comparison sweep, one table across its runs (printed and in the sweep dir)."""

    def __init__(self) -> None:
        self.run_dirs: list[Path] = []

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        if (run_dir / ".hydra" / "config.yaml").exists() and not config.get("dry_run"):
            self.run_dirs.append(run_dir)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.run_dirs:
            return
        from lmalign import report

        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        table = report.write_comparison(self.run_dirs, sweep_dir)
        print(f"\n{config.get('comparison') or 'comparison'} "
              f"({sweep_dir / report.COMPARISON_FILE}):\n{table}\n", flush=True)
